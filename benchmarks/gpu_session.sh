#!/usr/bin/env bash
# One lent-GPU session: a first check of the fused kernels with this machine's Triton, the speed
# tables, the candidate kernel forms at the 256x256 model's shapes (and the 256 step with those
# that pay), the GPU tests, accuracy of the fast path and the CLI on CUDA, in one call. (host.py --launch ran in session 9, kernels.py's launch geometries at
# 256x256 in session 14; see NOTES.md.)
#   bash benchmarks/gpu_session.sh OUTDIR
# Needs guided_diffusion importable (the device machine has no registry: carry a copy of the
# package in .gd/ and it is put on PYTHONPATH). Each step has its own time limit, and all of them
# share one deadline (ADM_GPU_BUDGET seconds, default 520), so one that hangs or breaks cannot
# cost the others their numbers and the whole stays inside the call's limit. Most important first:
# if the deadline cuts the tail, what ran is kept. OUTDIR gets two files (the device tool brings
# back at most 8): session.log, and results.tgz (the JSON tables and profiles), re-packed after
# every step.
OUT=${1:-${OUT:-/tmp/adm-gpu}}
mkdir -p "$OUT"
RES=$(mktemp -d)
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
  tar czf "$OUT/results.tgz.tmp" -C "$RES" . && mv "$OUT/results.tgz.tmp" "$OUT/results.tgz"
}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"
python3 -c "import torch, triton, guided_diffusion; print('torch', torch.__version__, 'triton', triton.__version__,
torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')" 2>&1 | tee -a "$LOG"
# 0. The fused path on tiny U-Nets against float32: if a part fails with this Triton, the later
#    steps switch it back (SETS) instead of losing their numbers.
step 90 python3 benchmarks/smoke.py --out "$RES/sets"
SETS=$(cat "$RES/sets" 2>/dev/null)
echo "=== switches for the later steps: ${SETS:-(none)}" | tee -a "$LOG"
# 1. All three cases with CUDA graphs (adm sample's default on CUDA); 256 was 3.00x on an H100
#    (session 10) and 2.89x on an H200 (session 14). The first large case pays for the large
#    shapes' Triton compiles.
step 150 python3 benchmarks/bench.py --device cuda --cases ddim-256,ddpm-512-guided,ddpm-64-guided --repeats 5 \
    --no-flops --cuda-graph $SETS --json "$RES/graphs.json"
# 2. Candidate forms at the 256x256 model's shapes, each against the shipped one:
#    - the statistics kernel (with the finalize) at every input it reads in a forward, its row loop
#      pipelined (2-4 stages) and at 4 or 5 programs per multiprocessor (session 14: ~1.7 TB/s,
#      4.95 ms per step, less than half its roof; offline, Triton 3.6, sm_90: one 16-row tile in
#      flight per program, 96 registers; pipelined: cp.async, 95-110);
#    - the residual add's statistics epilogue at four geometries, followed by the next norm
#      (addnorm: what the epilogue changes, the finalize of its blocks included; session 14's loop
#      of 128 rows cost 2.7x the plain add);
#    - the skip GEMM at the shipped tiles and five with the decoder's two inputs in one K loop (:1;
#      offline, each part's loop fills and drains its own pipeline), among them smaller tiles that
#      leave room for 3 or 4 programs per multiprocessor (the shipped tiles take 243 registers and
#      96 KB, 2 per SM). It ran at ~1.9 TB/s of its bytes in session 14 (NOTES.md).
#    Separate calls, each with its own limit and JSON, so one cut short cannot lose the others' rows.
step 50 python3 benchmarks/ops.py --model 256x256_diffusion --batch 16 --repeats 10 --groups stats \
    --json "$RES/ops256-stats.json"
step 50 python3 benchmarks/ops.py --model 256x256_diffusion --batch 16 --repeats 10 --groups addnorm \
    --json "$RES/ops256-add.json"
step 100 python3 benchmarks/ops.py --model 256x256_diffusion --batch 16 --repeats 10 --groups skip \
    --tiles 128:128:64:4:3,128:128:64:4:3:1,128:128:64:8:3:1,64:128:64:4:3:1,64:128:32:4:4:1,256:128:64:8:3:1 \
    --json "$RES/ops256-skip.json"
#    Each pick that beats the shipped form by 3% over a forward's calls: the skip GEMM's tiles
#    (--skip-gemm), the residual add's statistics geometry (--add-stats, turning the epilogue on)
#    and the statistics loop (--stats-loop).
PICKS=$(python3 benchmarks/tunables.py "$RES/ops256-stats.json" "$RES/ops256-add.json" "$RES/ops256-skip.json" \
    2>/dev/null)
IFS='|' read -r SKIP_PICK ADD_PICK LOOP_PICK <<< "$PICKS"
ALL=()
for a in "$SKIP_PICK" "$ADD_PICK" "$LOOP_PICK"; do [ -n "$a" ] && ALL+=("$a"); done
PICKS="${ALL[*]}"
echo "=== picks that pay by ops.py: ${PICKS:-(none)}" | tee -a "$LOG"
#    The 256 step with graphs with the picks against the defaults, in one process, the settings
#    taking turns within each repeat (bench.py --variant: whole steps spread 64-68 ms from run to
#    run on the H200, in two clusters; in one process the same reference timings serve all): each
#    pick alone and, if there are several, all of them. If that run breaks, separate runs instead,
#    twice each, alternating.
if [ -n "$PICKS" ]; then
  VARIANTS=()
  [ -n "$SKIP_PICK" ] && VARIANTS+=(--variant "skip=$SKIP_PICK")
  [ -n "$ADD_PICK" ] && VARIANTS+=(--variant "add=$ADD_PICK")
  [ -n "$LOOP_PICK" ] && VARIANTS+=(--variant "loop=$LOOP_PICK")
  [ "${#ALL[@]}" -gt 1 ] && VARIANTS+=(--variant "all=$PICKS")
  step 100 python3 benchmarks/bench.py --device cuda --cases ddim-256 --repeats 10 --no-flops --cuda-graph $SETS \
      "${VARIANTS[@]}" --json "$RES/graphs256-variants.json"
  if ! python3 -c 'import json, sys
sys.exit(not any("variant" in r for r in json.load(open(sys.argv[1]))["rows"]))' "$RES/graphs256-variants.json" \
      2>/dev/null; then
    for k in 1 2; do
      step 45 python3 benchmarks/bench.py --device cuda --cases ddim-256 --repeats 5 --no-flops --cuda-graph $SETS \
          --json "$RES/graphs256-defaults-$k.json"
      step 45 python3 benchmarks/bench.py --device cuda --cases ddim-256 --repeats 5 --no-flops --cuda-graph $SETS \
          $PICKS --json "$RES/graphs256-picks-$k.json"
    done
  fi
fi
# 3. The fused kernels' GPU tests (real sizes; the statistics kept by the closing adds among them, every
#    candidate step 2 times: the skip GEMM's tiles, the statistics geometries, the loops at 2-3 stages).
step 100 python3 -m pytest -q -p no:cacheprovider -rf -m gpu tests/test_fused.py
# 4. Accuracy of the fast path against float32 (TF32 off), full-size 512 and 64 models.
step 70 python3 benchmarks/accuracy.py --dtypes auto $SETS --json "$RES/accuracy.json"
# 5. The 256 step eager, with a profile of ours (GPU time by kernel).
step 60 python3 benchmarks/bench.py --device cuda --cases ddim-256 --repeats 5 $SETS --profile "$RES/prof" \
    --json "$RES/eager256.json"
# 6. The other GPU-marked tests (the compile test, the slowest, last).
step 100 python3 -m pytest -q -p no:cacheprovider -rf -m gpu tests/test_graphs.py tests/test_fast_state.py \
    tests/test_fast.py
# 7. The command line on CUDA: the bundled demo, guided, with graphs (the default) and without
#    (same images within a level), and a refused bad input.
step 60 bash -c 'set -e; for g in "" --no-cuda-graph; do
    python3 -m adm_cli sample --model demo-digits --class 7 -n 16 --seed 3 --guidance 2 --device cuda \
        $g --out /tmp/demo$g -q; done
  python3 -c "import numpy as np; a = np.load(\"/tmp/demo/samples.npz\"); b = np.load(\"/tmp/demo--no-cuda-graph/samples.npz\")
k = a.files[0]; d = np.abs(a[k].astype(int) - b[k].astype(int)); print(\"demo graphs vs eager: shape\", a[k].shape, \"max diff\", d.max(), \"mean\", d.mean())"
  python3 -m adm_cli sample --model demo-digits --class 7 --device cuda:7 --out /tmp/bad || echo "exit $?"'
# 8. The other two cases eager, with profiles.
step 70 python3 benchmarks/bench.py --device cuda --cases ddpm-512-guided,ddpm-64-guided --repeats 5 $SETS \
    --profile "$RES/prof" --json "$RES/eager.json"
echo "=== done $(date +%T), ${SECONDS}s" | tee -a "$LOG"
