"""Hot swap inside the running query, on the real services, while events keep arriving."""

from __future__ import annotations

import threading

import mlflow.pyfunc
import pytest
from mlflow import MlflowClient

from streamscore.demo import FEATURES, ensure_topic, produce_events, promote, train_and_register
from tests.helpers import StreamThread, register_broken_signature, register_raising, wait_for

pytestmark = pytest.mark.integration


class Producer(threading.Thread):
    """Keeps sending events in small rounds until stopped; remembers every valid id."""

    def __init__(self, bootstrap, topic):
        super().__init__(daemon=True)
        self.bootstrap, self.topic = bootstrap, topic
        self.valid_ids: list[str] = []
        self.sent = self.malformed = 0
        self.stop_evt = threading.Event()
        self.error = None

    def run(self):
        n = 0
        try:
            while not self.stop_evt.is_set():
                r = produce_events(self.bootstrap, self.topic, 100, malformed_every=20, rate=400, prefix="hs", start=n)
                n += 100
                self.valid_ids += r.valid_ids
                self.sent += r.sent
                self.malformed += r.malformed
        except Exception as e:  # noqa: BLE001
            self.error = e

    def stop(self):
        self.stop_evt.set()
        self.join(60)
        assert self.error is None, self.error


@pytest.mark.heavy
def test_swap_refuse_and_rollback_without_restarting_the_query(spark, make_settings):
    s = make_settings()
    name = s.model.name
    v1 = train_and_register(name, "v1", alias="champion")
    k = s.source.kafka
    ensure_topic(k.bootstrap_servers, k.topic)
    producer = Producer(k.bootstrap_servers, k.topic)
    producer.start()
    stream = StreamThread(s)
    query_id = stream.handle.query_id
    p, w = stream.processor, stream.watcher
    try:
        wait_for(lambda: p.rows_by_version.get(v1, 0) > 0, what="rows scored by v1")

        v2 = train_and_register(name, "v2", alias=None)
        promote(name, v2, "champion")
        wait_for(lambda: p.rows_by_version.get(v2, 0) > 0, what="rows scored by v2")

        v3 = register_broken_signature(name)
        promote(name, v3, "champion")
        wait_for(lambda: any(r.version == v3 for r in w.refusals), what="v3 refused")
        v4 = register_raising(name)
        promote(name, v4, "champion")
        wait_for(lambda: any(r.version == v4 for r in w.refusals), what="v4 refused")
        scored_by_v2 = p.rows_by_version[v2]
        wait_for(lambda: p.rows_by_version[v2] > scored_by_v2, what="v2 still serving after refusals")

        promote(name, v1, "champion")  # rollback
        wait_for(lambda: len(w.swaps) == 2 and w.swaps[1].first_batch_id is not None, what="swap back to v1")
        batches_after_rollback = p.batches
        wait_for(lambda: p.batches > batches_after_rollback + 1 and p.rows_by_version[v1] > 0, what="v1 again")
        producer.stop()
        wait_for(lambda: p.totals["rows_in"] >= producer.sent, timeout=180, what="all events processed")
    finally:  # whatever failed above, neither the producer nor the query outlives the test
        producer.stop()
        summary = stream.stop()

    assert summary["query_id"] == query_id  # never restarted
    refusals = {r["version"]: r["reason"] for r in summary["refused"]}
    assert "needs input 'petal_area'" in refusals[v3]
    assert "this model version is broken" in refusals[v4]
    assert [(sw["from_version"], sw["to_version"]) for sw in summary["swaps"]] == [(v1, v2), (v2, v1)]
    assert all(sw["swap_latency_s"] is not None and sw["swap_latency_s"] > 0 for sw in summary["swaps"])

    out = spark.read.format("delta").load(s.output_path).toPandas()
    # every valid event scored exactly once, nothing lost
    assert len(out) == len(producer.valid_ids) and out["event_id"].is_unique
    assert set(out["event_id"]) == set(producer.valid_ids)
    dead = spark.read.format("delta").load(s.dead_letter_path).toPandas()
    assert len(dead) == producer.malformed
    # no batch mixes versions, and the table's version sequence is v1, then v2, then v1 again
    per_batch = out.groupby("batch_id")["model_version"].agg(set)
    assert per_batch.map(len).eq(1).all()
    sequence = [next(iter(v)) for v in per_batch.sort_index()]
    assert [v for i, v in enumerate(sequence) if i == 0 or v != sequence[i - 1]] == [v1, v2, v1]
    assert not set(out["model_version"]) & {v3, v4}
    # each row's prediction is its labelled version's own prediction (and the versions disagree on
    # some of these rows, so a stale model behind a correct label would be caught)
    disagreements = 0
    for version, rows in out.groupby("model_version"):
        own = mlflow.pyfunc.load_model(f"models:/{name}/{version}").predict(rows[FEATURES])
        assert (own == rows["prediction"].to_numpy()).all(), version
        other = mlflow.pyfunc.load_model(f"models:/{name}/{v2 if version == v1 else v1}").predict(rows[FEATURES])
        disagreements += int((other != own).sum())
    assert disagreements > 0
    # an independent reader agrees: the run's model_version metric per batch matches the table
    history = {
        int(m.step): str(int(m.value)) for m in MlflowClient().get_metric_history(summary["run_id"], "model_version")
    }
    assert all(history[b] == next(iter(v)) for b, v in per_batch.items())
    # the swaps and refusals are visible in MLflow
    run = MlflowClient().get_run(summary["run_id"])
    assert "streamscore.swap.1" in run.data.tags and f"streamscore.refused.v{v3}" in run.data.tags
    assert len(MlflowClient().get_metric_history(summary["run_id"], "swap_latency_s")) == 2
