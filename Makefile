# mammoscreen: `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# The CPU build lies on these machines' disk; an open-ended torch would pull a CUDA build.
TORCH_VERSION := 2.13.0
STAMP := $(VENV)/.installed
STACK_DIR := .stack

.DEFAULT_GOAL := help
.PHONY: help install up down demo test test-fast lint format clean bench bench-model bench-warm-start bench-site browser dicom-tools gpu-wheels

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv with torch (CPU build here) and the project; idempotent

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet -e '.[worker,dev]'
	touch $(STAMP)

up: install ## start Postgres, Redis, S3, migrations, ingest, results and a worker in the background
	$(BIN)/screening stack up --dir $(STACK_DIR)

down: ## stop everything `make up` started
	@if [ -x $(BIN)/screening ]; then $(BIN)/screening stack down --dir $(STACK_DIR); fi

demo: install ## start the stack, screen 8 synthetic exams end to end, print results, stop
	$(BIN)/screening demo --dir $(STACK_DIR) --exams 8

# Test processes (pytest-xdist), each with its own servers; files are kept whole in one
# process, so a module's fixtures are built once, and taken in the order tests/conftest.py
# collects them (slow files first; xdist's own order, most tests first, ran them last).
# TEST_WORKERS=0 runs in this process.
TEST_WORKERS ?= 2
test: install browser dicom-tools ## run the whole test suite against real servers
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-fast: install browser dicom-tools ## every test but the slow ones (training to a verdict, the fault tests, the bench's smoke run)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow"

# The viewer's browser tests drive Debian's Chromium through Playwright (no browser download).
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser: ## install Debian's Chromium for the browser tests, when missing
	@test -x $(CHROMIUM) || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium >/dev/null; }
	@$(CHROMIUM) --version

# The DICOM tests talk to tools and servers others wrote, from Debian: dcmtk (echoscu,
# storescu, dsrdump), dicom3tools' dciodvfy, and Orthanc with its DICOMweb plugin as the
# hospital PACS.
ORTHANC_DICOMWEB := /usr/share/orthanc/plugins/libOrthancDicomWeb.so
dicom-tools: ## install Debian's dcmtk, dicom3tools and Orthanc for the DICOM tests, when missing
	@{ command -v storescu >/dev/null && command -v dsrdump >/dev/null && command -v dciodvfy >/dev/null \
		&& command -v Orthanc >/dev/null && test -f $(ORTHANC_DICOMWEB); } || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends \
		dcmtk dicom3tools orthanc orthanc-dicomweb >/dev/null; }
	@storescu --version | head -1; Orthanc --version | head -1; test -f $(ORTHANC_DICOMWEB)

bench: install ## throughput benchmark on the real stack: prints and writes bench/results.json
	$(BIN)/python -m bench.throughput --out bench/results.json

# The dependencies a lent GPU machine's image lacks, as CPython 3.12 wheels: the `device` tool
# carries .gpu-wheels/ there for bench/gpu_local.sh (the machine reaches no registry).
GPU_WHEELS := annotated-types argon2-cffi argon2-cffi-bindings cffi greenlet minio pycparser \
	pycryptodome pydantic pydantic-core pydantic-settings pydicom pyjpegls pylibjpeg \
	pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle python-dotenv sqlalchemy typing-inspection

gpu-wheels: install ## wheels for bench/gpu_local.sh on a lent GPU machine, into .gpu-wheels/
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 --platform any -d .gpu-wheels $(GPU_WHEELS)

bench-model: install ## train through the API on 800 synthetic exams, test on a fresh set: bench/model.json
	$(BIN)/python -m bench.model --out bench/model.json

bench-warm-start: install ## 5-fold CV on 150 film-scan exams: scratch vs warm start: bench/warm_start.json
	$(BIN)/python -m bench.warm_start --out bench/warm_start.json

bench-site: install browser ## the shipped model evaluated at two sites (outcomes, evaluation, operating point): bench/site_evaluation.json
	$(BIN)/python -m bench.site_evaluation --out bench/site_evaluation.json

lint: install ## ruff (lint and format check) and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy shared services bench cli devstack client/mammoscreen_client

format: install ## apply ruff's formatting and safe fixes
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean: down ## remove the virtual environment and local stack data
	rm -rf $(VENV) $(STACK_DIR) .pytest_cache .mypy_cache .ruff_cache
