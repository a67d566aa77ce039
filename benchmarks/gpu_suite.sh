#!/usr/bin/env bash
# The GPU measurements of the kernels issue, as named steps.
#
# On the development machine, once (the GPU image lacks lm-eval):
#   bash ../shared/device/lm-eval-wheels.sh && bash benchmarks/gpu_suite.sh wheels
# A task's whole device time is 15 minutes (machine start included), so the first GPU session runs ONE call
# (carry [".whl"], timeout_s 570) that does every measurement at reduced size, most valuable first:
#   bash benchmarks/gpu_suite.sh lease
# = env, check (the lm-eval kernel check), prefill, gemv-lease (8B up/gate and down, batch 1/2/4/8, s 0/0.5/0.9,
# small tile sweep), decode (dense, then TEAL 0.5, 0.7, 0.25, 0.4; one compiled step serves every level),
# tests-kernels, tests-generation. They share LEASE_SECONDS (default 510): a step gets at most its own cap
# and what is left, one past its time is stopped (exit 124) with what it wrote kept, and a step that fails
# does not stop the next. Its output goes to one log, $OUT/lease.log, beside the steps' JSON files (the
# device tool brings back at most 8 files).
# Full-size steps for a longer lease, one call each: env tests | gemv gemv70 | decode | check prefill.
# Each step writes its log (and JSON) to $OUT (the device tool's output folder), else ./gpu_results; the
# script exits with the worst status.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"

STEP_NAMES="wheels lease lease-tune env tests tests-kernels tests-generation check gemv gemv-lease gemv70 decode prefill
            gemv-b1 gemv-batch decode-tuned"
# Each step's own cap in seconds under `lease` (estimates for an H100/H200, from the steps' sizes).
# Cheapest first, so a slow compile in the decode step (two torch.compile runs of a 32-layer model) costs the
# tests at the end, not the other measurements.
declare -A LEASE_CAP=([env]=60 [check]=120 [prefill]=75 [gemv-lease]=150 [decode]=300 [tests-kernels]=180
                      [tests-generation]=180)
LEASE_STEPS=(env check prefill gemv-lease decode tests-kernels tests-generation)
# `lease-tune`: the kernels' tiles measured and used in the same call. gemv-b1 sweeps batch 1 on the shapes a
# TEAL decode step runs (fused gate+up, down, fused qkv, o) and the issue's up/gate, writing the winners to
# $OUT/gemv_configs.json; decode-tuned decodes with them (LM_SPARSE_GEMV_CONFIGS); gemv-batch is batch 2/4/8.
LEASE_TUNE_STEPS=(gemv-b1 decode-tuned tests-kernels gemv-batch tests-generation)
LEASE_CAP+=([gemv-b1]=150 [decode-tuned]=150 [gemv-batch]=90)

setup() {
  if ls .whl/*.whl >/dev/null 2>&1 && [ ! -d /tmp/site ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  fi
  export PYTHONPATH="/tmp/site:$PWD:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
}

WORST=0
DEADLINE=  # under `lease`: the SECONDS value by which every step must have ended
LOG=       # under `lease`: the one log every step appends to
run_step() {  # run_step NAME CAP COMMAND...
  local name=$1 cap=$2
  shift 2
  local start=$SECONDS rc=0 limit=() left=none log=${LOG:-$OUT/$name.log}
  if [ -n "$DEADLINE" ]; then
    left=$((DEADLINE - SECONDS))
    if [ "$left" -lt 20 ]; then
      echo "== $name: skipped, the lease's time is spent" | tee -a "$log"
      if [ "$WORST" -lt 124 ]; then WORST=124; fi
      return
    fi
    if [ "$cap" -lt "$left" ]; then left=$cap; fi
    limit=(timeout --kill-after=15 "$left")  # signals the step's whole process group (lm-eval's too)
  fi
  echo "== $name (limit: $left s): $*" | tee -a "$log"
  "${limit[@]}" "$@" 2>&1 | tee -a "$log" || rc=$?
  echo "== $name: exit $rc, $((SECONDS - start)) s" | tee -a "$log"
  if [ "$rc" -gt "$WORST" ]; then WORST=$rc; fi
}

for step in "$@"; do  # every name checked before anything runs
  if [[ " $STEP_NAMES " != *" $step "* ]]; then
    echo "gpu_suite.sh: unknown step '$step' ($STEP_NAMES)" >&2
    exit 2
  fi
done
STEPS=("$@")
if [ "${STEPS[*]}" = lease ] || [ "${STEPS[*]}" = lease-tune ]; then
  DEADLINE=$((SECONDS + ${LEASE_SECONDS:-510}))
  LOG=$OUT/lease.log
  : > "$LOG"
  if [ "${STEPS[*]}" = lease ]; then STEPS=("${LEASE_STEPS[@]}"); else STEPS=("${LEASE_TUNE_STEPS[@]}"); fi
  DECODE_LEVELS=${DECODE_LEVELS:-0.5,0.7,0.25,0.4}  # the targets' level first: a cut-off run still has it
elif [[ " ${STEPS[*]} " == *" lease "* || " ${STEPS[*]} " == *" lease-tune "* ]]; then
  echo "gpu_suite.sh: lease and lease-tune run alone (each is a whole device call)" >&2
  exit 2
fi

for step in "${STEPS[@]}"; do
  cap=${LEASE_CAP[$step]:-0}
  case $step in
    wheels)  # pytest and its dependencies, beside lm-eval's wheels (python 3.12, any platform)
      python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform any -d .whl pytest pluggy iniconfig ;;
    env)
      setup
      # Everything the later steps import, so that a missing wheel shows here and not as a crashed step.
      run_step env "$cap" bash -c 'nvidia-smi; python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else \"no CUDA\")"; python3 -c "import pytest, datasets, lm_eval.evaluator, lm_sparse.lm, lm_sparse.kernels.sparse_gemv, lm_sparse.kernels.threshold_mask; print(\"imports ok\")"' ;;
    tests)
      setup
      run_step tests "$cap" python3 -m pytest -q -p no:cacheprovider --durations=25 tests/test_kernels.py \
        tests/test_kernel_generation.py tests/test_sparse_hf_kernel_generation.py ;;
    tests-kernels)
      setup
      run_step tests-kernels "$cap" python3 -m pytest -q -p no:cacheprovider --durations=10 tests/test_kernels.py ;;
    tests-generation)
      setup
      run_step tests-generation "$cap" python3 -m pytest -q -p no:cacheprovider --durations=10 \
        tests/test_kernel_generation.py tests/test_sparse_hf_kernel_generation.py ;;
    check)
      setup
      run_step check "$cap" python3 benchmarks/lm_eval_kernel_check.py --out /tmp/kcheck \
        --results-copy "$OUT/kcheck_results.json" ;;
    gemv)
      setup
      run_step gemv "$cap" python3 benchmarks/bench_gemv.py --sweep --shapes 8b-upgate,8b-down,8b-o,8b-qkv \
        --out "$OUT/bench_gemv.json" ;;
    gemv-lease)
      setup
      run_step gemv-lease "$cap" python3 benchmarks/bench_gemv.py --sweep --sweep-grid small \
        --shapes 8b-upgate,8b-down --sparsities 0,0.5,0.9 --out "$OUT/bench_gemv_lease.json" ;;
    gemv70)
      setup
      run_step gemv70 "$cap" python3 benchmarks/bench_gemv.py --sweep --shapes 70b-up --out "$OUT/bench_gemv70.json" ;;
    decode)
      setup
      run_step decode "$cap" python3 benchmarks/bench_decode.py --levels "${DECODE_LEVELS:-0.25,0.4,0.5,0.7}" \
        --profile-steps 32 --out "$OUT/bench_decode.json" ;;
    gemv-b1)
      setup
      run_step gemv-b1 "$cap" python3 benchmarks/bench_gemv.py --sweep --sweep-grid small --batches 1 \
        --shapes 8b-gateup,8b-down,8b-qkv,8b-o,8b-upgate --out "$OUT/bench_gemv_b1.json" \
        --write-configs "$OUT/gemv_configs.json" ;;
    gemv-batch)
      setup
      run_step gemv-batch "$cap" python3 benchmarks/bench_gemv.py --sweep --sweep-grid small --batches 2,4,8 \
        --shapes 8b-upgate,8b-down --out "$OUT/bench_gemv_batch.json" \
        --write-configs "$OUT/gemv_configs_batch.json" ;;
    decode-tuned)
      setup
      if [ -s "$OUT/gemv_configs.json" ]; then export LM_SPARSE_GEMV_CONFIGS=$OUT/gemv_configs.json; fi
      run_step decode-tuned "$cap" python3 benchmarks/bench_decode.py --levels "${DECODE_LEVELS:-0.25,0.4,0.5,0.7}" \
        --repeats 2 --profile-steps 32 --out "$OUT/bench_decode_tuned.json"
      unset LM_SPARSE_GEMV_CONFIGS
      if [ -s "$OUT/bench_gemv_b1.json" ] && [ -s "$OUT/bench_decode_tuned.json" ]; then  # the bound, no GPU
        python3 benchmarks/decode_bound.py --gemv "$OUT/bench_gemv_b1.json" \
          --decode "$OUT/bench_decode_tuned.json" 2>&1 | tee -a "${LOG:-$OUT/decode-tuned.log}" || true
      fi ;;
    prefill)
      setup
      run_step prefill "$cap" python3 benchmarks/bench_prefill_mask.py --out "$OUT/bench_prefill_mask.json" ;;
  esac
done
exit "$WORST"
