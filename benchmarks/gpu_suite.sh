#!/usr/bin/env bash
# The GPU measurements of the kernels issue, as steps that each fit in one device call (10 minutes).
#
# On the development machine, once (the GPU image lacks lm-eval and pytest):
#   bash ../shared/device/lm-eval-wheels.sh && bash benchmarks/gpu_suite.sh wheels
# Then through the device tool (carry [".whl"]), one call each (each compiles with inductor; together
# they could pass the 10-minute limit of a call):
#   bash benchmarks/gpu_suite.sh env tests              # GPU kernel and generation tests (CUDA graphs)
#   bash benchmarks/gpu_suite.sh check prefill          # the lm-eval kernel check, prefill masking
#   bash benchmarks/gpu_suite.sh gemv                   # microbenchmark, Llama-3-8B shapes, with the sweep
#   bash benchmarks/gpu_suite.sh gemv70                 # microbenchmark, the 70B shape
#   bash benchmarks/gpu_suite.sh decode                 # end-to-end decode (DECODE_LEVELS=0.5,0.7 for a part)
# Each step writes its log (and JSON) to $OUT (the device tool's output folder), else ./gpu_results.
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

run_step() {
  local name=$1
  shift
  echo "== $name: $*"
  local start=$SECONDS
  "$@" 2>&1 | tee "$OUT/$name.log"
  echo "== $name: $((SECONDS - start)) s"
}

for step in "$@"; do
  case $step in
    wheels)  # pytest and its dependencies, beside lm-eval's wheels (python 3.12, any platform)
      python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform any -d .whl pytest pluggy iniconfig ;;
    env)
      setup
      run_step env bash -c 'nvidia-smi; python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())"' ;;
    tests)
      setup
      run_step tests python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_kernel_generation.py ;;
    check)
      setup
      run_step check python3 benchmarks/lm_eval_kernel_check.py --out /tmp/kcheck ;;
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
    *)
      echo "gpu_suite.sh: unknown step '$step' (wheels env tests check gemv gemv70 decode prefill)" >&2
      exit 2 ;;
  esac
done
