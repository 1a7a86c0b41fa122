# thaw — make help lists the targets.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

# The image every pipeline step runs in (docker/README.md); the compiled pipeline names it.
VERSION := $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' pyproject.toml | head -1)
REGISTRY ?= ghcr.io/thaw-ml
IMAGE ?= $(REGISTRY)/thaw:$(VERSION)
BASE_IMAGE ?= python:3.11-slim
PREFETCH_BACKBONES ?=
# The KFP release `make e2e-kind` installs: a tag, or minimum (MIN_KFP_BACKEND of the pipeline).
KFP_VERSION ?= minimum
CONTAINER_ENGINE ?=
# Test processes of `make test` (pytest-xdist; each test file stays in one process, so its
# module fixtures are built once): one per core.
TEST_WORKERS ?= $(shell nproc 2>/dev/null || echo 2)
IMAGE_ENV = IMAGE='$(IMAGE)' VERSION='$(VERSION)' BASE_IMAGE='$(BASE_IMAGE)' \
	PREFETCH_BACKBONES='$(PREFETCH_BACKBONES)' CONTAINER_ENGINE='$(CONTAINER_ENGINE)'

.DEFAULT_GOAL := help
.PHONY: help install test test-all test-fast lint format demo compile bench bench-quality bench-throughput gpu-check sample-data stack-up stack-down clean
.PHONY: image image-name image-if-engine push base-image e2e-kind

help: ## list the targets
	@grep -hE '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install thaw with its dev extras (once)

# `make test` leaves out the tests marked nightly: longer variants of what it runs on a
# shorter path (pyproject.toml lists the markers). `make test-all` runs them too.
PYTEST_XDIST = -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: install image-if-engine ## every test tier on CPU but the nightly variants, the image built and run (PYTEST_ARGS to narrow, TEST_WORKERS=0 for one process)
	MLFLOW_DISABLE_TELEMETRY=true $(PY) -m pytest $(PYTEST_XDIST) -m "not nightly" $(PYTEST_ARGS)

test-all: install image-if-engine ## make test plus the nightly variants (whole extra pipeline runs, 3-process DDP)
	MLFLOW_DISABLE_TELEMETRY=true $(PY) -m pytest $(PYTEST_XDIST) $(PYTEST_ARGS)

test-fast: install ## only the fast unit and data tests
	$(PY) -m pytest -m "not slow and not e2e and not container"

lint: install ## ruff
	$(BIN)/ruff check .

format: install ## ruff format + import sorting
	$(BIN)/ruff check --fix --select I .
	$(BIN)/ruff format .

demo: install ## start the embedded stack and run the whole pipeline on the sample dataset
	MLFLOW_DISABLE_TELEMETRY=true $(BIN)/thaw demo

compile: install ## write the pipeline YAML to upload in the Kubeflow UI
	$(BIN)/thaw compile --output pipelines/thaw_pipeline.yaml

bench: install ## stage speed and loop efficiency on the sample, JSON out (benchmarks/results/)
	$(PY) benchmarks/stages.py --output benchmarks/results/stages.json

bench-quality: install ## thaw vs the reference script on the report datasets, 2 budgets, 3 seeds (~90 min on 2 cores)
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) benchmarks/quality.py $(BENCH_ARGS)

bench-throughput: install ## loop images/s vs the model's own on device tensors, then preprocess images/s, RSS and disk at 10k/100k images; JSON out (BENCH_ARGS for the loop)
	$(PY) benchmarks/throughput.py $(BENCH_ARGS)
	$(PY) benchmarks/throughput_preprocess.py

gpu-check: install ## GPU acceptance run on one CUDA GPU (<= 8 min): ResNet-50 loop vs device tensors +- torch.compile, host-sync check, torchrun stage; JSON out (BENCH_ARGS=--dry-run: CPU)
	$(PY) benchmarks/gpu_check.py $(BENCH_ARGS)

sample-data: install ## regenerate the committed Fashion-MNIST sample (needs dataset-fashion-mnist)
	$(PY) -m thaw.data.fashion_mnist --out thaw/sample_data/fashion-mnist-sample --per-class 60

stack-up: install ## start the local S3 server + MLflow server (prints the env to export)
	$(BIN)/thaw stack up

stack-down: install ## stop them
	$(BIN)/thaw stack down

image: ## build the step image (REGISTRY/thaw:VERSION) with podman or docker
	@$(IMAGE_ENV) docker/build-image.sh build

image-name: ## print the image name the pipeline uses
	@echo '$(IMAGE)'

image-if-engine: ## make image if an engine answers; else say the container tier is skipped
	@$(IMAGE_ENV) docker/build-image.sh if-engine

push: image ## push the image: make push REGISTRY=registry.example.com/team
	@$(IMAGE_ENV) docker/build-image.sh push

base-image: ## build the local python:3.11-slim stand-in (root, debootstrap; no registry)
	CONTAINER_ENGINE='$(CONTAINER_ENGINE)' docker/base-image.sh

e2e-kind: ## kind + KFP standalone (KFP_VERSION) + the image built here, thaw submit --wait
	infra/ci/e2e-kind.sh '$(KFP_VERSION)'

clean: ## remove the venv and local run outputs
	rm -rf $(VENV) .thaw local_outputs
