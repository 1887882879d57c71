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


@pytest.mark.heavy
def test_shadow_and_canary_hold_across_a_kill_and_a_replay(spark, make_settings, tmp_path, home):
    """Run 1 serves v1 with v2 as its shadow. Then champion -> v3: run 2 starts v3 as a 0.2 canary
    and is killed (-9) once its first batch is in the ledger; the shadow alias moves to v1 before
    run 3, which replays that batch with the recorded versions (v1, canary v3, shadow v2), goes on
    with shadow v1 and the canary's recorded figures, and promotes v3 after its third batch."""
    from sklearn.linear_model import LogisticRegression

    from streamscore.streaming import run_stream
    from tests.helpers import run_until_failpoint, stream_command

    shadow_path = str(tmp_path / "shadow")
    s = make_settings(  # runs 1 and 3 in this process (its Spark session), run 2 in a process of its own
        watch={
            "shadow_ref": "@challenger",
            "canary": {"fraction": 0.2, "promote_after_batches": 3, "promote_after_rows": 0},
        },
        sink={"shadow_path": shadow_path},
        source={"kafka": {"max_offsets_per_trigger": 150}},
        trigger={"available_now": True},
    )
    name, k = s.model.name, s.source.kafka
    rollout = {
        "watch__shadow_ref": "@challenger",
        "watch__canary__fraction": "0.2",
        "watch__canary__promote_after_batches": "3",
        "watch__canary__promote_after_rows": "0",
        "sink__shadow_path": shadow_path,
        "source__kafka__max_offsets_per_trigger": "150",
    }
    v1 = train_and_register(name, "v1", alias="champion")
    v2 = train_and_register(name, "v2", alias="challenger")
    ensure_topic(k.bootstrap_servers, k.topic)
    events = send(k.bootstrap_servers, k.topic, "a", 300)
    first = run_stream(s)
    assert first["rows_by_version"] == {v1: 300} and first["shadow_version"] == v2

    v3 = train_and_register(name, "v3", alias="champion", estimator=LogisticRegression(C=0.05, max_iter=500))
    events |= send(k.bootstrap_servers, k.topic, "b", 450)
    run_until_failpoint(stream_command(s, home, **rollout), tmp_path / "run2.log", "after-ledger-write@1")
    promote(name, v1, "challenger")
    events |= send(k.bootstrap_servers, k.topic, "c", 300)
    third = run_stream(s)
    assert third["shadow_version"] == v1 and third["model_version"] == v3 and "canary" not in third
    (swap,) = third["swaps"]  # the canary promoted: its third batch (the replay counted) was its last
    assert (swap["from_version"], swap["to_version"]) == (v1, v3)

    out = spark.read.format("delta").load(str(s.output_table)).toPandas()
    assert sorted(out["event_id"]) == sorted(events)  # nothing lost, nothing twice
    for version, rows in out.groupby("model_version"):
        assert list(rows["prediction"]) == list(own_predictions(name, version, events, rows["event_id"]))
    # run 1: v1 alone; then each event goes by its hash (the same rule before and after the kill)
    # until the promotion, and v3 serves all after it
    assert set(out[out["event_id"].str.startswith("a-")]["model_version"]) == {v1}
    later = out[~out["event_id"].str.startswith("a-")]
    canary = later[later["batch_id"] < swap["first_batch_id"]]
    assert all(
        (canary_bucket(i) < 0.2) == (v == v3) for i, v in zip(canary["event_id"], canary["model_version"], strict=True)
    )
    share = (canary["model_version"] == v3).mean()
    assert len(canary) >= 300 and 0.12 < share < 0.28, share
    promoted = later[later["batch_id"] >= swap["first_batch_id"]]
    assert len(promoted) and set(promoted["model_version"]) == {v3}

    # the shadow table: every valid event once, the shadow's own predictions, the recorded shadow
    # for the replayed batch (v2, though the alias said v1 by then), v1 after it
    shadow = spark.read.format("delta").load(shadow_path).toPandas()
    assert sorted(shadow["event_id"]) == sorted(events)
    merged = shadow.merge(out[["event_id", "prediction", "model_version"]], on="event_id", suffixes=("", "_out"))
    assert (merged["prediction"] == merged["prediction_out"]).all()
    assert (merged["model_version"] == merged["model_version_out"]).all()
    for version, rows in shadow.groupby("shadow_model_version"):
        expected = own_predictions(name, version, events, rows["event_id"])
        assert list(rows["shadow_prediction"]) == list(expected) and rows["shadow_reason"].isna().all()
    first_b = int(out[out["event_id"].str.startswith("b-")]["batch_id"].min())
    per_batch = shadow.groupby("batch_id")["shadow_model_version"].agg(set)
    assert all(per_batch[b] == {v2} for b in per_batch.index if b <= first_b)
    assert all(per_batch[b] == {v1} for b in per_batch.index if b > first_b)

    # the per-batch shadow metrics are the shadow table's own comparison
    client = MlflowClient()
    for summary in (first, third):
        agreement = {int(m.step): m.value for m in client.get_metric_history(summary["run_id"], "shadow_agreement")}
        tvd = client.get_metric_history(summary["run_id"], "shadow_total_variation_distance")
        assert agreement and len(tvd) == len(agreement)
        for m in tvd:
            rows = shadow[shadow["batch_id"] == m.step]
            assert agreement[int(m.step)] == pytest.approx((rows["prediction"] == rows["shadow_prediction"]).mean())
            a = rows["prediction"].value_counts(normalize=True)
            b = rows["shadow_prediction"].value_counts(normalize=True)
            assert m.value == pytest.approx(0.5 * a.sub(b, fill_value=0.0).abs().sum())
