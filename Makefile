# streamscore: the two Quick start commands are `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
export PYSPARK_PYTHON := $(abspath $(BIN)/python)
# mypy cannot follow the package-dir mapping of an editable install: it checks a staged copy of
# the package as it is installed (streamscore/ with jobs/, scoring/, ... as subpackages).
TYPECHECK := build/typecheck

.PHONY: setup demo test unit lint typecheck bench services-stop clean

$(BIN)/streamscore: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[spark,azure,databricks,dev]'
	touch $(BIN)/streamscore

setup: $(BIN)/streamscore  ## install Python deps into .venv and resolve the JVM jars once
	$(BIN)/streamscore services jars >/dev/null

demo: setup  ## start Kafka + MLflow, register the demo model, stream-score with a live model swap
	$(BIN)/streamscore demo

test: setup lint  ## lint, then the whole test suite against real Kafka, Spark, Delta and MLflow (started by fixtures)
	$(BIN)/python -m pytest

bench: setup  ## the end-to-end benchmark (about 15 minutes; results under .streamscore/bench/)
	$(BIN)/streamscore bench

unit: $(BIN)/streamscore
	$(BIN)/python -m pytest -m "not integration"

lint: $(BIN)/streamscore  ## ruff (lint + format check) and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(MAKE) --no-print-directory typecheck

typecheck: $(BIN)/streamscore
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/streamscore
	cp streamscore/*.py $(TYPECHECK)/streamscore/
	for d in jobs scoring registry_watch conf infra; do cp -r $$d $(TYPECHECK)/streamscore/$$d; done
	cd $(TYPECHECK) && $(abspath $(BIN)/mypy) --config-file $(abspath pyproject.toml) \
	    -p streamscore \
	    | sed -e 's#^streamscore/\(jobs\|scoring\|registry_watch\|conf\|infra\)/#\1/#' -e 's#^streamscore/#streamscore/#'; \
	    exit $${PIPESTATUS[0]}

services-stop:
	$(BIN)/streamscore services stop

clean:
	-$(BIN)/streamscore services stop
	rm -rf .streamscore build
