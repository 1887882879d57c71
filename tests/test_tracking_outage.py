"""Tracking never takes the stream down: stop the real MLflow server mid-stream and start it again
(a server of the test's own: stopping the session's would disturb the other tests)."""

from __future__ import annotations

import logging
import os

import pytest
from mlflow import MlflowClient

from streamscore.demo import ensure_topic, produce_events, train_and_register
from tests.helpers import StreamThread, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def own_mlflow(home, tracking):
    import mlflow

    from streamscore.infra.services import MlflowService, free_port

    server = MlflowService(home / "outage-mlflow", free_port())
    server.start(timeout=180)
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri(), os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(server.address)
    mlflow.set_registry_uri(server.address)
    try:
        yield server
    finally:  # the jobs set the process-wide URIs: the other tests use the session's server
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])
        os.environ["MLFLOW_TRACKING_URI"] = previous[2] or previous[0]
        server.stop()


def test_metrics_of_batches_during_an_outage_arrive_afterwards(spark, make_settings, own_mlflow, caplog):
    s = make_settings(watch={"background_thread": False}, tracking={"uri": own_mlflow.address})
    train_and_register(s.model.name, "v1", alias="champion")
    k = s.source.kafka
    ensure_topic(k.bootstrap_servers, k.topic)
    stream = StreamThread(s)
    p = stream.processor
    produce_events(k.bootstrap_servers, k.topic, 200, prefix="before")
    wait_for(lambda: p.totals["rows_in"] >= 200, what="first events scored")

    mlflow_service = own_mlflow
    caplog.set_level(logging.WARNING, logger="streamscore")
    mlflow_service.stop()
    try:
        batches_before = p.batches
        produce_events(k.bootstrap_servers, k.topic, 300, prefix="during", start=200)
        wait_for(lambda: p.totals["rows_in"] >= 500, timeout=180, what="events scored during the outage")
        assert p.batches > batches_before
        assert p.tracker.buffered > 0  # metrics of those batches are waiting
    finally:
        mlflow_service.start()
    produce_events(k.bootstrap_servers, k.topic, 100, prefix="after", start=500)
    wait_for(lambda: p.totals["rows_in"] >= 600, what="events scored after the outage")
    wait_for(lambda: p.tracker.buffered == 0, what="buffer flushed")
    summary = stream.stop()

    assert summary["rows_scored"] == 600 and summary["tracking_metrics_dropped"] == 0
    outage_lines = [r for r in caplog.records if "tracking server unreachable" in r.getMessage()]
    assert len(outage_lines) == 1  # logged once, not once per batch
    history = MlflowClient(own_mlflow.address).get_metric_history(summary["run_id"], "rows_in")
    assert sum(m.value for m in history) == 600
    assert sorted(m.step for m in history) == list(range(summary["batches"]))


def test_a_full_buffer_drops_the_oldest_metrics_and_counts_them(caplog):
    import socket

    from streamscore.tracking import RunTracker

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    tracker = RunTracker(dead, "x", buffer_max_entries=10)
    tracker.run_id = "run-on-a-dead-server"
    caplog.set_level(logging.WARNING, logger="streamscore")
    for step in range(8):
        tracker.log_metrics({"a": step, "b": step}, step=step)
    assert tracker.flush() is False
    assert tracker.buffered == 10 and tracker.dropped == 6
    assert sorted({m.step for _, m in tracker._buffer}) == [3, 4, 5, 6, 7]  # the oldest went first
    assert sum("tracking server unreachable" in r.getMessage() for r in caplog.records) == 1
