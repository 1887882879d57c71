"""One job lifecycle on the real services: whatever the exit path, the MLflow run is closed with the
job's status, its summary is stored with it and printed last; SIGTERM stops a running job after
its current batch (KILLED, exit 0); the console shows only the project's own lines."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import mlflow.pyfunc
import pytest
from mlflow import MlflowClient

from streamscore.demo import FEATURES, ensure_topic, produce_events, train_and_register
from streamscore.errors import GateRefused, JobFailed
from streamscore.runner import BatchProcessor
from streamscore.streaming import run_stream
from tests.helpers import register_raising, stream_command, wait_for

pytestmark = pytest.mark.integration


def _stored_summary(client: MlflowClient, run_id: str, tmp_path: Path) -> dict:
    return json.loads(Path(client.download_artifacts(run_id, "summary.json", str(tmp_path))).read_text())


def test_a_failing_batch_closes_the_run_failed_with_its_summary(spark, make_settings, monkeypatch, tmp_path):
    s = make_settings(trigger={"available_now": True})
    train_and_register(s.model.name, "v1", alias="champion")
    k = s.source.kafka
    ensure_topic(k.bootstrap_servers, k.topic)
    produce_events(k.bootstrap_servers, k.topic, 50, prefix="f")

    def boom(self, *args, **kwargs):
        raise RuntimeError("boom in the batch accounting")

    monkeypatch.setattr(BatchProcessor, "_account", boom)
    with pytest.raises(JobFailed, match="boom in the batch accounting") as info:
        run_stream(s)
    summary = info.value.summary
    assert summary["status"] == "FAILED" and "boom" in summary["error"]
    # the batch's own error in one line, not Spark's wrapping of the Python traceback
    assert summary["error"] == "StreamFailed: streaming query failed: RuntimeError: boom in the batch accounting"
    assert summary["query_id"] and summary["output_table"] == s.output_path
    client = MlflowClient(s.tracking.uri)
    assert client.get_run(summary["run_id"]).info.status == "FAILED"
    stored = _stored_summary(client, summary["run_id"], tmp_path)
    assert stored["status"] == "FAILED" and stored["run_id"] == summary["run_id"]


def test_a_refused_initial_version_fails_naming_model_and_version(spark, make_settings):
    s = make_settings(trigger={"available_now": True})
    ensure_topic(s.source.kafka.bootstrap_servers, s.source.kafka.topic)
    version = register_raising(s.model.name)
    MlflowClient(s.tracking.uri).set_registered_model_alias(s.model.name, "champion", version)
    with pytest.raises(JobFailed) as info:
        run_stream(s)
    assert isinstance(info.value.__cause__, GateRefused)
    error = info.value.summary["error"]
    assert f"model {s.model.name!r} @champion -> version {version} refused" in error
    assert "this model version is broken" in error


@pytest.mark.heavy
def test_sigterm_stops_a_stream_running_on_a_cluster_after_its_batch(spark, make_settings, tmp_path):
    """The job in a subprocess on ``local-cluster[1,1,1024]`` (a master, a worker, an executor in a
    JVM of its own: the connector and Delta jars and the model reach them through ``spark.jars``
    and ``SparkContext.addArchive`` as on a real cluster), then SIGTERM: it stops after its batch,
    KILLED, with its summary; the rows it wrote are scored like the model's own ``predict``."""
    s = make_settings()
    version = train_and_register(s.model.name, "v1", alias="champion")
    k = s.source.kafka
    ensure_topic(k.bootstrap_servers, k.topic)
    sent = produce_events(k.bootstrap_servers, k.topic, 200, malformed_every=20, prefix="sig")
    home = tmp_path / "home"
    args = stream_command(s, home, spark__master="local-cluster[1,1,1024]")
    stderr_file = tmp_path / "stderr.txt"
    with open(stderr_file, "w") as err:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, text=True, env=dict(os.environ))
    try:
        scored = re.compile(r"batch \d+: (\d+) in")
        wait_for(
            lambda: sum(int(n) for n in scored.findall(stderr_file.read_text())) >= 200 or proc.poll() is not None,
            timeout=240,
            what="the stream's first batches",
        )
        assert proc.poll() is None, stderr_file.read_text()[-3000:]
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = stderr_file.read_text()
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["status"] == "KILLED" and summary["stop_reason"] == "killed"
    assert (summary["rows_in"], summary["rows_scored"], summary["rows_dead_lettered"]) == (200, 190, 10)
    assert MlflowClient(s.tracking.uri).get_run(summary["run_id"]).info.status == "KILLED"
    # quiet console: only the project's own lines; the JVM and the libraries write to the named file
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines and all(re.match(r"\S+ \S+ (INFO|WARNING|ERROR) streamscore", line) for line in lines), lines
    log_file = Path(re.search(r"library and JVM logs: (\S+)", stderr).group(1))
    assert log_file.parent == home / "logs" and log_file.exists()
    out = spark.read.format("delta").load(s.output_path).toPandas()
    assert sorted(out["event_id"]) == sorted(sent.valid_ids) and set(out["model_version"]) == {version}
    model = mlflow.pyfunc.load_model(f"models:/{s.model.name}/{version}")
    assert (model.predict(out[FEATURES]) == out["prediction"].to_numpy()).all()


@pytest.mark.heavy
def test_ctrl_c_under_sustained_load_stops_promptly_and_loses_nothing(spark, make_settings, tmp_path):
    """Ctrl-C in the job's terminal: SIGINT to its whole process group (the driver, the JVM and the
    Python workers scoring a batch), while batches run back to back (events keep coming, 0.5 s
    trigger). The query is never seen between triggers, so the job halts it before its next batch
    reads anything; a worker interrupted mid-batch must not fail the job. It ends KILLED within a
    batch or two; the events of the halted batch are read by the next run on the checkpoint: every
    event sent ends up in the output table exactly once."""
    import threading

    s = make_settings(trigger={"available_now": True})
    train_and_register(s.model.name, "v1", alias="champion")
    k = s.source.kafka
    ensure_topic(k.bootstrap_servers, k.topic)
    halt, sent = threading.Event(), []

    def keep_sending() -> None:
        while not halt.is_set():
            sent.extend(produce_events(k.bootstrap_servers, k.topic, 400, rate=800, start=len(sent)).valid_ids)

    producer = threading.Thread(target=keep_sending, daemon=True)
    producer.start()
    stderr_file = tmp_path / "stderr.txt"
    args = stream_command(s, tmp_path / "home", trigger__processing_time="500 milliseconds")
    with open(stderr_file, "w") as err:  # a session of its own: the group a terminal's Ctrl-C reaches
        proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=err, text=True, env=dict(os.environ), start_new_session=True
        )
    try:
        batches = re.compile(r"batch (\d+): \d+ in")
        wait_for(
            lambda: len(batches.findall(stderr_file.read_text())) >= 4 or proc.poll() is not None, 240, what="batches"
        )
        assert proc.poll() is None, stderr_file.read_text()[-3000:]
        time.sleep(1.5)  # into the next batch: its Python workers are scoring (a batch takes ~3 s here)
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=90)  # not "after the load stops": the load does not stop
    finally:
        halt.set()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    producer.join(timeout=60)
    assert proc.returncode == 0, stderr_file.read_text()[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["status"] == "KILLED" and summary["stop_reason"] == "killed", summary
    rest = run_stream(s)  # the same checkpoint: what the stopped run did not commit, and the rest
    assert summary["rows_scored"] + rest["rows_scored"] == len(sent)
    ids = spark.read.format("delta").load(s.output_path).select("event_id").toPandas()["event_id"]
    assert ids.is_unique and sorted(ids) == sorted(sent)
