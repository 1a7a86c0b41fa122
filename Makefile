# thaw — make help lists the targets.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.DEFAULT_GOAL := help
.PHONY: help install test test-fast lint format demo compile bench sample-data stack-up stack-down clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install thaw with its dev extras (once)

test: install ## run every test tier on CPU (unit, data, integration, end-to-end)
	MLFLOW_DISABLE_TELEMETRY=true $(PY) -m pytest

test-fast: install ## only the fast unit and data tests
	$(PY) -m pytest -m "not slow and not e2e"

lint: install ## ruff
	$(BIN)/ruff check .

format: install ## ruff format + import sorting
	$(BIN)/ruff check --fix --select I .
	$(BIN)/ruff format .

demo: install ## start the embedded stack and run the whole pipeline on the sample dataset
	MLFLOW_DISABLE_TELEMETRY=true $(BIN)/thaw demo

compile: install ## write the pipeline YAML to upload in the Kubeflow UI
	$(BIN)/thaw compile --output pipelines/thaw_pipeline.yaml

bench: install ## speed and quality benchmarks, JSON out (benchmarks/results/)
	$(PY) benchmarks/stages.py --output benchmarks/results/stages.json

sample-data: install ## regenerate the committed Fashion-MNIST sample (needs dataset-fashion-mnist)
	$(PY) -m thaw.data.fashion_mnist --out thaw/sample_data/fashion-mnist-sample --per-class 60

stack-up: install ## start the local S3 server + MLflow server (prints the env to export)
	$(BIN)/thaw stack up

stack-down: install ## stop them
	$(BIN)/thaw stack down

clean: ## remove the venv and local run outputs
	rm -rf $(VENV) .thaw local_outputs
