"""Tables by name in a real catalog: the local Hive metastore ``streamscore services`` runs (the
tests' own instance), reached by the stream's subprocesses and by this process's Spark session.

What holds for paths holds for names: idempotent appends across a kill -9 inside a batch, the
checkpoint-reset rule, the restart schema check, backfill slices. Each table is read back by name
(Spark, through the catalog) and by the location the catalog gives (delta-rs, another reader)."""

from __future__ import annotations

import itertools
import json
import logging
import shutil

import pandas as pd
import pytest
from deltalake import DeltaTable as RsDeltaTable
from mlflow import MlflowClient

from streamscore.conf.settings import BackfillRequest, ConfigError, load_settings
from streamscore.demo import ensure_topic, iris_frame, produce_events, train_and_register
from streamscore.errors import SinkError
from streamscore.scoring import io as sio
from streamscore.scoring.tables import TableRef
from streamscore.streaming import run_stream
from tests.helpers import run_until_failpoint, stream_command, unique

_schemas = itertools.count()


def _schema_name() -> str:
    return unique(f"cat{next(_schemas)}", "_")


def _by_location(spark, name: str) -> pd.DataFrame:
    """The table read by another reader (delta-rs) at the location the catalog gives for it."""
    location = sio.location(spark, TableRef.named(name))
    return RsDeltaTable(location.removeprefix("file:")).to_pandas()


def test_names_are_checked_before_anything_starts(home):
    def settings(**sink):
        return load_settings("local", overrides={"app": {"home": str(home)}, "sink": sink})

    with pytest.raises(ConfigError, match=r"sink.output_table='ml.scored' and sink.output_path='/tmp/t' both"):
        settings(output_table="ml.scored", output_path="/tmp/t")
    with pytest.raises(ConfigError, match="is not a table name: expected schema.table"):
        settings(output_table="/tmp/scored")
    with pytest.raises(
        ConfigError, match=r"name the table ml.scored \(schema.table\), or set catalog.metastore=session"
    ):
        settings(output_table="main.ml.scored")
    assert str(settings(output_table="spark_catalog.ml.scored").output_table) == "spark_catalog.ml.scored"
    s = load_settings(
        "local", overrides={"sink": {"output_table": "main.ml.scored"}, "catalog": {"metastore": "session"}}
    )
    assert s.output_table.sql == "`main`.`ml`.`scored`" and not s.uses_catalog
    with pytest.raises(ConfigError, match="--output-table='a.b' and --output='/x' both"):
        BackfillRequest.of(input={"kind": "delta", "table": "a.src"}, output_table="a.b", output_path="/x")
    with pytest.raises(ConfigError, match=r"give the input table's name \(--table\) or its path \(--delta\)"):
        BackfillRequest.of(input={"kind": "delta"})


def _tables(out_name: str, dead_name: str) -> dict[str, str | None]:
    return {"output_table": out_name, "dead_letter_table": dead_name, "output_path": None, "dead_letter_path": None}


@pytest.mark.heavy
@pytest.mark.integration
def test_stream_to_named_tables_kill_inside_a_batch_then_checkpoint_reset(spark, make_settings, tmp_path, caplog):
    db = _schema_name()  # not created beforehand: the job creates it (catalog.create_schemas)
    out_name, dead_name = f"{db}.scored", f"{db}.dead_letter"
    s = make_settings(sink=_tables(out_name, dead_name))
    train_and_register(s.model.name, "v1", alias="champion")
    k = s.source.kafka
    ensure_topic(k.bootstrap_servers, k.topic)
    sent = produce_events(k.bootstrap_servers, k.topic, 900, malformed_every=20, prefix="named")
    home = tmp_path / "home"
    flags = {"source__kafka__max_offsets_per_trigger": "150", "trigger__processing_time": "0.5 seconds"}

    # killed between the two writes of its second batch
    run_until_failpoint(stream_command(s, home, **flags), tmp_path / "killed.log", "between-writes@2")
    batches = lambda name: set(spark.read.table(name).select("batch_id").toPandas()["batch_id"])  # noqa: E731
    killed_in = max(batches(out_name))  # the second batch: its scored rows are in, its dead letters not
    assert killed_in not in batches(dead_name) and batches(dead_name) == batches(out_name) - {killed_in}

    # the restart needs no fresh process: in this one, on the tests' Spark session (no JVM start);
    # it replays the killed batch (its offsets are in the checkpoint), then reads the rest at once
    drain = make_settings(
        s.model.name,
        source={"kafka": {"topic": k.topic, "max_offsets_per_trigger": 2000}},
        sink={**_tables(out_name, dead_name), "checkpoint_path": s.checkpoint_path},
        trigger={"available_now": True, "processing_time": "0.5 seconds"},
    )
    summary = run_stream(drain)
    assert summary["status"] == "FINISHED" and summary["output_table"] == out_name

    scored = spark.read.table(out_name).toPandas()
    dead = spark.read.table(dead_name).toPandas()
    assert len(scored) == len(set(scored["event_id"])) and set(scored["event_id"]) == set(sent.valid_ids)
    assert len(dead) == sent.malformed
    # another reader, at the location the catalog gives: the same rows
    other = _by_location(spark, out_name)
    assert sorted(other["event_id"]) == sorted(scored["event_id"])
    assert other.set_index("event_id")["prediction"].to_dict() == scored.set_index("event_id")["prediction"].to_dict()
    assert sio.location(spark, TableRef.named(out_name)).rstrip("/").endswith(f"{db}.db/scored")
    # tables the job created record their row changes (Lakehouse Monitoring reads them)
    detail = spark.sql(f"DESCRIBE DETAIL {out_name}").first()
    assert detail["properties"].get("delta.enableChangeDataFeed") == "true"
    changes = spark.read.option("readChangeFeed", "true").option("startingVersion", 0).table(out_name)
    assert changes.where("_change_type = 'insert'").count() == len(scored)

    # a new checkpoint on the same named tables: the job warns that events the source delivers
    # again are scored again, and its batches are written under a new Delta app id (with the old
    # one, Delta would skip batch ids 0, 1, ... as already written)
    shutil.rmtree(s.checkpoint_path)
    more = produce_events(k.bootstrap_servers, k.topic, 100, prefix="named-after-reset")
    with caplog.at_level(logging.WARNING, logger="streamscore"):
        assert run_stream(drain)["status"] == "FINISHED"
    warned = [r.getMessage() for r in caplog.records if "starting a new checkpoint" in r.getMessage()]
    assert warned and out_name in warned[0]
    rescored = spark.read.table(out_name).toPandas()
    assert len(rescored) == 2 * len(scored) + len(more.valid_ids)
    assert rescored["event_id"].value_counts().max() == 2


@pytest.mark.integration
def test_named_tables_schema_check_and_missing_schema(spark, home):
    db = _schema_name()
    spark.sql(f"CREATE SCHEMA {db}")
    table = TableRef.named(f"{db}.scored")
    spark.createDataFrame([("a", "x")], "event_id string, prediction string").write.format("delta").saveAsTable(
        table.name
    )
    wanted = spark.createDataFrame([], "event_id string, prediction double").schema
    with pytest.raises(SinkError, match=rf"Delta table {db}.scored does not fit v3: column 'prediction' is string"):
        sio.ensure_delta_table(spark, table, wanted, "v3")
    missing = TableRef.named(f"{_schema_name()}.scored")
    with pytest.raises(SinkError, match=r"schema `cat\d+_\w+` of table .* does not exist: create it \(CREATE SCHEMA"):
        sio.ensure_delta_table(spark, missing, wanted, "v3", sio.Creation(create_schema=False))


@pytest.mark.integration
def test_backfill_from_and_to_named_tables_replaces_its_slice(spark, make_settings):
    from streamscore.backfill import run_backfill

    db = _schema_name()
    spark.sql(f"CREATE SCHEMA {db}")
    X, _ = iris_frame()
    events = X.head(60).copy()
    events.insert(0, "event_id", [f"b{i}" for i in range(len(events))])
    events.insert(1, "event_time", [f"2026-01-01T00:{i:02d}:00+00:00" for i in range(len(events))])
    spark.createDataFrame(events).write.format("delta").saveAsTable(f"{db}.events")
    s = make_settings()
    train_and_register(s.model.name, "v1", alias="champion")
    request = BackfillRequest.of(
        input={"kind": "delta", "table": f"{db}.events", "where": "event_id != 'b0'"},
        output_table=f"{db}.backfill",
        dead_letter_table=f"{db}.backfill_dead",
        chunks=2,
    )
    first = run_backfill(s, request)
    assert first["status"] == "FINISHED" and first["rows_scored"] == 59, json.dumps(first)[-1500:]
    again = run_backfill(s, request)  # the same slice: replaced, not appended
    assert again["backfill_id"] == first["backfill_id"]
    out = spark.read.table(f"{db}.backfill").toPandas()
    assert len(out) == 59 and set(out["event_id"]) == {f"b{i}" for i in range(1, 60)}
    assert set(out["source"]) == {f"{db}.events"}
    assert len(_by_location(spark, f"{db}.backfill")) == 59

    # the same named table as a stream's source
    from streamscore.streaming import run_stream

    streamed = make_settings(
        s.model.name,
        source={"kind": "delta", "delta": {"table": f"{db}.events"}},
        sink={"output_table": f"{db}.streamed", "output_path": None},
        trigger={"available_now": True},
        monitor={"label_col": "label"},  # a column for labels joined later: null when scored
        tracking={"metrics_interval_s": 3600},  # one window: the job's end logs it
    )
    summary = run_stream(streamed)
    assert summary["status"] == "FINISHED" and summary["rows_scored"] == 60, summary
    rows = spark.read.table(f"{db}.streamed").toPandas()
    assert sorted(rows["event_id"]) == sorted(events["event_id"]) and set(rows["source"]) == {f"{db}.events"}
    client = MlflowClient(streamed.tracking.uri)
    (window,) = client.get_metric_history(summary["run_id"], "batches")
    assert window.value == summary["batches"] and window.step >= rows["batch_id"].max()
    assert client.get_metric_history(summary["run_id"], "rows_in")[0].value == 60
    assert client.get_metric_history(summary["run_id"], "batch_duration_s_max")
    types = dict(spark.read.table(f"{db}.streamed").dtypes)
    assert rows["label"].isna().all() and types["label"] == types["prediction"]
