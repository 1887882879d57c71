# streamscore: the two Quick start commands are `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
export PYSPARK_PYTHON := $(abspath $(BIN)/python)
# mypy cannot follow the package-dir mapping of an editable install: it checks a staged copy of
# the package as it is installed (streamscore/ with jobs/, scoring/, ... as subpackages).
TYPECHECK := build/typecheck

.PHONY: setup setup-dev demo test unit lint typecheck bench services-stop clean

# Installs go through uv (from PyPI, into the venv): the same packages as pip, resolved and
# unpacked in parallel. Each command installs what it needs: the demo the runtime and local Spark,
# the tests also the other extras (Azure ML, Databricks) and the test and lint tools.
# uv does not compile bytecode at install (pip compiles all of site-packages, about 40 s of CPU
# here): Python writes it on first import, for the modules a process uses, so the commands make
# runs must not forbid that (without bytecode every process, Spark's Python workers included,
# compiles its imports again: about 3 s of each worker's start).
unexport PYTHONDONTWRITEBYTECODE
UV := $(BIN)/uv
UV_VERSION := 0.13.8
RUN_DEPS := $(VENV)/.deps-run
DEV_DEPS := $(VENV)/.deps-dev

$(UV):
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check uv==$(UV_VERSION)

$(RUN_DEPS): pyproject.toml | $(UV)
	$(UV) pip install -q --python $(BIN)/python -e '.[spark]'
	touch $@

$(DEV_DEPS): pyproject.toml | $(UV)
	$(UV) pip install -q --python $(BIN)/python -e '.[spark,azure,databricks,report,dev]'
	touch $@ $(RUN_DEPS)

# the Spark driver's class archive (infra/cds.py) is written in the background for the demo, and
# waited for before the tests (each of their ~60 driver JVMs starts faster with it)
setup: $(RUN_DEPS)  ## install the runtime into .venv and resolve the JVM jars once
	$(BIN)/streamscore services jars >/dev/null

setup-dev: $(DEV_DEPS) setup  ## also the Azure ML and Databricks extras and the test and lint tools
	$(BIN)/streamscore services jars --wait >/dev/null

demo: setup  ## start Kafka + MLflow, register the demo model, stream-score with a live model swap
	$(BIN)/streamscore demo

test: setup-dev lint  ## lint, then the whole test suite against real Kafka, Spark, Delta and MLflow (started by fixtures)
	$(BIN)/python -m pytest

bench: setup  ## the end-to-end benchmark (about 15 minutes; results under .streamscore/bench/)
	$(BIN)/streamscore bench

unit: $(DEV_DEPS)
	$(BIN)/python -m pytest -m unit

lint: $(DEV_DEPS)  ## ruff (lint + format check) and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(MAKE) --no-print-directory typecheck

typecheck: $(DEV_DEPS)
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/streamscore
	cp streamscore/*.py $(TYPECHECK)/streamscore/
	for d in jobs scoring registry_watch conf infra; do cp -r $$d $(TYPECHECK)/streamscore/$$d; done
	cp bench/benchmark.py $(TYPECHECK)/streamscore_bench.py
	cp bench/handwritten.py $(TYPECHECK)/streamscore_bench_handwritten.py
	cd $(TYPECHECK) && $(abspath $(BIN)/mypy) --config-file $(abspath pyproject.toml) \
	    -p streamscore -m streamscore_bench -m streamscore_bench_handwritten \
	    | sed -e 's#^streamscore_bench.py#bench/benchmark.py#' -e 's#^streamscore_bench_handwritten.py#bench/handwritten.py#' -e 's#^streamscore/\(jobs\|scoring\|registry_watch\|conf\|infra\)/#\1/#' -e 's#^streamscore/#streamscore/#'; \
	    exit $${PIPESTATUS[0]}

services-stop:
	$(BIN)/streamscore services stop

clean:
	-$(BIN)/streamscore services stop
	rm -rf .streamscore build
