"""Backfill on real Spark, Delta, Kafka and MLflow: exact rows once, idempotent reruns, own slices
per model version, comparison metrics equal to an independent computation."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from streamscore.backfill import run_backfill
from streamscore.conf.settings import BackfillRequest
from streamscore.demo import FEATURES, ensure_topic, iris_frame, produce_events, train_and_register
from streamscore.scoring.transform import HEADER_BACKFILL
from tests.helpers import read_topic, unique

pytestmark = pytest.mark.integration


def _backfill(settings, inp: dict, **options) -> dict:
    return run_backfill(settings, BackfillRequest.of(input=inp, **options))


@pytest.fixture
def events_table(spark, tmp_path):
    X, _ = iris_frame()
    src = X.copy()
    src.insert(0, "event_id", [f"h-{i}" for i in range(len(src))])
    src.insert(
        1,
        "event_time",
        [
            (dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(hours=i)).isoformat()
            for i in range(len(src))
        ],
    )
    src["day"] = [i // 24 for i in range(len(src))]
    src.loc[30, "sepal_length"] = None  # day 1: dead-lettered
    path = str(tmp_path / "history")
    spark.createDataFrame(src).write.format("delta").save(path)
    spark.createDataFrame(src.head(10)).write.format("delta").mode("append").save(path)  # version 1
    return path, src


def _slice(spark, path, bf_id) -> pd.DataFrame:
    return spark.read.format("delta").load(path).where(f"backfill_id = '{bf_id}'").toPandas()


@pytest.mark.heavy
def test_delta_range_rerun_and_second_version(spark, make_settings, events_table, tmp_path):
    path, src = events_table
    s = make_settings()
    v1 = train_and_register(s.model.name, "v1", alias="champion")
    v2 = train_and_register(s.model.name, "v2", alias=None)
    out, dead = str(tmp_path / "bf_out"), str(tmp_path / "bf_dead")
    inp = {"kind": "delta", "path": path, "version": 0, "where": "day BETWEEN 1 AND 3"}  # 72 rows, one bad
    expected = src[(src["day"] >= 1) & (src["day"] <= 3)]

    first = _backfill(s, inp, chunks=3, output_path=out, dead_letter_path=dead)
    assert (first["rows_in"], first["rows_scored"], first["rows_dead_lettered"]) == (72, 71, 1)
    rows = _slice(spark, out, first["backfill_id"])
    assert sorted(rows["event_id"]) == sorted(e for e in expected["event_id"] if e != "h-30")
    assert rows["event_id"].is_unique and len(rows) == 71 and set(rows["model_version"]) == {v1}
    model = mlflow.pyfunc.load_model(f"models:/{s.model.name}/{v1}")
    assert (model.predict(rows[FEATURES]) == rows["prediction"].to_numpy()).all()
    assert "missing required field 'sepal_length'" in _slice(spark, dead, first["backfill_id"])["reason"][0]

    again = _backfill(s, inp, chunks=2, output_path=out, dead_letter_path=dead)
    assert again["backfill_id"] == first["backfill_id"]
    assert len(spark.read.format("delta").load(out).toPandas()) == 71  # replaced, not duplicated
    assert len(spark.read.format("delta").load(dead).toPandas()) == 1

    other = _backfill(s, inp, model_ref=v2, output_path=out, dead_letter_path=dead)
    assert other["backfill_id"] != first["backfill_id"] and other["model_version"] == v2
    everything = spark.read.format("delta").load(out).toPandas()
    assert len(everything) == 142
    assert everything.groupby("backfill_id")["model_version"].agg(set).map(len).eq(1).all()
    assert set(_slice(spark, out, other["backfill_id"])["model_version"]) == {v2}

    run = MlflowClient().get_run(other["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["model.version"] == v2
    assert run.data.metrics["total_rows_scored"] == 71


def test_comparison_matches_the_models_own_predictions(spark, make_settings, events_table, tmp_path):
    path, src = events_table
    s = make_settings()
    v1 = train_and_register(s.model.name, "v1", alias="champion")
    v2 = train_and_register(s.model.name, "v2", alias=None)
    summary = _backfill(
        s,
        {"kind": "delta", "path": path, "version": 0},
        compare_with=v2,
        output_path=str(tmp_path / "o"),
        dead_letter_path=str(tmp_path / "d"),
    )
    valid = src.drop(index=30)
    p1 = mlflow.pyfunc.load_model(f"models:/{s.model.name}/{v1}").predict(valid[FEATURES])
    p2 = mlflow.pyfunc.load_model(f"models:/{s.model.name}/{v2}").predict(valid[FEATURES])
    agreement = float(np.mean(np.asarray(p1) == np.asarray(p2)))
    cmp = summary["comparison"]
    assert cmp["rows"] == len(valid) and cmp["kind"] == "classification"
    assert cmp["agreement"] == pytest.approx(agreement)
    assert agreement < 1.0  # the two demo versions really differ
    share1 = pd.Series(p1).astype(str).value_counts(normalize=True)
    share2 = pd.Series(p2).astype(str).value_counts(normalize=True)
    tvd = 0.5 * share1.sub(share2, fill_value=0).abs().sum()
    assert cmp["total_variation_distance"] == pytest.approx(tvd)
    client = MlflowClient()
    run = client.get_run(summary["run_id"])
    assert run.data.metrics["compare_agreement"] == pytest.approx(agreement)
    names = {a.path for a in client.list_artifacts(summary["run_id"], "comparison")}
    assert names == {"comparison/comparison.json", "comparison/prediction_distribution.png"}
    local = client.download_artifacts(summary["run_id"], "comparison/comparison.json", str(tmp_path))
    assert json.loads(Path(local).read_text())["versions"] == {"base": v1, "other": v2}


def test_kafka_offset_range(spark, make_settings, tmp_path):
    s = make_settings()
    train_and_register(s.model.name, "v1", alias="champion")
    k = s.source.kafka
    ensure_topic(k.bootstrap_servers, k.topic, partitions=1)
    sent = produce_events(k.bootstrap_servers, k.topic, 100, malformed_every=10, prefix="k")
    rng = {"kind": "kafka", "starting": json.dumps({k.topic: {"0": 20}}), "ending": json.dumps({k.topic: {"0": 60}})}
    out, dead = str(tmp_path / "ko"), str(tmp_path / "kd")
    topic = unique("backfilled")
    ensure_topic(k.bootstrap_servers, topic)
    summary = _backfill(s, rng, output_path=out, dead_letter_path=dead, kafka_topic=topic)
    assert summary["rows_in"] == 40 and summary["rows_dead_lettered"] == 4
    rows = spark.read.format("delta").load(out).toPandas()
    assert sorted(rows["source_offset"]) == [o for o in range(20, 60) if o % 10 != 9]
    assert set(rows["event_id"]) <= set(sent.valid_ids) and rows["event_id"].is_unique
    # --kafka-topic: the scored rows as messages too, each marked as this backfill's
    messages = read_topic(k.bootstrap_servers, topic)
    values = [json.loads(m.value()) for m in messages]
    assert sorted(v["source_offset"] for v in values) == sorted(rows["source_offset"])
    assert {v["prediction"] for v in values} <= set(rows["prediction"])
    assert {dict(m.headers())[HEADER_BACKFILL].decode() for m in messages} == set(rows["backfill_id"])
    _backfill(s, rng, output_path=out, dead_letter_path=dead)
    assert len(spark.read.format("delta").load(out).toPandas()) == 36


def test_time_travel_by_version_and_by_timestamp_reads_the_table_as_it_was(
    spark, make_settings, events_table, tmp_path
):
    from delta.tables import DeltaTable

    path, src = events_table  # version 0: 150 rows; version 1 appends the first 10 again
    s = make_settings()
    train_and_register(s.model.name, "v1", alias="champion")
    now = _backfill(
        s, {"kind": "delta", "path": path}, output_path=str(tmp_path / "o1"), dead_letter_path=str(tmp_path / "d1")
    )
    v0 = _backfill(
        s,
        {"kind": "delta", "path": path, "version": 0},
        output_path=str(tmp_path / "o2"),
        dead_letter_path=str(tmp_path / "d2"),
    )
    history = DeltaTable.forPath(spark, path).history().select("version", "timestamp").toPandas()
    at_v0 = history.loc[history["version"] == 0, "timestamp"].iloc[0]
    by_time = _backfill(
        s,
        {"kind": "delta", "path": path, "timestamp": str(at_v0)},
        output_path=str(tmp_path / "o3"),
        dead_letter_path=str(tmp_path / "d3"),
    )
    assert (now["rows_in"], v0["rows_in"], by_time["rows_in"]) == (160, 150, 150)
    assert now["backfill_id"] != v0["backfill_id"] != by_time["backfill_id"]


def test_kafka_timestamp_range(spark, make_settings, tmp_path):
    import time

    s = make_settings()
    train_and_register(s.model.name, "v1", alias="champion")
    k = s.source.kafka
    ensure_topic(k.bootstrap_servers, k.topic)
    produce_events(k.bootstrap_servers, k.topic, 40, prefix="early")
    time.sleep(1.5)
    middle = int(time.time() * 1000)
    time.sleep(1.5)
    late = produce_events(k.bootstrap_servers, k.topic, 30, prefix="late", start=40)
    summary = _backfill(
        s,
        {"kind": "kafka", "starting_timestamp": middle},
        output_path=str(tmp_path / "o"),
        dead_letter_path=str(tmp_path / "d"),
    )
    rows = spark.read.format("delta").load(str(tmp_path / "o")).toPandas()
    assert summary["rows_in"] == 30 and sorted(rows["event_id"]) == sorted(late.valid_ids)


def test_regression_comparison_matches_an_independent_computation(spark, make_settings, events_table, tmp_path):
    from sklearn.linear_model import LinearRegression, Ridge

    from tests.helpers import register_sklearn

    path, src = events_table
    s = make_settings()
    X, _ = iris_frame()
    target = X["petal_width"]  # a regression on the same four inputs (the feature leaks; fine for a test)
    base = register_sklearn(s.model.name, LinearRegression().fit(X, target), X, alias="champion")
    other = register_sklearn(s.model.name, Ridge(alpha=50.0).fit(X, target), X)
    summary = _backfill(
        s,
        {"kind": "delta", "path": path, "version": 0},
        compare_with=other,
        output_path=str(tmp_path / "o"),
        dead_letter_path=str(tmp_path / "d"),
    )
    valid = src.drop(index=30)[FEATURES]
    p1 = mlflow.pyfunc.load_model(f"models:/{s.model.name}/{base}").predict(valid)
    p2 = mlflow.pyfunc.load_model(f"models:/{s.model.name}/{other}").predict(valid)
    diff = np.abs(np.asarray(p1, dtype=float) - np.asarray(p2, dtype=float))
    cmp = summary["comparison"]
    assert cmp["kind"] == "regression" and cmp["rows"] == len(valid) and diff.max() > 0
    assert cmp["mean_abs_diff"] == pytest.approx(diff.mean()) and cmp["max_abs_diff"] == pytest.approx(diff.max())
    assert cmp["mean_shift"] == pytest.approx(float(np.mean(p2) - np.mean(p1)))


@pytest.mark.heavy
def test_the_command_line_path_with_a_named_slice(spark, make_settings, events_table, tmp_path):
    import subprocess
    import sys

    path, _ = events_table
    s = make_settings()
    train_and_register(s.model.name, "v1", alias="champion")
    out, dead = tmp_path / "cli_out", tmp_path / "cli_dead"
    sets = {
        "app.home": tmp_path / "home",
        "spark.master": "local[1]",
        "tracking.uri": s.tracking.uri,
        "tracking.experiment": s.tracking.experiment,
        "model.name": s.model.name,
    }
    args = [
        sys.executable,
        "-m",
        "streamscore",
        "backfill",
        "--delta",
        path,
        "--as-of-version",
        "0",
        "--where",
        "day = 2",
        "--backfill-id",
        "january-day-2",
        "--chunks",
        "2",
        "--output",
        str(out),
        "--dead-letter",
        str(dead),
    ] + [x for key, value in sets.items() for x in ("--set", f"{key}={value}")]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["status"] == "FINISHED" and summary["backfill_id"] == "january-day-2"
    assert (summary["rows_in"], summary["chunks_done"]) == (24, 2)
    rows = spark.read.format("delta").load(str(out)).toPandas()
    assert set(rows["backfill_id"]) == {"january-day-2"} and len(rows) == 24
    assert MlflowClient(s.tracking.uri).get_run(summary["run_id"]).data.params["backfill_id"] == "january-day-2"
