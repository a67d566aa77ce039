#!/usr/bin/env bash
# The GPU measurements of the kernels issue, as steps that each fit in one device call (10 minutes).
#
# On the development machine, once (the GPU image lacks lm-eval and pytest):
#   bash ../shared/device/lm-eval-wheels.sh && bash benchmarks/gpu_suite.sh wheels
# Then through the device tool (carry [".whl"]), one call each (each compiles with inductor; together
# they could pass the 10-minute limit of a call), most valuable first:
#   bash benchmarks/gpu_suite.sh env tests              # imports, then the GPU kernel and generation tests
#   bash benchmarks/gpu_suite.sh gemv gemv70            # microbenchmark with the tile sweep: 8B shapes, 70B shape
#   bash benchmarks/gpu_suite.sh decode                 # end-to-end decode (DECODE_LEVELS=0.5,0.7 for a part)
#   bash benchmarks/gpu_suite.sh check prefill          # the lm-eval kernel check, prefill masking
# Each step writes its log (and JSON) to $OUT (the device tool's output folder), else ./gpu_results. A step
# that fails does not stop the later ones; the script exits with the worst status.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"

setup() {
  if ls .whl/*.whl >/dev/null 2>&1 && [ ! -d /tmp/site ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  fi
  export PYTHONPATH="/tmp/site:$PWD:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
}

WORST=0
run_step() {
  local name=$1
  shift
  echo "== $name: $*"
  local start=$SECONDS rc=0
  "$@" 2>&1 | tee "$OUT/$name.log" || rc=$?
  echo "== $name: exit $rc, $((SECONDS - start)) s"
  if [ "$rc" -gt "$WORST" ]; then WORST=$rc; fi
}

for step in "$@"; do  # every name checked before anything runs
  case $step in
    wheels|env|tests|check|gemv|gemv70|decode|prefill) ;;
    *) echo "gpu_suite.sh: unknown step '$step' (wheels env tests check gemv gemv70 decode prefill)" >&2; exit 2 ;;
  esac
done

for step in "$@"; do
  case $step in
    wheels)  # pytest and its dependencies, beside lm-eval's wheels (python 3.12, any platform)
      python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform any -d .whl pytest pluggy iniconfig ;;
    env)
      setup
      # Everything the later steps import, so that a missing wheel shows here and not as a crashed step.
      run_step env bash -c 'nvidia-smi; python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())"; python3 -c "import pytest, datasets, lm_eval.evaluator, lm_sparse.lm, lm_sparse.kernels.sparse_gemv, lm_sparse.kernels.threshold_mask; print(\"imports ok\")"' ;;
    tests)
      setup
      run_step tests python3 -m pytest -q -p no:cacheprovider --durations=25 tests/test_kernels.py \
        tests/test_kernel_generation.py ;;
    check)
      setup
      run_step check python3 benchmarks/lm_eval_kernel_check.py --out /tmp/kcheck --results-copy "$OUT/kcheck_results.json" ;;
    gemv)
      setup
      run_step gemv python3 benchmarks/bench_gemv.py --sweep --shapes 8b-upgate,8b-down,8b-o,8b-qkv \
        --out "$OUT/bench_gemv.json" ;;
    gemv70)
      setup
      run_step gemv70 python3 benchmarks/bench_gemv.py --sweep --shapes 70b-up --out "$OUT/bench_gemv70.json" ;;
    decode)
      setup
      run_step decode python3 benchmarks/bench_decode.py --levels "${DECODE_LEVELS:-0.25,0.4,0.5,0.7}" \
        --out "$OUT/bench_decode.json" ;;
    prefill)
      setup
      run_step prefill python3 benchmarks/bench_prefill_mask.py --out "$OUT/bench_prefill_mask.json" ;;
  esac
done
exit "$WORST"
