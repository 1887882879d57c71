"""The Kafka broker stops for 20 s in the middle of a stream and comes back: the query rides it
out, and every event is scored exactly once. The test has a broker of its own (stopping the
session's broker would disturb the other tests)."""

from __future__ import annotations

import time

import pytest

from streamscore.demo import ensure_topic, produce_events, train_and_register
from tests.helpers import StreamThread, wait_for

pytestmark = pytest.mark.integration


@pytest.mark.heavy
def test_a_broker_outage_mid_stream_loses_and_duplicates_nothing(spark, make_settings, own_broker):
    s = make_settings(source={"kafka": {"bootstrap_servers": own_broker.address}})
    train_and_register(s.model.name, "v1", alias="champion")
    topic = s.source.kafka.topic
    ensure_topic(own_broker.address, topic)
    stream = StreamThread(s)
    try:
        before = produce_events(own_broker.address, topic, 300, malformed_every=30, prefix="before")
        wait_for(lambda: stream.processor.totals["rows_in"] >= 300, what="events before the outage")
        own_broker.stop()
        time.sleep(20)
        own_broker.start(timeout=180)
        after = produce_events(own_broker.address, topic, 300, malformed_every=30, prefix="after", start=300)
        wait_for(lambda: stream.processor.totals["rows_in"] >= 600, timeout=300, what="events after the outage")
    finally:
        summary = stream.stop()
    assert summary["status"] == "FINISHED"
    out = spark.read.format("delta").load(s.output_path).toPandas()
    assert len(out) == len(set(out["event_id"])) and set(out["event_id"]) == set(before.valid_ids + after.valid_ids)
    assert len(spark.read.format("delta").load(s.dead_letter_path).toPandas()) == before.malformed + after.malformed
