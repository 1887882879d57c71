"""Helpers shared by the integration tests (run in Spark's Python workers too)."""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
import time
import uuid

import cloudpickle
import mlflow.pyfunc
import pandas as pd

from streamscore.demo import FEATURES, SKLEARN_REQUIREMENTS, iris_frame, pinned_requirements
from streamscore.streaming import StreamHandle


def unique(prefix: str, sep: str = "-") -> str:
    """A name no other test uses on the shared services: the xdist workers share one broker, MLflow
    server and metastore, so a counter and the clock are not enough (two workers' first tests
    named the same model in the same second)."""
    return f"{prefix}{sep}{uuid.uuid4().hex[:12]}"


class RaisingModel(mlflow.pyfunc.PythonModel):
    """Compatible signature, but predict fails."""

    def predict(self, context, model_input, params=None):
        raise ValueError("this model version is broken")


class NeedsOtherInput(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return pd.Series([0] * len(model_input))


class RecordsItsLoading(mlflow.pyfunc.PythonModel):
    """Writes ``marker`` when loaded: a stand-in for a pickle that runs code as it loads."""

    def __init__(self, marker: str):
        self.marker = marker

    def load_context(self, context):
        with open(self.marker, "a") as f:
            f.write("loaded\n")

    def predict(self, context, model_input, params=None):
        return pd.Series([0] * len(model_input))


cloudpickle.register_pickle_by_value(sys.modules[__name__])


# a model's requirements given (not inferred by MLflow in a subprocess, ~14 s a model: see
# streamscore.demo.pinned_requirements); tests/test_models.py logs one model with inference
SKLEARN_PIP = pinned_requirements(*SKLEARN_REQUIREMENTS)
PYFUNC_REQUIREMENTS = pinned_requirements(*SKLEARN_REQUIREMENTS, "cloudpickle")


def register_pyfunc(name: str, model, X: pd.DataFrame, y) -> str:
    from mlflow.models import infer_signature

    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=model,
            signature=infer_signature(X, y),
            input_example=X.head(3),
            registered_model_name=name,
            pip_requirements=PYFUNC_REQUIREMENTS,
        )
    return str(info.registered_model_version)


def register_broken_signature(name: str) -> str:
    X, y = iris_frame()
    X = X.assign(petal_area=X["petal_length"] * X["petal_width"])
    return register_pyfunc(name, NeedsOtherInput(), X, y.to_numpy())


def register_records_its_loading(name: str, marker: str) -> str:
    X, y = iris_frame()
    return register_pyfunc(name, RecordsItsLoading(marker), X, y.to_numpy())


def register_raising(name: str) -> str:
    X, y = iris_frame()
    return register_pyfunc(name, RaisingModel(), X, y.to_numpy())


@contextlib.contextmanager
def silent_port():
    """A loopback port on which nothing listens for as long as the block runs: bound, not
    listening, so a connection is refused (and no other process can take the port meanwhile)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def wait_for(cond, timeout: float = 120, interval: float = 0.2, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class StreamThread:
    """Runs ``run_stream`` in a thread until :meth:`stop`; exposes the processor and watcher."""

    def __init__(self, settings):
        from streamscore.streaming import run_stream

        self.handle: StreamHandle | None = None
        self.summary: dict | None = None
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._ready_evt = threading.Event()

        def on_ready(handle: StreamHandle) -> None:
            self.handle = handle
            self._ready_evt.set()

        def target():
            try:
                self.summary = run_stream(settings, should_stop=self._stop.is_set, on_ready=on_ready, job="test")
            except BaseException as e:  # noqa: BLE001
                self.error = e
                self._ready_evt.set()

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()
        ready = self._ready_evt.wait(300)
        if self.error:
            raise self.error
        if not ready:
            self._stop.set()
            raise AssertionError("the stream did not start within 300 s")

    @property
    def processor(self):
        assert self.handle is not None
        return self.handle.processor

    @property
    def watcher(self):
        assert self.handle is not None
        return self.handle.watcher

    def stop(self, timeout: float = 120) -> dict:
        self._stop.set()
        self.thread.join(timeout)
        if self.error:
            raise self.error
        assert self.summary is not None, "stream did not stop"
        return self.summary


def expected_predictions(model_version_uri: str, rows: pd.DataFrame):
    model = mlflow.pyfunc.load_model(model_version_uri)
    return model.predict(rows[FEATURES])


def _in_a_spark_task() -> bool:
    """True inside a Spark Python worker (mlflow's log_model also calls predict, on the input example)."""
    from pyspark import TaskContext

    return TaskContext.get() is not None


class KillsItsWorker(mlflow.pyfunc.PythonModel):
    """Compatible signature, but predicting in a Spark task ends the Python process it runs in."""

    def predict(self, context, model_input, params=None):
        import os

        if _in_a_spark_task():
            os._exit(3)
        return pd.Series([0] * len(model_input))


def register_worker_killer(name: str) -> str:
    X, y = iris_frame()
    return register_pyfunc(name, KillsItsWorker(), X, y.to_numpy())


class FlakyOnSomeRows(mlflow.pyfunc.PythonModel):
    """A real model's answer, except: no prediction (None) for rows with sepal_length 5.0, and an
    exception for any frame holding a row with sepal_length 6.3."""

    def load_context(self, context):
        from sklearn.linear_model import LogisticRegression

        X, y = iris_frame()
        self.model = LogisticRegression(max_iter=500).fit(X, y)

    def predict(self, context, model_input, params=None):
        if (model_input["sepal_length"] == 6.3).any():
            raise ValueError("cannot score sepal_length 6.3")
        out = self.model.predict(model_input).astype(object)
        out[(model_input["sepal_length"] == 5.0).to_numpy()] = None
        return list(out)


def register_flaky_on_some_rows(name: str) -> str:
    X, y = iris_frame()
    return register_pyfunc(name, FlakyOnSomeRows(), X, y.to_numpy())


class Hangs(mlflow.pyfunc.PythonModel):
    """Compatible signature, but predict in a Spark task never returns."""

    def predict(self, context, model_input, params=None):
        if _in_a_spark_task():
            time.sleep(3600)
        return pd.Series([0] * len(model_input))


def register_hanging(name: str) -> str:
    X, y = iris_frame()
    return register_pyfunc(name, Hangs(), X, y.to_numpy())


def stream_command(settings, home, *flags: str, **overrides: str) -> list[str]:
    """``python -m streamscore stream`` with ``settings``' services, tables and model as ``--set``
    options (``overrides`` use ``__`` for dots: ``spark__master="local[1]"``)."""
    k = settings.source.kafka
    sets = {
        "app.home": str(home),
        "spark.master": "local[2]",
        "source.kafka.bootstrap_servers": k.bootstrap_servers,
        "source.kafka.topic": k.topic,
        **_tables(settings),
        "sink.checkpoint_path": settings.checkpoint_path,
        "catalog.metastore": settings.catalog.metastore,
        "tracking.uri": settings.tracking.uri,
        "tracking.experiment": settings.tracking.experiment,
        "tracking.metrics_interval_s": str(settings.tracking.metrics_interval_s),
        "model.name": settings.model.name,
        "trigger.processing_time": "1 second",
    } | {key.replace("__", "."): value for key, value in overrides.items()}
    return [sys.executable, "-m", "streamscore", "stream", *flags] + [
        x for key, value in sets.items() for x in ("--set", f"{key}={value}")
    ]


def run_until_failpoint(command: list[str], log, point: str) -> None:
    """Run ``command`` (a stream job) until it kills itself with SIGKILL at failpoint ``point``
    (``<name>@<n>``, see :mod:`streamscore.faults`); its output goes to ``log``."""
    import os
    import signal
    import subprocess

    with open(log, "w") as out:
        proc = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "STREAMSCORE_FAILPOINT": point},
        )
    try:
        proc.wait(300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]


def _tables(settings) -> dict[str, str]:
    out = {}
    for key, table in (("output", settings.output_table), ("dead_letter", settings.dead_letter_table)):
        out[f"sink.{key}_table" if table.name else f"sink.{key}_path"] = str(table)
    return out


def register_sklearn(name: str, model, X: pd.DataFrame, alias: str | None = None) -> str:
    """Log and register a fitted scikit-learn model with its signature and input example."""
    import mlflow.sklearn
    from mlflow import MlflowClient
    from mlflow.models import infer_signature

    with mlflow.start_run():
        info = mlflow.sklearn.log_model(
            model,
            name="model",
            signature=infer_signature(X, model.predict(X)),
            input_example=X.head(3),
            registered_model_name=name,
            pip_requirements=SKLEARN_PIP,
        )
    version = str(info.registered_model_version)
    if alias:
        MlflowClient().set_registered_model_alias(name, alias, version)
    return version


def read_topic(bootstrap: str, topic: str) -> list:
    """Every message of ``topic``, as a read_committed consumer sees it."""
    from confluent_kafka import Consumer

    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": unique("check"),
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
        }
    )
    c.subscribe([topic])
    out, idle = [], 0
    try:
        while idle < 4:
            m = c.poll(1.0)
            if m is None:
                idle += 1
                continue
            assert m.error() is None, m.error()
            out.append(m)
            idle = 0
    finally:
        c.close()
    return out


def private_broker(home, name: str):
    """A Kafka broker of one test's own (started on free ports under ``home/name``), for a test that
    stops it: stopping the session's broker would disturb the other tests. The caller stops it."""
    from streamscore.infra.services import KafkaService, start_on_free_ports

    return start_on_free_ports(lambda p: KafkaService(home / name, p[0], p[1]), 2)


MARK = 9.9  # a sepal width no iris has: the failing candidate gives no prediction for such rows


class NoAnswerForMarkedRows(mlflow.pyfunc.PythonModel):
    """A real classifier, except that it gives no prediction (None) for rows marked by their
    sepal width: a model error on those rows only."""

    def load_context(self, context):
        from sklearn.linear_model import LogisticRegression

        X, y = iris_frame()
        self.model = LogisticRegression(max_iter=500, C=0.3).fit(X, y)

    def predict(self, context, model_input, params=None):
        out = self.model.predict(model_input[FEATURES]).astype(object)
        out[(model_input["sepal_width"] == MARK).to_numpy()] = None
        return list(out)
