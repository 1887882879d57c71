"""Session fixtures: one real Kafka broker, one real MLflow server, one SparkSession (local mode with
the Kafka connector and Delta), all on free loopback ports under a temporary state folder."""

from __future__ import annotations

import itertools
import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
# Spark's Python workers import test helpers (e.g. broken models) by module name
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

_counter = itertools.count()


@pytest.fixture(scope="session")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("streamscore-home")


@pytest.fixture(scope="session")
def services(home):
    from infra.services import KafkaService, MlflowService, free_port

    kafka = KafkaService(home, free_port(), free_port())
    mlflow_srv = MlflowService(home, free_port())
    started = []
    try:
        for s in (kafka, mlflow_srv):
            s.start(timeout=180)
            started.append(s)
        yield {"kafka": kafka.address, "mlflow": mlflow_srv.address, "kafka_service": kafka,
               "mlflow_service": mlflow_srv}
    finally:
        for s in reversed(started):
            s.stop()


@pytest.fixture(scope="session")
def tracking(services):
    import mlflow

    mlflow.set_tracking_uri(services["mlflow"])
    mlflow.set_registry_uri(services["mlflow"])
    os.environ["MLFLOW_TRACKING_URI"] = services["mlflow"]
    return services["mlflow"]


@pytest.fixture(scope="session")
def spark(services, home):
    from conf.settings import load_settings
    from streamscore.spark import build_spark

    settings = load_settings("local", overrides={"app": {"home": str(home)}, "spark": {"master": "local[2]"}})
    session = build_spark(settings)
    yield session
    session.stop()


@pytest.fixture
def make_settings(services, tracking, home, tmp_path):
    """Settings for one test: its own topic, tables, checkpoint and model name."""
    from conf.settings import load_settings

    def make(name: str | None = None, **sections):
        n = next(_counter)
        base = {
            "app": {"home": str(home)},
            "spark": {"master": "local[2]"},
            "source": {"kafka": {"bootstrap_servers": services["kafka"], "topic": f"t{n}-{int(time.time())}"}},
            "sink": {"output_path": str(tmp_path / f"scored{n}"), "dead_letter_path": str(tmp_path / f"dead{n}"),
                     "checkpoint_path": str(tmp_path / f"cp{n}")},
            "tracking": {"uri": services["mlflow"], "experiment": "streamscore-tests"},
            "model": {"name": name or f"iris-test-{n}-{int(time.time())}"},
            "trigger": {"processing_time": "1 second"},
            "watch": {"poll_interval_s": 0.5},
        }
        for section, values in sections.items():
            base.setdefault(section, {})
            for k, v in values.items():
                if isinstance(v, dict) and isinstance(base[section].get(k), dict):
                    base[section][k] = {**base[section][k], **v}
                else:
                    base[section][k] = v
        return load_settings("local", overrides=base)

    return make
