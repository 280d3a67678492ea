#!/usr/bin/env bash
# Every GPU check fusemerge has, in one command (a lent GPU machine bills by the minute):
#   1. the machine (GPU, driver, torch, triton)
#   2. GPU tests: the Triton kernels on CUDA against the torch backend and the float64 oracle, and
#      byte-identical output across devices and backends (tests/test_determinism.py); then
#      bench/gpu_rescale_check.py: a trim's L1 rescale on CUDA against the CPU's bytes
#   3. bench/kernels.py: fused-kernel GB/s vs the device-to-device copy, side by side with eager torch
#      (once per dtype in KERNELS_DTYPES, default bfloat16)
#   4. sweep: ties / dare_ties / task arithmetic, N = 8, over the merge kernel's launch choices (SWEEP entries
#      "BLOCK/num_warps/unroll/late_count", see triton_merge.UNROLL and LATE_COUNT)
#   5. bench/e2e.py --device cuda (fusemerge only) on the 168M Llama shape
#   6. bench/scale.py: 64B-class layer shapes on an 8 GiB budget
# Run from the repository root:  bash bench/gpu_checks.sh      (logs and CSVs under $OUT or bench/results/gpu)
# Skip steps with SKIP="tests e2e" etc.; extra arguments per step in PYTEST_ARGS, KERNELS_ARGS, E2E_ARGS;
# TEST_PATHS replaces the test step's paths; MERGEKIT_CMD="python3 -m mergekit.scripts.run_yaml" runs mergekit
# side by side in the e2e step. A 15-minute lease: see bench/README.md ("gpu_checks.sh").
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results/gpu}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
skip="${SKIP:-}"
step() { [[ " $skip " != *" $1 "* ]]; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  nproc; free -g | head -2; } 2>&1 | tee "$out/env.txt"

if step tests; then
  # The CPU-only kernel tests (compiled loops, mask workers) are left out: CI runs them. -v names each result as it
  # comes, so a run stopped by TEST_S still says which tests failed (2026-12-04, H200: the default paths then took
  # over 290 s with 15 workers; --durations names the slowest).
  xdist=""; python3 -c "import xdist" 2>/dev/null && xdist="-n ${TEST_WORKERS:-12}"
  timeout "${TEST_S:-300}" python3 -m pytest -v -rf --tb=short --durations=15 -p no:cacheprovider $xdist \
    ${TEST_PATHS:-tests/kernels tests/test_determinism.py tests/streaming/test_pipeline.py tests/test_nonfinite.py \
      tests/test_mixed_dtypes.py tests/test_della_files.py --ignore=tests/kernels/test_cpu_fused.py \
      --ignore=tests/kernels/test_philox_native.py --ignore=tests/kernels/test_dare_masks.py \
      --ignore=tests/kernels/test_select_workers.py} \
    ${PYTEST_ARGS:-} > "$out/pytest.log" 2>&1
  echo "pytest rc=$? passed $(grep -c ' PASSED ' "$out/pytest.log") failed $(grep -c ' FAILED ' "$out/pytest.log")"
  grep "^FAILED\|^ERROR" "$out/pytest.log" | head -30; tail -3 "$out/pytest.log"
fi
if step rescale; then
  # a trim's L1 rescale on CUDA (reference.l1_fixed_top's torch operations) gives the CPU's bytes
  timeout "${RESCALE_S:-90}" python3 bench/gpu_rescale_check.py > "$out/rescale.log" 2>&1
  echo "rescale rc=$?"; grep -c "^ok" "$out/rescale.log"; grep "^FAIL\|Error" "$out/rescale.log" | head
fi
if step kernels; then
  for dtype in ${KERNELS_DTYPES:-bfloat16}; do
    timeout "${KERNELS_S:-300}" python3 bench/kernels.py --dtype "$dtype" --results "$out/kernels.csv" ${KERNELS_ARGS:-} \
      2>&1 | tee -a "$out/kernels.log"
  done
fi
if step sweep; then
  # BLOCK/num_warps/unroll/late_count (late_count 0 or 1); merge rows count NaN / Inf, as a merge does
  for c in ${SWEEP:-1024/4/1/0 1024/4/2/0 1024/4/1/1 1024/4/2/1 512/2/2/1 2048/8/2/1 512/4/1/0 2048/4/1/0}; do
    IFS=/ read -r blk wrp unr late <<< "$c"
    lc=$([ "$late" = 1 ] && echo --late-count || echo --no-late-count)
    echo "## sweep: BLOCK=$blk num_warps=$wrp unroll=$unr $lc" | tee -a "$out/sweep.log"
    timeout "${SWEEP_S:-60}" python3 bench/kernels.py --providers fusemerge-triton --methods ${SWEEP_METHODS:-ties dare_ties task_arithmetic} \
      --experts 8 --no-select --block "$blk" --num-warps "$wrp" --unroll "$unr" $lc --results "$out/sweep.csv" 2>&1 \
      | tee -a "$out/sweep.log" | grep "^| merge |"
  done
fi
if step e2e; then
  timeout "${E2E_S:-240}" python3 bench/e2e.py --device cuda --tools "${E2E_TOOLS:-fusemerge}" --workdir /tmp/fm-e2e \
    --results "$out/e2e.csv" ${MERGEKIT_CMD:+--mergekit-cmd "$MERGEKIT_CMD"} ${E2E_ARGS:-} 2>&1 | tee "$out/e2e.log" | tail -30
  cp /tmp/fm-e2e/fusemerge.log "$out/e2e-fusemerge.log" 2>/dev/null
fi
if step scale; then
  timeout "${SCALE_S:-420}" python3 bench/scale.py --results "$out/scale.csv" ${SCALE_ARGS:-} 2>&1 | tee "$out/scale.log" | tail -20
fi
