# actfleet: `make demo` runs the whole system on this machine; `make test` runs the test suite.
# Each target creates .venv (and node_modules where cdktf is needed) on first use.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ACTFLEET := $(VENV)/bin/actfleet
CONFIG ?= fleet.toml
PYTEST_ARGS ?=
# Tests run in 2 processes (pytest-xdist), a whole file per process so module fixtures (one synth, one fleet,
# one packaged venv) are built once: 1,280 tests take ~15 min on 2 cores instead of ~28 serially.
# `make test PYTEST_WORKERS=0` runs them in one process.
PYTEST_WORKERS ?= 2
# `make test` runs `make lint` (ruff check + ruff format --check, config in pyproject.toml) before the tests;
# `make test RUN_LINT=0` skips it. (Not `LINT`: GNU make predefines LINT = lint, so `LINT ?= 1` never applied.)
RUN_LINT ?= 1
# Terraform reads no user CLI config and never phones home from our commands.
export CHECKPOINT_DISABLE := 1

.PHONY: help prereqs-python prereqs-cloud demo test test-fast lint synth plan deploy destroy reconcile status \
        export-hcl bench lock clean

help:
	@echo "make demo        run actfleet locally: tiny model, bundled dataset, 3 workers, chaos on"
	@echo "make test        run the test suite (creates .venv and node_modules first; make lint first, RUN_LINT=0: not)"
	@echo "make lint        ruff check and ruff format --check (the pinned ruff of the test extra)"
	@echo "make synth|plan|deploy|destroy   the cloud stacks, for CONFIG=$(CONFIG)"
	@echo "make reconcile   one reconcile pass (run it on a timer; README 'Operations')"
	@echo "make export-hcl  write the stacks as plain HCL (the exit path off cdktf)"
	@echo "make bench       run the benchmarks in bench/"
	@echo "make lock        regenerate bootstrap/requirements-*.txt (what TPU VMs install) from PyPI"

prereqs-python:
	@command -v $(PYTHON) >/dev/null || { echo "make: python3 not found: install Python >= 3.11" >&2; exit 3; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "make: $$($(PYTHON) --version) is too old: actfleet needs Python >= 3.11 (set PYTHON=...)" >&2; exit 3; }

prereqs-cloud:
	@command -v node >/dev/null || { echo "make: node not found: install Node.js >= 20 (cdktf-cli needs it)" >&2; exit 3; }
	@node -e 'process.exit(Number(process.versions.node.split(".")[0]) < 20 ? 1 : 0)' || \
	  { echo "make: node $$(node --version) is too old: cdktf-cli 0.21.0 needs Node.js >= 20" >&2; exit 3; }
	@command -v npm >/dev/null || { echo "make: npm not found: install npm (comes with Node.js)" >&2; exit 3; }
	@command -v terraform >/dev/null || { echo "make: terraform not found: install Terraform >= 1.5" >&2; exit 3; }
	@terraform version -json 2>/dev/null | $(PYTHON) -c 'import json,sys; v=json.load(sys.stdin)["terraform_version"].split("."); sys.exit((int(v[0]),int(v[1]))<(1,5))' || \
	  { echo "make: terraform $$(terraform version | head -1) is too old: actfleet needs Terraform >= 1.5" >&2; exit 3; }

# The base install (extractor, work queue, local demo).
$(VENV)/.base: pyproject.toml | prereqs-python
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

# What synth, plan, deploy and reconcile need: the cloud pins (the PR plan workflow installs only this).
$(VENV)/.cloud: pyproject.toml $(VENV)/.base
	$(PY) -m pip install -q -e '.[cloud]'
	touch $@

# Everything the tests need: the cloud pins, the test tools and SAELens (a real consumer of exports), then
# `tf`, the framework of the tests' google provider stand-in, --no-deps past its protobuf<6 pin (pyproject.toml).
$(VENV)/.full: pyproject.toml $(VENV)/.cloud
	$(PY) -m pip install -q -e '.[cloud,test,saelens]'
	$(PY) -m pip install -q --no-deps tf==1.2.0
	touch $@

node_modules/.installed: package.json package-lock.json | prereqs-cloud
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

demo: $(VENV)/.base
	$(ACTFLEET) local --workers 3 --chaos 0.1 --out demo-out

test: $(VENV)/.full node_modules/.installed $(if $(filter 1,$(RUN_LINT)),lint)
	PATH="$(CURDIR)/node_modules/.bin:$$PATH" $(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: $(VENV)/.full
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test-fast: $(VENV)/.full node_modules/.installed
	PATH="$(CURDIR)/node_modules/.bin:$$PATH" $(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

synth plan deploy destroy: $(VENV)/.cloud node_modules/.installed
	PATH="$(CURDIR)/node_modules/.bin:$$PATH" $(ACTFLEET) $@ --config $(CONFIG)

reconcile: $(VENV)/.cloud node_modules/.installed
	PATH="$(CURDIR)/node_modules/.bin:$$PATH" $(ACTFLEET) reconcile --config $(CONFIG)

status: $(VENV)/.base
	$(ACTFLEET) status --config $(CONFIG)

export-hcl: $(VENV)/.cloud node_modules/.installed
	PATH="$(CURDIR)/node_modules/.bin:$$PATH" ACTFLEET_CONFIG=$(CONFIG) npx --no-install cdktf synth --hcl --output cdktf.out.hcl

bench: $(VENV)/.full node_modules/.installed
	PATH="$(CURDIR)/node_modules/.bin:$$PATH" $(PY) bench/synth.py
	$(PY) bench/extract_vs_hf.py
	$(PY) bench/pipeline.py
	$(PY) bench/reconcile.py

# The TPU VMs' lock (docs/infrastructure.md, "Pinned packages"): resolved from PyPI by the same pinned uv the VMs
# install, for the pinned CPython on x86_64 Linux (glibc 2.35: Ubuntu 22.04, the TPU images), with hashes.
# `make lock` keeps existing pins and adds what pyproject.toml newly needs; `make lock UPGRADE=1` takes the newest.
LOCK_PYTHON = $(shell cat bootstrap/python-version)
$(VENV)/bin/uv: bootstrap/requirements-uv.txt $(VENV)/.base
	$(PY) -m pip install -q --require-hashes --no-deps -r bootstrap/requirements-uv.txt
	touch $@

lock: $(VENV)/bin/uv
	$(VENV)/bin/uv pip compile --quiet $(if $(UPGRADE),--upgrade) --generate-hashes --custom-compile-command "make lock" \
	  -o bootstrap/requirements-uv.txt bootstrap/requirements-uv.in
	$(VENV)/bin/uv pip compile --quiet $(if $(UPGRADE),--upgrade) --generate-hashes --custom-compile-command "make lock" \
	  --python-version $(LOCK_PYTHON) --python-platform x86_64-manylinux_2_35 --extra tpu \
	  -o bootstrap/requirements-tpu.txt pyproject.toml bootstrap/requirements-build.in

clean:
	rm -rf cdktf.out cdktf.out.hcl .actfleet demo-out .pytest_cache
