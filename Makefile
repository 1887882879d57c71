# streamscore: the two Quick start commands are `make demo` and `make test`.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
export PYSPARK_PYTHON := $(abspath $(BIN)/python)

.PHONY: setup demo test unit services-stop bench clean

$(BIN)/streamscore: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[azure,databricks,dev]'
	touch $(BIN)/streamscore

setup: $(BIN)/streamscore  ## install Python deps into .venv and resolve the JVM jars once
	$(BIN)/python -c "from pathlib import Path; from infra import jars; jars.ensure_spark_jars(Path('.')); jars.ensure_kafka_jars(Path('.'))"

demo: setup  ## start Kafka + MLflow, register the demo model, stream-score with a live model swap
	$(BIN)/streamscore demo

test: setup  ## the whole test suite against real Kafka, Spark, Delta and MLflow (started by fixtures)
	$(BIN)/python -m pytest

unit: $(BIN)/streamscore
	$(BIN)/python -m pytest -m "not integration"

services-stop:
	$(BIN)/streamscore services stop

clean:
	-$(BIN)/streamscore services stop
	rm -rf .streamscore
