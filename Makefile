# spineseg: `make demo` runs the whole chain on synthetic X-rays, `make test` the tests.
# Both install what they need: uv (bootstrapped if absent), then `uv sync --locked`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

UV := $(shell command -v uv 2>/dev/null)
ifeq ($(UV),)
UV := $(CURDIR)/.tools/bin/uv
endif
RUN := $(UV) run --no-sync
PYTEST_ARGS ?=
# pytest-xdist workers for `make test` and `make test-all` (1: one process)
TEST_WORKERS ?= auto

# reproduce-paper knobs
DATA ?= synthetic
SWEEP ?= lite20
TRAINER ?= cpu
LAUNCHER ?= basic
RUN_NAME ?= $(DATA)-$(SWEEP)
EXTRA ?=

.PHONY: help setup test test-readme test-all lint format demo reproduce-paper gallery bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

$(CURDIR)/.tools/bin/uv:
	@echo "uv not found: installing it into .tools/ (python3 -m venv + pip)"
	@python3 -m venv $(CURDIR)/.tools && $(CURDIR)/.tools/bin/python -m pip install -q uv \
	  || (rm -rf $(CURDIR)/.tools && python3 -m pip install -q --user uv \
	      && mkdir -p $(CURDIR)/.tools/bin && ln -sf $$(python3 -m site --user-base)/bin/uv $(CURDIR)/.tools/bin/uv)

.venv/.synced: uv.lock pyproject.toml | $(UV)
	$(UV) sync --locked --all-extras --compile-bytecode  # compiled: each process starts in half the time
	@touch $@
	@echo "installed into .venv/: 'source .venv/bin/activate' puts the spineseg-* commands on your PATH"

setup: .venv/.synced  ## install everything (uv sync --locked, with dev extras)

test: setup  ## run the default test suite (CPU, < 10 min; one worker per core)
	$(RUN) pytest -q -m "not slow and not readme" -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-readme: setup  ## every shell command of README.md and docs/, as written, at tiny scale
	$(RUN) pytest -q -m readme $(PYTEST_ARGS)

test-all: setup  ## every test, including the slow end-to-end ones
	$(RUN) pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: setup  ## ruff
	$(RUN) ruff check . && $(RUN) ruff format --check spineseg tests benchmarks

format: setup
	$(RUN) ruff format spineseg tests benchmarks && $(RUN) ruff check --fix .

demo: setup  ## the whole study on synthetic X-rays, CPU, minutes
	$(RUN) spineseg-study experiment=demo $(EXTRA)

reproduce-paper: setup  ## DATA=synthetic|aasce_paper|folder SWEEP=lite20|paper20 TRAINER=cpu|gpu LAUNCHER=basic|joblib|submitit_slurm
	$(RUN) spineseg-study experiment=paper data=$(DATA) sweep=$(SWEEP) trainer=$(TRAINER) \
	  hydra/launcher=$(LAUNCHER) run=$(RUN_NAME) $(EXTRA)

gallery: setup  ## PNG gallery of synthetic films with mask overlays
	$(RUN) spineseg-gallery

bench: setup  ## benchmarks (figures in the README)
	$(RUN) python benchmarks/bench_training.py
	$(RUN) python benchmarks/bench_data.py
	$(RUN) python benchmarks/bench_ensemble.py
	$(RUN) python benchmarks/bench_predict.py

clean:  ## remove caches (decoded films, pytest, ruff); trained runs in outputs/ are kept
	rm -rf .cache .pytest_cache .ruff_cache
