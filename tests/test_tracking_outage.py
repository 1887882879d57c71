"""Tracking never takes the stream down: stop the real MLflow server mid-stream and start it again."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from streamscore.demo import ensure_topic, produce_events, train_and_register
from tests.helpers import StreamThread, wait_for

pytestmark = pytest.mark.integration


def test_metrics_of_batches_during_an_outage_arrive_afterwards(spark, make_settings, services):
    s = make_settings(watch={"background_thread": False})
    train_and_register(s.model.name, "v1", alias="champion")
    k = s.source.kafka
    ensure_topic(k.bootstrap_servers, k.topic)
    stream = StreamThread(s)
    p = stream.processor
    produce_events(k.bootstrap_servers, k.topic, 200, prefix="before")
    wait_for(lambda: p.totals["rows_in"] >= 200, what="first events scored")

    mlflow_service = services["mlflow_service"]
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
    history = MlflowClient().get_metric_history(summary["run_id"], "rows_in")
    assert sum(m.value for m in history) == 600
    assert sorted(m.step for m in history) == list(range(summary["batches"]))
