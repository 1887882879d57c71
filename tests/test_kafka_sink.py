"""Scored events back to Kafka (``sink.kafka``), on the real broker: every valid event is a message
whose prediction is its version's own ``predict`` of the event as it was sent, with its headers
and an identity (``message_id``) the Delta tables agree with; dead letters on their own topic; and
after a kill -9 before or after the batch's Kafka write, every valid event is on the topic, a
replayed message repeating its identity (at least once)."""

from __future__ import annotations

import json

import mlflow.pyfunc
import orjson
import pandas as pd
import pytest

from streamscore.demo import FEATURES, ensure_topic, produce_events, train_and_register
from streamscore.scoring.transform import HEADER_KIND, HEADER_MESSAGE_ID, HEADER_MODEL_NAME, HEADER_MODEL_VERSION
from streamscore.streaming import run_stream
from tests.helpers import read_topic, run_until_failpoint, stream_command, unique

pytestmark = pytest.mark.integration


def _sent(bootstrap: str, topic: str) -> dict[str, dict]:
    """The source topic's valid events as sent: event id -> the JSON object."""
    sent = {}
    for m in read_topic(bootstrap, topic):
        try:
            obj = orjson.loads(m.value())
        except orjson.JSONDecodeError:
            continue
        if isinstance(obj, dict) and "event_id" in obj and all(isinstance(obj.get(f), float) for f in FEATURES):
            sent[obj["event_id"]] = obj
    return sent


def _settings(make_settings, name=None, **sink):
    s = make_settings(name)
    topics = {"topic": unique("scored"), "dead_letter_topic": unique("dead")}
    for t in (s.source.kafka.topic, *topics.values()):
        ensure_topic(s.source.kafka.bootstrap_servers, t)
    return make_settings(
        s.model.name,
        source={"kafka": {"topic": s.source.kafka.topic, "max_offsets_per_trigger": 150}},
        sink={
            "output_path": s.output_path,
            "dead_letter_path": s.dead_letter_path,
            "checkpoint_path": s.checkpoint_path,
            "kafka": topics | sink,
        },
        trigger={"available_now": True},
    )


def _identities(spark, path: str) -> pd.DataFrame:
    """The scored table's rows with the identity their message must carry, computed here."""
    rows = (
        spark.read.format("delta")
        .load(path)
        .select("event_id", "model_version", "batch_id", "source", "source_partition", "source_offset", "prediction")
        .toPandas()
    )
    rows["message_id"] = [
        f"{r.model_version}:{r.batch_id}:{r.source}:{r.source_partition}:{r.source_offset}" for r in rows.itertuples()
    ]
    return rows


def _messages(ms: list) -> pd.DataFrame:
    out = []
    for m in ms:
        value = json.loads(m.value())
        headers = {k: v.decode() for k, v in (m.headers() or [])}
        out.append({"key": m.key().decode(), "headers": headers, **value})
    return pd.DataFrame(out)


@pytest.mark.heavy
def test_every_scored_event_is_a_message_with_its_versions_own_prediction(spark, make_settings):
    s = _settings(make_settings)
    k, sink = s.source.kafka, s.sink.kafka
    v1 = train_and_register(s.model.name, "v1", alias="champion")
    first = produce_events(k.bootstrap_servers, k.topic, 300, malformed_every=10, prefix="a")
    assert run_stream(s)["status"] == "FINISHED"
    v2 = train_and_register(s.model.name, "v2", alias="champion")  # the next run serves v2
    second = produce_events(k.bootstrap_servers, k.topic, 200, malformed_every=10, prefix="b")
    assert run_stream(s)["status"] == "FINISHED"

    msgs = _messages(read_topic(k.bootstrap_servers, str(sink.topic)))
    valid = set(first.valid_ids) | set(second.valid_ids)
    assert sorted(msgs["event_id"]) == sorted(valid)  # each valid event once (no crash: no replay)
    assert (msgs["key"] == msgs["event_id"]).all()
    assert (msgs["headers"].map(lambda h: h[HEADER_KIND]) == "scored").all()
    assert (msgs["headers"].map(lambda h: h[HEADER_MODEL_NAME]) == s.model.name).all()
    assert (msgs["headers"].map(lambda h: h[HEADER_MODEL_VERSION]) == msgs["model_version"]).all()
    assert (msgs["headers"].map(lambda h: h[HEADER_MESSAGE_ID]) == msgs["message_id"]).all()
    assert set(msgs[msgs["event_id"].isin(first.valid_ids)]["model_version"]) == {v1}
    assert set(msgs[msgs["event_id"].isin(second.valid_ids)]["model_version"]) == {v2}
    assert (msgs.groupby("batch_id")["model_version"].nunique() == 1).all()  # no batch mixes versions

    # the table and the topic agree, row for row, on identity and prediction
    table = _identities(spark, s.output_path)
    joined = table.merge(msgs, on="message_id", suffixes=("_table", ""))
    assert len(joined) == len(table) == len(msgs)
    assert (joined["prediction_table"] == joined["prediction"]).all()

    # each message's prediction is its version's own predict of the event as it was sent
    sent = _sent(k.bootstrap_servers, k.topic)
    for version in (v1, v2):
        mine = msgs[msgs["model_version"] == version]
        model = mlflow.pyfunc.load_model(f"models:/{s.model.name}/{version}")
        X = pd.DataFrame([{f: sent[e][f] for f in FEATURES} for e in mine["event_id"]])
        assert list(model.predict(X)) == list(mine["prediction"]), version

    dead = _messages(read_topic(k.bootstrap_servers, str(sink.dead_letter_topic)))
    assert len(dead) == first.malformed + second.malformed
    assert (dead["headers"].map(lambda h: h[HEADER_KIND]) == "dead_letter").all()
    assert dead["reason"].str.len().gt(0).all() and dead["raw_value"].notna().all()
    assert len(set(dead["message_id"])) == len(dead)


@pytest.mark.heavy
def test_a_kill_around_the_kafka_write_leaves_every_event_on_the_topic_with_one_identity(
    spark, make_settings, tmp_path
):
    s = _settings(make_settings)
    k, sink = s.source.kafka, s.sink.kafka
    train_and_register(s.model.name, "v1", alias="champion")
    sent = produce_events(k.bootstrap_servers, k.topic, 900, malformed_every=20, prefix="kill")
    home = tmp_path / "home"
    command = stream_command(
        s,
        home,
        source__kafka__max_offsets_per_trigger="150",
        sink__kafka__topic=str(sink.topic),
        sink__kafka__dead_letter_topic=str(sink.dead_letter_topic),
    )

    # killed with both tables committed and no message of the batch written
    run_until_failpoint(command, tmp_path / "before.log", "before-kafka-write@2")
    table = _identities(spark, s.output_path)
    on_topic = _messages(read_topic(k.bootstrap_servers, str(sink.topic)))
    killed = int(table["batch_id"].max())
    assert killed not in set(on_topic["batch_id"])  # the kill came before the batch's messages

    # killed with the batch's messages written and the checkpoint not knowing the batch is done
    run_until_failpoint(command, tmp_path / "after.log", "after-writes@2")

    summary = run_stream(s)  # the rest, and the replayed batch, in this process
    assert summary["status"] == "FINISHED"
    msgs = _messages(read_topic(k.bootstrap_servers, str(sink.topic)))
    table = _identities(spark, s.output_path)
    assert set(msgs["event_id"]) == set(sent.valid_ids) == set(table["event_id"])
    assert len(table) == len(sent.valid_ids)  # the table: exactly once
    # at least once on the topic: the batch written before the second kill was written again,
    # each copy with the same identity, key, version and prediction
    copies = msgs.groupby("message_id").agg(
        n=("event_id", "size"),
        keys=("key", "nunique"),
        events=("event_id", "nunique"),
        versions=("model_version", "nunique"),
        predictions=("prediction", "nunique"),
    )
    assert copies["n"].max() >= 2, "the replayed batch's messages should have been written twice"
    assert (copies[["keys", "events", "versions", "predictions"]] == 1).all().all()
    assert set(copies.index) == set(table["message_id"])  # deduplicated by identity: the table, exactly
    dead = _messages(read_topic(k.bootstrap_servers, str(sink.dead_letter_topic)))
    assert set(dead["message_id"]) and len(set(dead["message_id"])) == sent.malformed


@pytest.mark.timeout(300)  # the failure this guards against was a write that never returned
def test_a_message_larger_than_the_topic_takes_fails_the_batch_naming_the_fix(spark, make_settings):
    """The topic takes messages of at most 1,500 bytes; an event whose scored message is larger (a
    long event id) stops the stream with the reason, never dropping the message: the batch stays
    unacknowledged and is written again at the next start."""
    from confluent_kafka.admin import AdminClient, NewTopic

    from streamscore.errors import JobFailed

    s = _settings(make_settings)
    k = s.source.kafka
    admin = AdminClient({"bootstrap.servers": k.bootstrap_servers})
    small = unique("small")
    admin.create_topics([NewTopic(small, 1, 1, config={"max.message.bytes": "1500"})])[small].result(30)
    s = make_settings(
        s.model.name,
        source={"kafka": {"topic": k.topic}},
        sink={"checkpoint_path": s.checkpoint_path, "kafka": {"topic": small}},
        trigger={"available_now": True},
    )
    train_and_register(s.model.name, "v1", alias="champion")
    produce_events(k.bootstrap_servers, k.topic, 20, prefix="x" * 2000)
    with pytest.raises(JobFailed) as info:
        run_stream(s)
    error = info.value.summary["error"]
    assert "larger than the producer or the broker accepts" in error and "max.message.bytes" in error, error
    assert read_topic(k.bootstrap_servers, small) == []


@pytest.mark.heavy
def test_an_outage_of_the_output_broker_is_ridden_out(spark, make_settings, own_broker):
    """The output topic's broker (a broker of the test's own) stops for 20 s while events keep
    coming: the batch in flight waits for it (the producer retries), and afterwards every valid
    event is on the topic, the topic deduplicated by id being the table."""
    import time

    from tests.helpers import StreamThread, wait_for

    s = make_settings()
    out = unique("scored-out")
    ensure_topic(s.source.kafka.bootstrap_servers, s.source.kafka.topic)
    ensure_topic(own_broker.address, out)
    s = make_settings(
        s.model.name,
        source={"kafka": {"topic": s.source.kafka.topic}},
        sink={
            "output_path": s.output_path,
            "dead_letter_path": s.dead_letter_path,
            "checkpoint_path": s.checkpoint_path,
            "kafka": {"topic": out, "bootstrap_servers": own_broker.address},
        },
    )
    train_and_register(s.model.name, "v1", alias="champion")
    k = s.source.kafka
    stream = StreamThread(s)
    try:
        before = produce_events(k.bootstrap_servers, k.topic, 300, malformed_every=30, prefix="before")
        wait_for(lambda: stream.processor.totals["rows_in"] >= 300, what="events before the outage")
        own_broker.stop()
        after = produce_events(k.bootstrap_servers, k.topic, 300, malformed_every=30, prefix="after", start=300)
        time.sleep(20)
        own_broker.start(timeout=180)
        wait_for(lambda: stream.processor.totals["rows_in"] >= 600, timeout=300, what="events after the outage")
    finally:
        summary = stream.stop()
    assert summary["status"] == "FINISHED"
    msgs = _messages(read_topic(own_broker.address, out))
    table = _identities(spark, s.output_path)
    valid = set(before.valid_ids) | set(after.valid_ids)
    assert set(msgs["event_id"]) == valid == set(table["event_id"]) and len(table) == len(valid)
    assert set(msgs["message_id"]) == set(table["message_id"])


def test_dead_letters_from_a_delta_source_each_have_their_own_identity(spark):
    """A Delta source has no offsets and a dead letter no event id: its message id holds a hash of
    its payload, so two dead letters of one batch are two identities, and a replay repeats each."""
    import datetime as dt
    import hashlib

    from streamscore.scoring.schema import DEAD_LETTER
    from streamscore.scoring.transform import kafka_dead_letters

    at = dt.datetime(2026, 12, 6, tzinfo=dt.timezone.utc)
    rows = [
        ("{bad", "invalid JSON", "/tables/events", None, None, None, "m", "3", 7, at),
        ('{"x": 1}', "missing required field 'event_id'", "/tables/events", None, None, None, "m", "3", 7, at),
        ("{bad", "invalid JSON", "events", 1, 42, at, "m", "3", 7, at),
    ]
    frame = spark.createDataFrame(rows, DEAD_LETTER)
    ids = [json.loads(r.value)["message_id"] for r in kafka_dead_letters(frame).collect()]
    again = [json.loads(r.value)["message_id"] for r in kafka_dead_letters(frame).collect()]
    assert ids == again
    digest = [hashlib.sha256(payload.encode()).hexdigest() for payload, *_ in rows[:2]]
    assert ids == [f"3:7:/tables/events:{digest[0]}", f"3:7:/tables/events:{digest[1]}", "3:7:events:1:42"]
