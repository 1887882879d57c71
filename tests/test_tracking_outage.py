"""Tracking never takes the stream down: stop the real MLflow server mid-stream and start it again
(a server of the test's own: stopping the session's would disturb the other tests); and a server
that accepts connections but never answers (behind :class:`tests.faultproxy.FaultProxy`) costs the
batches nothing."""

from __future__ import annotations

import logging
import os
import time

import pytest
from mlflow import MlflowClient

from streamscore.demo import ensure_topic, produce_events, train_and_register
from tests.faultproxy import FaultProxy
from tests.helpers import StreamThread, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def own_mlflow(home, tracking):
    import mlflow

    from streamscore.infra.services import MlflowService, start_on_free_ports

    server = start_on_free_ports(lambda p: MlflowService(home / "outage-mlflow", p[0]), 1)
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


@pytest.mark.heavy
def test_metrics_of_batches_during_an_outage_arrive_afterwards(spark, make_settings, own_mlflow, caplog):
    s = make_settings(tracking={"uri": own_mlflow.address})
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

    from streamscore.conf.settings import TrackingSettings
    from streamscore.tracking import RunTracker

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    tracker = RunTracker(dead, TrackingSettings(experiment="x", buffer_max_entries=10))
    tracker.run_id = "run-on-a-dead-server"
    caplog.set_level(logging.WARNING, logger="streamscore")
    for step in range(8):
        tracker.log_metrics({"a": step, "b": step}, step=step)
    assert tracker.flush() is False
    assert tracker.buffered == 10 and tracker.dropped == 6
    assert sorted({m.step for _, m in tracker._buffer}) == [3, 4, 5, 6, 7]  # the oldest went first
    assert sum("tracking server unreachable" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.heavy
def test_a_tracking_server_that_never_answers_does_not_slow_the_batches(spark, make_settings, services):
    """Tracking and registry both go through a proxy that stops answering mid-stream: Spark's own
    progress reports show every later ``foreachBatch`` call short (a call waiting on the server
    would take at least the client's request timeout, 10 s, twice with its retry), nothing is lost,
    and the job ends within ``tracking.close_timeout_s`` saying the run could not be closed."""
    import mlflow

    proxy = FaultProxy(services["mlflow"]).start()
    try:
        s = make_settings(tracking={"uri": proxy.address, "close_timeout_s": 5}, watch={"poll_interval_s": 1})
        train_and_register(s.model.name, "v1", alias="champion")
        k = s.source.kafka
        ensure_topic(k.bootstrap_servers, k.topic)
        stream = StreamThread(s)
        p = stream.processor
        query = spark.streams.get(stream.handle.query_id)
        try:
            produce_events(k.bootstrap_servers, k.topic, 200, prefix="before")
            wait_for(lambda: p.totals["rows_in"] >= 200, what="events before the hang")
            wait_for(lambda: p.tracker.buffered == 0, what="metrics sent before the hang")
            batches_before = p.batches
            proxy.hang()
            # a new version while the registry hangs (registered on the server itself; the job pointed
            # this process's MLflow at the proxy): the watcher's poll waits, the batches do not
            mlflow.set_tracking_uri(services["mlflow"])
            mlflow.set_registry_uri(services["mlflow"])
            train_and_register(s.model.name, "v2", alias="champion")
            for wave in range(4):
                produce_events(k.bootstrap_servers, k.topic, 150, prefix=f"hang{wave}", start=200 + 150 * wave)
                wait_for(lambda w=wave: p.totals["rows_in"] >= 350 + 150 * w, timeout=90, what=f"wave {wave}")
            assert proxy.held > 0  # the job did talk to the hanging server meanwhile
            progress = [pr for pr in query.recentProgress if pr.batchId >= batches_before and pr.numInputRows]
        finally:
            t0 = time.time()
            summary = stream.stop(timeout=120)
            stop_seconds = time.time() - t0
        add_batch_ms = [pr.durationMs["addBatch"] for pr in progress]
        assert add_batch_ms and max(add_batch_ms) < 10_000, add_batch_ms
        assert summary["status"] == "FINISHED" and summary["rows_in"] == 800 and summary["swaps"] == []
        assert summary["tracking_closed"] is False
        assert stop_seconds < 60  # close_timeout_s 5 s + the watcher's 10 s, not the client's retries
        out = spark.read.format("delta").load(s.output_path).select("event_id").toPandas()
        assert len(out) == 800 and out["event_id"].nunique() == 800
    finally:
        proxy.heal()
        proxy.stop()
    history = MlflowClient(services["mlflow"]).get_metric_history(summary["run_id"], "rows_in")
    assert sum(m.value for m in history) >= 200  # what was sent before the hang arrived
