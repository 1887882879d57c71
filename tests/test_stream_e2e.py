"""End to end on the real services: Kafka -> Spark (pandas UDF) -> Delta, metrics in MLflow."""

from __future__ import annotations

import json
import os
import shutil
import time

import pandas as pd
import pytest
from mlflow import MlflowClient

from streamscore.demo import FEATURES, ensure_topic, produce_events, train_and_register
from streamscore.errors import JobFailed
from streamscore.streaming import run_stream

pytestmark = pytest.mark.integration


def _read(spark, path) -> pd.DataFrame:
    return spark.read.format("delta").load(path).toPandas()


def test_stream_scores_every_valid_event_once_and_dead_letters_the_rest(spark, make_settings):
    s = make_settings(trigger={"available_now": True}, source={"kafka": {"max_offsets_per_trigger": 300}})
    version = train_and_register(s.model.name, "v1", alias="champion")
    k = s.source.kafka
    ensure_topic(k.bootstrap_servers, k.topic)
    sent = produce_events(k.bootstrap_servers, k.topic, 1000, malformed_every=25, prefix="a")
    assert sent.malformed == 40 and sent.valid == 960

    summary = run_stream(s)

    assert summary["status"] == "FINISHED"
    assert (summary["rows_in"], summary["rows_scored"], summary["rows_dead_lettered"]) == (1000, 960, 40)
    assert summary["batches"] >= 2  # maxOffsetsPerTrigger splits the input
    out = _read(spark, s.output_path)
    assert len(out) == 960
    assert sorted(out["event_id"]) == sorted(sent.valid_ids)  # each valid event exactly once
    # predictions equal the registered model's own predict on the same rows
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(f"models:/{s.model.name}/{version}")
    assert (model.predict(out[FEATURES]) == out["prediction"].to_numpy()).all()
    # lineage
    assert set(out["model_name"]) == {s.model.name} and set(out["model_version"]) == {version}
    mv = MlflowClient().get_model_version(s.model.name, version)
    assert set(out["model_run_id"]) == {mv.run_id}
    assert out["source"].eq(k.topic).all() and out["source_offset"].notna().all()
    assert out["scored_at"].notna().all() and out["event_time"].notna().all()
    assert out[["source_partition", "source_offset"]].drop_duplicates().shape[0] == 960

    dead = _read(spark, s.dead_letter_path)
    assert len(dead) == 40
    assert dead["reason"].notna().all() and dead["raw_value"].notna().all()
    reasons = " | ".join(dead["reason"])
    for expected in (
        "invalid JSON",
        "missing required field 'petal_width'",
        "field 'sepal_length': expected a number, got str",
        "missing required field 'event_id'",
    ):
        assert expected in reasons
    assert dead["source_offset"].notna().all() and dead["source"].eq(k.topic).all()

    # the run's metrics can be read back through the MLflow client
    client = MlflowClient()
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.ref"] == "@champion"
    history = client.get_metric_history(summary["run_id"], "rows_in")
    assert sum(m.value for m in history) == 1000
    assert sorted(m.step for m in history) == list(range(summary["batches"]))
    assert sum(m.value for m in client.get_metric_history(summary["run_id"], "rows_dead_lettered")) == 40


def test_a_fuzz_corpus_through_the_live_stream_is_all_accounted_for(spark, make_settings):
    """12,000 generated messages (over 10,000 bad: truncated JSON, wrong types, NaN / Infinity, huge
    strings, deep nesting, duplicate keys, nulls, invalid UTF-8, empty and null values, oversized)
    through Kafka and the stream: the job finishes, every Kafka offset is in exactly one of the two
    tables, every dead letter has a reason, and the stream scores exactly the messages the scoring
    code scores outside Spark."""
    from confluent_kafka import Producer

    from streamscore.scoring.records import score_chunk
    from streamscore.scoring.spec import spec_from_signature
    from tests.fuzz import fuzz_corpus

    s = make_settings(
        trigger={"available_now": True},
        source={"max_message_bytes": 2048, "kafka": {"max_offsets_per_trigger": 4000}},
    )
    version = train_and_register(s.model.name, "v1", alias="champion")
    k = s.source.kafka
    ensure_topic(k.bootstrap_servers, k.topic, partitions=1)
    corpus = fuzz_corpus(12_000, seed=23)
    producer = Producer({"bootstrap.servers": k.bootstrap_servers, "linger.ms": 20, "enable.idempotence": True})
    for payload in corpus:
        producer.produce(k.topic, payload)
        producer.poll(0)
    assert producer.flush(60) == 0

    summary = run_stream(s)

    assert summary["status"] == "FINISHED" and summary["rows_in"] == len(corpus)
    out = _read(spark, s.output_path)
    dead = _read(spark, s.dead_letter_path)
    offsets = sorted(list(out["source_offset"]) + list(dead["source_offset"]))
    assert offsets == list(range(len(corpus)))  # each message once, in one table or the other
    assert len(dead) > 10_000 and dead["reason"].notna().all() and (dead["reason"].str.len() > 0).all()
    assert summary["rows_scored"] == len(out) and summary["rows_dead_lettered"] == len(dead)
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(f"models:/{s.model.name}/{version}")
    spec = spec_from_signature(model.metadata.signature, "event_id", "event_time", "fuzz", 2048)
    outside = score_chunk(pd.Series(corpus), spec, model)
    assert sorted(out["source_offset"]) == list(outside.index[outside["ok"]])
    for kind in (
        "invalid JSON",
        "not valid UTF-8",
        "larger than source.max_message_bytes",
        "empty payload",
        "expected a number",
    ):
        assert dead["reason"].str.contains(kind, regex=False).any(), kind
    # the table reads (through Arrow, which refuses invalid UTF-8) and keeps the text of such payloads
    assert dead["raw_value"].str.contains("\ufffd", regex=False).any()


def test_restart_on_same_checkpoint_scores_only_new_events(spark, make_settings):
    s = make_settings(trigger={"available_now": True})
    train_and_register(s.model.name, "v1", alias="champion")
    k = s.source.kafka
    ensure_topic(k.bootstrap_servers, k.topic)
    first = produce_events(k.bootstrap_servers, k.topic, 300, prefix="first")
    assert run_stream(s)["rows_scored"] == 300
    second = produce_events(k.bootstrap_servers, k.topic, 200, prefix="second", start=300)
    summary = run_stream(s)
    assert summary["rows_in"] == 200 and summary["rows_scored"] == 200
    out = _read(spark, s.output_path)
    assert sorted(out["event_id"]) == sorted(first.valid_ids + second.valid_ids)


def _run_crashing_after_the_first_write(settings, monkeypatch) -> None:
    """Run the stream with a crash after its first batch's sink writes, before Spark commits the
    batch (so a restart replays it)."""
    from streamscore.runner import BatchProcessor

    original = BatchProcessor.__call__

    def crash_after_write(self, batch_df, batch_id):
        original(self, batch_df, batch_id)
        raise RuntimeError("simulated crash after the sink write")

    with monkeypatch.context() as patched:
        patched.setattr(BatchProcessor, "__call__", crash_after_write)
        with pytest.raises(Exception, match="simulated crash"):
            run_stream(settings)


def test_replayed_batch_is_not_written_twice_and_keeps_its_version(spark, make_settings, monkeypatch):
    """A crash after the Delta write but before Spark commits the batch: on restart the batch is
    replayed; the idempotent write skips it and the ledger pins the version that scored it first."""
    s = make_settings(trigger={"max_batches": 1})
    v1 = train_and_register(s.model.name, "v1", alias="champion")
    k = s.source.kafka
    ensure_topic(k.bootstrap_servers, k.topic)
    produce_events(k.bootstrap_servers, k.topic, 200, malformed_every=10, prefix="r")

    _run_crashing_after_the_first_write(s, monkeypatch)
    assert len(_read(spark, s.output_path)) == 180  # written, but the batch never committed

    v2 = train_and_register(s.model.name, "v2", alias="champion")  # the alias moved meanwhile
    MlflowClient().delete_model_version(s.model.name, v1)  # ...and the pinned version is gone from the registry
    replay = run_stream(s)
    assert replay["rows_in"] == 200  # batch 0 ran again
    assert replay["rows_by_version"] == {v1: 180}  # ...with the version recorded for it
    out = _read(spark, s.output_path)
    assert len(out) == 180 and out["event_id"].is_unique  # ...and was not written twice
    assert len(_read(spark, s.dead_letter_path)) == 20
    assert v2 != v1


def test_delta_table_source(spark, make_settings, tmp_path):
    import datetime as dt

    from streamscore.demo import iris_frame

    X, _ = iris_frame()
    src = X.head(60).copy()
    src.insert(0, "event_id", [f"d-{i}" for i in range(60)])
    src.insert(1, "event_time", [dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc).isoformat()] * 60)
    src.loc[5, "petal_width"] = None  # a row the model cannot score: dead-lettered with the reason
    path = str(tmp_path / "events_delta")
    spark.createDataFrame(src).write.format("delta").save(path)
    s = make_settings(source={"kind": "delta", "delta": {"path": path}}, trigger={"available_now": True})
    v = train_and_register(s.model.name, "v1", alias="champion")

    summary = run_stream(s)

    assert (summary["rows_in"], summary["rows_scored"], summary["rows_dead_lettered"]) == (60, 59, 1)
    out = _read(spark, s.output_path)
    assert sorted(out["event_id"]) == sorted(f"d-{i}" for i in range(60) if i != 5)
    assert out["source"].eq(path).all() and set(out["model_version"]) == {v}
    dead = _read(spark, s.dead_letter_path)
    assert "missing required field 'petal_width'" in dead["reason"][0] and '"d-5"' in dead["raw_value"][0]


def test_a_reset_checkpoint_on_existing_tables_loses_nothing(spark, make_settings):
    """A deleted checkpoint restarts batch ids at 0; the second incarnation's writes must not be
    skipped as replays of the first's (Delta txnAppId is per checkpoint incarnation)."""
    s = make_settings(trigger={"available_now": True})
    train_and_register(s.model.name, "v1", alias="champion")
    k = s.source.kafka
    ensure_topic(k.bootstrap_servers, k.topic)
    first = produce_events(k.bootstrap_servers, k.topic, 120, malformed_every=30, prefix="inc1")
    assert run_stream(s)["rows_scored"] == 116

    shutil.rmtree(s.checkpoint_path)
    sink = {"output_path": s.output_path, "dead_letter_path": s.dead_letter_path, "checkpoint_path": s.checkpoint_path}
    s2 = make_settings(
        s.model.name, trigger={"available_now": True}, sink=sink, source={"kafka": {"topic": k.topic + "-b"}}
    )
    ensure_topic(k.bootstrap_servers, s2.source.kafka.topic)
    second = produce_events(k.bootstrap_servers, s2.source.kafka.topic, 150, malformed_every=30, prefix="inc2")
    summary = run_stream(s2)

    assert summary["status"] == "FINISHED" and summary["rows_scored"] == 145
    out = _read(spark, s.output_path)
    assert sorted(out["event_id"]) == sorted(first.valid_ids + second.valid_ids)
    assert len(_read(spark, s.dead_letter_path)) == 4 + 5


def test_a_missing_topic_stops_the_stream_at_start_naming_the_setting(make_settings):
    from streamscore.errors import JobFailed, SourceError

    s = make_settings(trigger={"available_now": True})
    with pytest.raises(JobFailed) as info:
        run_stream(s)
    assert isinstance(info.value.__cause__, SourceError)
    assert f"Kafka topic {s.source.kafka.topic!r} does not exist" in info.value.summary["error"]
    assert "source.kafka.topic" in info.value.summary["error"]


def test_an_unresolvable_model_or_an_unwritable_table_stops_the_stream_at_start(make_settings, tmp_path):
    from streamscore.errors import JobFailed, SinkError
    from streamscore.preflight import ModelUnavailable

    s = make_settings(trigger={"available_now": True})  # nothing registered under its model name
    ensure_topic(s.source.kafka.bootstrap_servers, s.source.kafka.topic)
    with pytest.raises(JobFailed) as info:
        run_stream(s)
    assert isinstance(info.value.__cause__, ModelUnavailable)
    assert s.model.name in info.value.summary["error"] and "model.ref" in info.value.summary["error"]

    train_and_register(s.model.name, "v1", alias="champion")
    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("")
    s2 = make_settings(s.model.name, trigger={"available_now": True}, sink={"output_path": str(not_a_folder / "t")})
    ensure_topic(s2.source.kafka.bootstrap_servers, s2.source.kafka.topic)
    with pytest.raises(JobFailed) as info:
        run_stream(s2)
    assert isinstance(info.value.__cause__, SinkError) and "sink.output_path" in info.value.summary["error"]


def test_a_model_that_fails_on_some_rows_costs_only_those_rows_and_the_stream_goes_on(spark, make_settings):
    from mlflow import MlflowClient as Client

    from streamscore.demo import iris_frame
    from tests.helpers import register_flaky_on_some_rows

    s = make_settings(trigger={"available_now": True}, source={"kafka": {"max_offsets_per_trigger": 100}})
    version = register_flaky_on_some_rows(s.model.name)
    Client().set_registered_model_alias(s.model.name, "champion", version)
    k = s.source.kafka
    ensure_topic(k.bootstrap_servers, k.topic)
    sent = produce_events(k.bootstrap_servers, k.topic, 300, malformed_every=50, prefix="flaky")

    summary = run_stream(s)

    X, _ = iris_frame()
    lengths = {f"flaky-{n}": X["sepal_length"][n % 150] for n in range(300)}
    bad_ids = {i for i in sent.valid_ids if lengths[i] in (5.0, 6.3)}
    assert summary["status"] == "FINISHED" and summary["batches"] >= 3
    assert (summary["rows_in"], summary["rows_dead_lettered"]) == (300, sent.malformed + len(bad_ids))
    out, dead = _read(spark, s.output_path), _read(spark, s.dead_letter_path)
    assert set(out["event_id"]) == set(sent.valid_ids) - bad_ids and out["event_id"].is_unique
    model_errors = dead[dead["reason"].str.startswith("model error")]
    assert len(model_errors) == len(bad_ids)
    label = f"(model {s.model.name!r} version {version})"
    none_rows = model_errors[model_errors["reason"].str.contains("no prediction (None)", regex=False)]
    raised = model_errors[model_errors["reason"].str.contains("ValueError: cannot score sepal_length 6.3")]
    assert len(none_rows) + len(raised) == len(bad_ids) and len(none_rows) > 0 and len(raised) > 0
    assert model_errors["reason"].str.endswith(label).all()


def test_watch_disabled_means_no_swap(spark, make_settings):
    from streamscore.demo import promote
    from tests.helpers import StreamThread, wait_for

    s = make_settings(watch={"enabled": False})
    v1 = train_and_register(s.model.name, "v1", alias="champion")
    k = s.source.kafka
    ensure_topic(k.bootstrap_servers, k.topic)
    stream = StreamThread(s)
    try:
        produce_events(k.bootstrap_servers, k.topic, 100, prefix="w1")
        wait_for(lambda: stream.processor.totals["rows_in"] >= 100, what="first events")
        # a second job on the running stream's checkpoint stops at start, in one line naming the first
        with pytest.raises(JobFailed) as second:
            run_stream(s)
        error = second.value.summary["error"]
        assert (
            f"the checkpoint {s.checkpoint_path} is in use by another job (streamscore test, pid {os.getpid()}" in error
        )
        assert stream.handle is not None and f"MLflow run {stream.handle.run_id}" in error and "\n" not in error
        v2 = train_and_register(s.model.name, "v2", alias=None)
        promote(s.model.name, v2, "champion")
        time.sleep(8)  # with watching on, v2 would be validated and waiting for the next batch by now
        produce_events(k.bootstrap_servers, k.topic, 100, prefix="w2", start=100)
        wait_for(lambda: stream.processor.totals["rows_in"] >= 200, what="later events")
    finally:
        summary = stream.stop()
    assert summary["swaps"] == [] and summary["rows_by_version"] == {v1: 200}


def test_idle_timeout_stops_the_stream(make_settings):
    s = make_settings(trigger={"idle_timeout_s": 4})
    train_and_register(s.model.name, "v1", alias="champion")
    k = s.source.kafka
    ensure_topic(k.bootstrap_servers, k.topic)
    produce_events(k.bootstrap_servers, k.topic, 50, prefix="idle")
    summary = run_stream(s)
    assert summary["status"] == "FINISHED" and summary["stop_reason"] == "idle_timeout"
    assert summary["rows_scored"] == 50


def test_a_restart_keeps_the_ledgers_version_when_the_alias_points_at_one_the_stream_cannot_serve(
    spark, make_settings, caplog
):
    import logging

    from mlflow import MlflowClient as Client

    from tests.helpers import register_broken_signature, register_raising

    s = make_settings(trigger={"available_now": True})
    v1 = train_and_register(s.model.name, "v1", alias="champion")
    k = s.source.kafka
    ensure_topic(k.bootstrap_servers, k.topic)
    produce_events(k.bootstrap_servers, k.topic, 60, prefix="keep")
    assert run_stream(s)["rows_by_version"] == {v1: 60}
    client = Client()
    caplog.set_level(logging.WARNING, logger="streamscore")
    for register, why in (
        (register_broken_signature, "does not fit"),
        (register_raising, "this model version is broken"),
    ):
        bad = register(s.model.name)
        client.set_registered_model_alias(s.model.name, "champion", bad)
        produce_events(k.bootstrap_servers, k.topic, 20, prefix=f"keep-{bad}")
        summary = run_stream(s)
        assert summary["status"] == "FINISHED" and summary["rows_by_version"] == {v1: 20}, why
        assert any(why in r.getMessage() and f"keeping version {v1}" in r.getMessage() for r in caplog.records)
    assert len(_read(spark, s.output_path)) == 100


def test_a_checkpoint_on_a_uri_keeps_its_ledger_beside_it(spark, make_settings, monkeypatch, tmp_path):
    """``file://`` goes through the same Hadoop file system API as ``dbfs:/`` or ``abfss://``."""

    uri = f"file://{tmp_path}/uri-checkpoint"
    s = make_settings(trigger={"max_batches": 1}, sink={"checkpoint_path": uri})
    v1 = train_and_register(s.model.name, "v1", alias="champion")
    k = s.source.kafka
    ensure_topic(k.bootstrap_servers, k.topic)
    produce_events(k.bootstrap_servers, k.topic, 80, prefix="uri")
    _run_crashing_after_the_first_write(s, monkeypatch)
    ledger = tmp_path / "uri-checkpoint" / "streamscore" / "batch_versions.jsonl"
    assert [json.loads(line)["version"] for line in ledger.read_text().splitlines()] == [v1]
    train_and_register(s.model.name, "v2", alias="champion")
    replay = run_stream(s)
    assert replay["rows_by_version"] == {v1: 80} and len(_read(spark, s.output_path)) == 80
