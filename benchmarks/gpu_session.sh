#!/usr/bin/env bash
# One lent-GPU session: GPU tests, accuracy of the fast path, and the speed tables, in one call.
#   bash benchmarks/gpu_session.sh OUTDIR
# Needs guided_diffusion importable (the device machine has no registry: carry a copy of the
# package in .gd/ and it is put on PYTHONPATH). Each step has its own time limit, so one that
# hangs or breaks cannot cost the others their numbers; results land in OUTDIR as they come.
# Most important first: if the call's own time limit cuts the tail, what ran is kept.
OUT=${1:-${OUT:-/tmp/adm-gpu}}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src:$PWD/tests:$PWD/.gd${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
LOG=$OUT/session.log
step() { local limit=$1; shift; echo "=== $* (limit ${limit}s) $(date +%T)" | tee -a "$LOG"
         timeout "$limit" "$@" 2>&1 | tee -a "$LOG"; echo "=== exit ${PIPESTATUS[0]} $(date +%T)" | tee -a "$LOG"; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>&1 | tee -a "$LOG"
python3 -c "import torch, guided_diffusion; print('torch', torch.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$LOG"
CASES=ddpm-512-guided,ddpm-64-guided,ddim-256
if [ "${ADM_GPU_QUICK:-0}" = 0 ]; then
  step 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_fused.py tests/test_graphs.py tests/test_fast.py
fi
step 150 python3 benchmarks/bench.py --device cuda --cases $CASES --repeats 5 --profile "$OUT/prof" \
    --json "$OUT/eager.json"
step 90 python3 benchmarks/bench.py --device cuda --cases ddpm-64-guided,ddim-256,ddpm-512-guided --repeats 5 \
    --no-flops --cuda-graph --json "$OUT/graphs.json"
# Host cost: per fused op with real launches vs stubbed (Triton's launcher + driver), and a whole
# guided 64x64 step with everything stubbed, on this machine's CPU (compare: the eager step time).
step 30 python3 benchmarks/host.py --launch
step 30 python3 benchmarks/host.py
step 45 python3 benchmarks/host.py --step ddpm-64-guided --batch 1
step 60 python3 benchmarks/bench.py --device cuda --cases ddpm-512-guided,ddim-256 --repeats 3 --no-flops \
    --concat --json "$OUT/concat.json"
# 4096:4 is 32 elements per thread: the resampling, two-input and backward variants then need
# 180-255 registers (ptxas, sm_90a; bwd_stats/bwd_apply spill), 2 programs per SM at most; 4096:8
# and 2048:4 halve that.
step 170 python3 benchmarks/kernels.py --cases ddim-256,ddpm-512-guided --repeats 3 \
    --settings 4096:4:4,4096:4:4:p,4096:4:8,4096:8:4,4096:8:8,2048:4:8,8192:8:8 --json "$OUT/kernels.json"
step 70 python3 benchmarks/accuracy.py --dtypes auto --json "$OUT/accuracy.json"
if [ "${ADM_GPU_FULL:-0}" = 1 ]; then  # measured in session 3; their code has not changed since
  step 60 python3 benchmarks/bench.py --device cuda --cases ddpm-512-guided,ddpm-64-guided --repeats 3 --no-flops \
      --fused off --json "$OUT/unfused.json"
  step 200 python3 benchmarks/bench.py --device cuda --cases ddim-256,ddpm-64-guided --repeats 3 --no-flops \
      --compile --json "$OUT/compile.json"
fi
