"""A job that never ends and MLflow's per-run quota: batches folded into windows, runs continued
in new linked ones before the quota, swaps and refusals never lost. Against the Databricks
emulator in front of the tests' real MLflow server, which refuses metric logging past its quota."""

from __future__ import annotations

import json
import time

import pytest
from mlflow import MlflowClient

from streamscore.metrics import MetricsWindow
from streamscore.tracking import RunTracker


def _batch(rows: int, seconds: float, version: int) -> dict:
    return {
        "rows_in": rows,
        "rows_scored": rows - 1,
        "rows_dead_lettered": 1,
        "batch_duration_s": seconds,
        "rows_per_s": rows / seconds,
        "score_s": seconds / 2,
        "model_version": float(version),
        "tracking_metrics_dropped": 0,
    }


def test_a_window_sums_counts_averages_durations_and_keeps_the_last_version(monkeypatch):
    emitted: list[tuple[dict, int]] = []
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    window = MetricsWindow(60, lambda m, step: emitted.append((m, step)))
    for batch_id, (rows, seconds, version) in enumerate([(10, 1.0, 1), (30, 3.0, 1), (20, 2.0, 2)]):
        clock[0] += 10
        window.add(_batch(rows, seconds, version), batch_id)
    assert emitted == []  # 30 s of a 60 s window
    clock[0] += 40
    window.add(_batch(40, 2.0, 2), 3)
    ((m, step),) = emitted
    assert step == 3 and m["batches"] == 4
    assert (m["rows_in"], m["rows_scored"], m["rows_dead_lettered"]) == (100, 96, 4)
    assert m["batch_duration_s"] == 2.0 and m["batch_duration_s_max"] == 3.0 and m["score_s_max"] == 1.5
    assert m["rows_per_s"] == pytest.approx(100 / 70) and m["model_version"] == 2
    window.flush()  # nothing since: no step
    assert len(emitted) == 1
    # a shadow's comparison: the mean weighted by the rows compared, its max the maximum
    for batch_id, (compared, agreement, worst) in enumerate([(10, 1.0, 0.0), (30, 0.5, 0.8)], start=4):
        shadow = {"shadow_rows": compared, "shadow_rows_compared": compared, "shadow_agreement": agreement}
        window.add({**_batch(compared, 1.0, 2), **shadow, "shadow_max_abs_diff": worst}, batch_id)
    window.flush()
    m = emitted[-1][0]
    assert (m["shadow_rows"], m["shadow_agreement"], m["shadow_max_abs_diff"]) == (40, 0.625, 0.8)
    per_batch = MetricsWindow(0, lambda m, step: emitted.append((m, step)))
    per_batch.add(_batch(5, 0.5, 3), 9)
    assert emitted[-1] == (_batch(5, 0.5, 3), 9)  # interval 0: each batch its own step, as logged


@pytest.mark.integration
def test_thousands_of_batches_stay_under_the_quota_across_linked_runs(services, monkeypatch):
    """3,000 batches at one step each (the worst case, interval 0) through a run budget under the
    workspace's quota: every run stays under it, none of the workspace's refusals happen, the runs
    form one chain, and the latest holds every swap and refusal tag."""
    from tests.mlflow_workspaces import DatabricksWorkspace

    quota, budget = 4_000, 3_500
    ws = DatabricksWorkspace(services["mlflow"], metric_quota=quota)
    monkeypatch.setenv("DATABRICKS_HOST", ws.url)
    monkeypatch.setenv("DATABRICKS_TOKEN", ws.token)
    monkeypatch.delenv("DATABRICKS_CONFIG_PROFILE", raising=False)
    try:
        experiment = f"/Shared/rotation-{time.time_ns()}"
        tracker = RunTracker("databricks", _tracking(experiment, budget))
        first = tracker.start("stream", {"model": {"name": "fraud"}}, {"streamscore.job": "stream"})
        window = MetricsWindow(0, lambda m, step: tracker.log_metrics(m, step=step))
        for batch_id in range(3000):
            window.add(_batch(10, 0.2, 1 + batch_id // 1000), batch_id)
            if batch_id % 1000 == 999:
                tracker.set_tags({f"streamscore.swap.{batch_id // 1000}": f'{{"first_batch_id": {batch_id + 1}}}'})
            if batch_id == 1500:
                tracker.set_tags({"streamscore.refused.v9": "gate: scoring the sample failed"})
        assert tracker.finish("FINISHED", {"batches": 3000}, timeout_s=120)
        assert ws.refused_metric_calls == 0 and tracker.dropped == 0

        client = MlflowClient(services["mlflow"])
        runs = {r.info.run_id: r for r in client.search_runs([client.get_experiment_by_name(experiment).experiment_id])}
        chain = [first]
        while "streamscore.next_run_id" in runs[chain[-1]].data.tags:
            chain.append(runs[chain[-1]].data.tags["streamscore.next_run_id"])
        assert chain == tracker.run_ids and set(chain) == set(runs) and len(chain) >= 6  # 24,000 values
        rows_in = 0
        for i, run_id in enumerate(chain):
            run = runs[run_id]
            keys = run.data.metrics.keys()
            values = sum(len(client.get_metric_history(run_id, k)) for k in keys)
            assert values <= budget < quota, (run_id, values)
            rows_in += sum(m.value for m in client.get_metric_history(run_id, "rows_in"))
            assert run.data.params["model.name"] == "fraud" and run.info.status == "FINISHED", (i, len(chain))
            if i:
                assert run.data.tags["streamscore.previous_run_id"] == chain[i - 1]
                assert run.data.tags["streamscore.run_part"] == str(i + 1)
        assert rows_in == 30_000  # every batch's step landed in one of the runs
        latest = runs[chain[-1]].data.tags
        assert {"streamscore.swap.0", "streamscore.swap.1", "streamscore.swap.2", "streamscore.refused.v9"} <= set(
            latest
        )
        assert client.download_artifacts(chain[-1], "summary.json")

        # without rotation the workspace says no past its quota: what the budget avoids
        plain = RunTracker("databricks", _tracking(experiment, 10**9))
        plain.start("no-rotation", {}, {})
        for batch_id in range(700):
            plain.log_metrics(_batch(10, 0.2, 1), step=batch_id)
        assert not plain.flush() and ws.refused_metric_calls > 0 and plain.buffered > 0
        plain.finish("FINISHED", None, timeout_s=5)
    finally:
        ws.stop()


@pytest.mark.heavy
@pytest.mark.integration
def test_a_stream_rotates_its_runs_under_a_quota_and_keeps_swaps_and_refusals(
    spark, make_settings, services, monkeypatch
):
    """The stream job itself, tracking to the Databricks emulator with a small quota: one step per
    batch and a run budget under the quota, so the run is continued several times mid-stream,
    across a swap and a refusal. No metric call is refused; the chain of runs holds every batch's
    rows; the latest run has the swap, the refusal and summary.json; the summary names it."""
    from streamscore.demo import ensure_topic, produce_events, promote, train_and_register
    from tests.helpers import StreamThread, register_raising, wait_for
    from tests.mlflow_workspaces import DatabricksWorkspace

    for var in ("DATABRICKS_HOST", "DATABRICKS_TOKEN", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.setenv(var, "")  # so that what configure_mlflow sets is undone after the test
    monkeypatch.delenv("DATABRICKS_CONFIG_PROFILE", raising=False)
    ws = DatabricksWorkspace(services["mlflow"], metric_quota=150)
    experiment = f"/Shared/rotation-stream-{time.time_ns()}"
    s = make_settings(
        source={"kafka": {"max_offsets_per_trigger": 25}},
        trigger={"processing_time": "0.2 seconds"},
        tracking={
            "uri": "databricks",
            "registry_uri": services["mlflow"],
            "databricks_host": ws.url,
            "token": ws.token,
            "experiment": experiment,
            "metrics_interval_s": 0,
            "run_metric_budget": 120,
        },
    )
    name = s.model.name
    train_and_register(name, "v1", alias="champion")
    # registered before the stream starts: the job points this process's MLflow at the workspace
    v2 = train_and_register(name, "v2", alias=None)
    bad = register_raising(name)
    k = s.source.kafka
    ensure_topic(k.bootstrap_servers, k.topic)
    sent = produce_events(k.bootstrap_servers, k.topic, 600, malformed_every=30, prefix="rot")
    try:
        stream = StreamThread(s)
        p, w = stream.processor, stream.watcher
        wait_for(lambda: p.batches >= 6, what="six batches")
        promote(name, v2, "champion")
        wait_for(lambda: len(w.swaps) == 1 and w.swaps[0].first_batch_id is not None, what="the swap to v2")
        promote(name, bad, "champion")
        wait_for(lambda: any(r.version == bad for r in w.refusals), what="the refusal")
        wait_for(lambda: p.totals["rows_in"] >= sent.sent, timeout=240, what="every event")
        summary = stream.stop()
    finally:
        ws.stop()

    assert summary["status"] == "FINISHED" and ws.refused_metric_calls == 0
    client = MlflowClient(services["mlflow"])
    chain = summary["tracking_runs"]
    assert len(chain) >= 3 and chain[-1] == summary["run_id"]
    rows_in = 0
    for i, run_id in enumerate(chain):
        run = client.get_run(run_id)
        values = sum(len(client.get_metric_history(run_id, key)) for key in run.data.metrics)
        assert values <= 120, (i, values)
        rows_in += sum(m.value for m in client.get_metric_history(run_id, "rows_in"))
        if i:
            assert run.data.tags["streamscore.previous_run_id"] == chain[i - 1]
    assert rows_in == sent.sent == summary["rows_in"]
    latest = client.get_run(chain[-1]).data.tags
    assert "streamscore.swap.1" in latest and f"streamscore.refused.v{bad}" in latest
    with open(client.download_artifacts(chain[-1], "summary.json")) as f:
        assert json.load(f)["rows_in"] == sent.sent


def _tracking(experiment: str, budget: int):
    from streamscore.conf.settings import TrackingSettings

    return TrackingSettings(
        experiment=experiment, buffer_max_entries=100_000, run_metric_budget=budget, rotate_after_h=None
    )
