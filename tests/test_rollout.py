"""Safe rollout on the real services: a shadow version, a canary share, automatic rollback, and the
replay contract of a batch scored by several versions (kill -9, then a restart)."""

from __future__ import annotations

import datetime as dt

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from pyspark.sql import functions as F

from streamscore.demo import FEATURES, ensure_topic, iris_frame, make_event, promote, train_and_register
from streamscore.scoring.plan import canary_bucket
from tests.helpers import MARK, NoAnswerForMarkedRows, StreamThread, register_pyfunc, wait_for

pytestmark = pytest.mark.integration


def send(bootstrap: str, topic: str, prefix: str, count: int, marked_every: int = 0) -> dict[str, dict]:
    """``count`` valid events (iris rows, cycled); every ``marked_every``-th carries the mark.
    Returns the events by id."""
    from confluent_kafka import Producer

    X, _ = iris_frame()
    rows = X.to_dict(orient="records")
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
    sent = {}
    for n in range(count):
        row = dict(rows[n % len(rows)])
        if marked_every and n % marked_every == 0:
            row["sepal_width"] = MARK
        producer.produce(topic, make_event(n, prefix, row, dt.datetime.now(dt.timezone.utc)))
        sent[f"{prefix}-{n}"] = row
        producer.poll(0)
    assert producer.flush(30) == 0
    return sent


def own_predictions(name: str, version: str, events: dict[str, dict], ids) -> np.ndarray:
    model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    return np.asarray(model.predict(pd.DataFrame([events[i] for i in ids])[FEATURES]))


@pytest.mark.heavy
def test_a_canary_failing_on_a_third_of_its_rows_is_rolled_back_and_nothing_is_lost(spark, make_settings):
    s = make_settings(
        watch={
            "poll_interval_s": 0.5,
            "canary": {"fraction": 0.5, "promote_after_batches": 1000, "promote_after_rows": 0},
            "rollback": {"min_rows": 30, "max_model_error_rate": 0.05},
        },
        source={"kafka": {"max_offsets_per_trigger": 60}},
    )
    name, k = s.model.name, s.source.kafka
    v1 = train_and_register(name, "v1", alias="champion")
    ensure_topic(k.bootstrap_servers, k.topic)
    stream = StreamThread(s)
    p, w = stream.processor, stream.watcher
    events: dict[str, dict] = {}
    try:
        events |= send(k.bootstrap_servers, k.topic, "before", 120)
        wait_for(lambda: p.totals["rows_in"] >= 120, what="the first events scored")
        X, y = iris_frame()
        v2 = register_pyfunc(name, NoAnswerForMarkedRows(), X, y.to_numpy())
        promote(name, v2, "champion")  # the gate scores the stream's recent rows: none is marked
        wait_for(lambda: w.swap_pending, what="v2 through the gate")  # a canary from the next batch
        events |= send(k.bootstrap_servers, k.topic, "during", 600, marked_every=3)
        wait_for(lambda: w.rollbacks, timeout=180, what="the canary rolled back")
        events |= send(k.bootstrap_servers, k.topic, "after", 120)
        wait_for(lambda: p.totals["rows_in"] >= len(events), timeout=180, what="every event scored")
    finally:
        summary = stream.stop()

    # nothing lost, nothing twice, nothing dead-lettered: the rows the candidate failed on were
    # served by v1, and every row was scored by a version that passed the gate
    out = spark.read.format("delta").load(str(s.output_table)).toPandas()
    assert sorted(out["event_id"]) == sorted(events)
    assert spark.read.format("delta").load(str(s.dead_letter_table)).count() == 0
    assert set(out["model_version"]) == {v1, v2}
    by_v2 = out[out["model_version"] == v2]
    assert len(by_v2) and not any(events[i]["sepal_width"] == MARK for i in by_v2["event_id"])
    for version, rows in out.groupby("model_version"):
        assert list(rows["prediction"]) == list(own_predictions(name, version, events, rows["event_id"]))
    # the canary's rows are the events below the share by their hash, until the rollback
    (rb,) = w.rollbacks
    assert rb.version == v2 and rb.to_version == v1 and "max_model_error_rate" in rb.reason
    canary_batches = set(by_v2["batch_id"])
    during = out[out["batch_id"].isin(canary_batches)]
    assert all(
        (canary_bucket(i) < 0.5) == (v == v2) or events[i]["sepal_width"] == MARK
        for i, v in zip(during["event_id"], during["model_version"], strict=True)
    )
    after = out[out["batch_id"] > max(canary_batches)]
    assert len(after) and set(after["model_version"]) == {v1}
    # said in the summary, the log (a refusal) and the run: a tag with the reason and a metric
    assert [r["version"] for r in summary["rolled_back"]] == [v2] and summary["model_version"] == v1
    assert any(r.version == v2 and "rolled back" in r.reason for r in w.refusals)
    run = MlflowClient().get_run(summary["run_id"])
    assert "max_model_error_rate" in run.data.tags[f"streamscore.rolled_back.v{v2}"]
    assert run.data.metrics["rolled_back_version"] == float(v2)
    # the alias is the user's: the job did not move it
    assert MlflowClient().get_model_version_by_alias(name, "champion").version == v2
    errors = MlflowClient().get_metric_history(summary["run_id"], "canary_model_errors")
    tried = MlflowClient().get_metric_history(summary["run_id"], "canary_rows")
    assert sum(m.value for m in errors) / sum(m.value for m in tried) > 0.05


def test_the_canary_bucket_is_the_documented_sql_expression(spark):
    ids = [f"evt-{i}" for i in range(200)] + ["ü-ñ", "12345", ""]
    df = spark.createDataFrame(pd.DataFrame({"event_id": ids}))
    sql = df.select(
        "event_id", F.expr("conv(substr(sha2(event_id, 256), 1, 16), 16, 10) / pow(2, 64)").alias("b")
    ).toPandas()
    assert all(abs(b - canary_bucket(i)) < 1e-12 for i, b in zip(sql["event_id"], sql["b"], strict=True))
