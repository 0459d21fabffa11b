#!/usr/bin/env bash
# One lent-GPU session: the speed tables, accuracy of the fast path, the GPU tests, the CLI on
# CUDA and the kernel-geometry sweep, in one call.
#   bash benchmarks/gpu_session.sh OUTDIR
# Needs guided_diffusion importable (the device machine has no registry: carry a copy of the
# package in .gd/ and it is put on PYTHONPATH). Each step has its own time limit, and all of them
# share one deadline (ADM_GPU_BUDGET seconds, default 520), so one that hangs or breaks cannot
# cost the others their numbers and the whole stays inside the call's limit; results land in
# OUTDIR as they come. Most important first: if the deadline cuts the tail, what ran is kept.
OUT=${1:-${OUT:-/tmp/adm-gpu}}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src:$PWD/tests:$PWD/.gd${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export ADM_HOME=${ADM_HOME:-/tmp/adm-home}
LOG=$OUT/session.log
DEADLINE=$((SECONDS + ${ADM_GPU_BUDGET:-520}))
step() {
  local limit=$1; shift
  local left=$((DEADLINE - SECONDS - 3))
  if [ "$left" -lt 15 ]; then echo "=== skipped (deadline): $*" | tee -a "$LOG"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $* (limit ${limit}s) $(date +%T)" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"; echo "=== exit ${PIPESTATUS[0]} $(date +%T)" | tee -a "$LOG"
}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"
python3 -c "import torch, triton, guided_diffusion; print('torch', torch.__version__, 'triton', triton.__version__,
torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')" 2>&1 | tee -a "$LOG"
CASES=ddpm-512-guided,ddpm-64-guided,ddim-256
# 1. The issue's table: ours eager (the default) vs the reference, with a profile of ours.
step 150 python3 benchmarks/bench.py --device cuda --cases $CASES --repeats 5 --profile "$OUT/prof" \
    --json "$OUT/eager.json"
# 2. The same with CUDA graphs (adm sample's default on CUDA). Its first case compiles nothing:
#    step 1 filled Triton's cache (a fresh machine's first case spends ~65-70 s compiling).
step 90 python3 benchmarks/bench.py --device cuda --cases ddpm-512-guided,ddim-256,ddpm-64-guided --repeats 5 \
    --no-flops --cuda-graph --json "$OUT/graphs.json"
# 3. Accuracy of the fast path against float32 (TF32 off), full-size 512 and 64 models.
step 70 python3 benchmarks/accuracy.py --dtypes auto --json "$OUT/accuracy.json"
# 4. The GPU-marked tests.
step 100 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_fused.py tests/test_graphs.py \
    tests/test_fast.py tests/test_fast_state.py
# 5. The command line on CUDA: the bundled demo, guided, with graphs (the default) and without
#    (same images within a level), and a refused bad input.
step 60 bash -c 'set -e; for g in "" --no-cuda-graph; do
    python3 -m adm_cli sample --model demo-digits --class 7 -n 16 --seed 3 --guidance 2 --device cuda \
        $g --out /tmp/demo$g -q; done
  python3 -c "import numpy as np; a = np.load(\"/tmp/demo/samples.npz\"); b = np.load(\"/tmp/demo--no-cuda-graph/samples.npz\")
k = a.files[0]; d = np.abs(a[k].astype(int) - b[k].astype(int)); print(\"demo graphs vs eager: shape\", a[k].shape, \"max diff\", d.max(), \"mean\", d.mean())"
  python3 -m adm_cli sample --model demo-digits --class 7 --device cuda:7 --out /tmp/bad || echo "exit $?"'
# 6. Launch geometry of the fused kernels (fused._TILE/_WARPS/_PROGRAMS_PER_SM/_STATS_PREFETCH).
#    At 512x512 (H100) the defaults 4096:4:4 won: 103.7 ms against 106.7 (4096:4:8), 123.3
#    (4096:4:4:p), 130.9 (4096:8:8); 256x256 was not reached.
step 80 python3 benchmarks/kernels.py --cases ddim-256 --repeats 3 \
    --settings 4096:4:4,4096:4:8,8192:8:8,2048:4:8 --json "$OUT/kernels.json"
# 7. Host cost per fused op with real launches (compare host.py's stubbed rows from the dev VM).
step 25 python3 benchmarks/host.py --launch
echo "=== done $(date +%T), ${SECONDS}s" | tee -a "$LOG"
