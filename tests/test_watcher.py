"""The registry watcher's gate on the real registry and Spark, driven poll by poll (no stream):
refusals are the candidate's fault, registry trouble is not; and the batch ledger survives a crash."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from streamscore.demo import train_and_register
from streamscore.registry_watch.watcher import BatchLedger
from streamscore.streaming import build_watcher
from tests.faultproxy import FaultProxy
from tests.helpers import register_worker_killer


@pytest.fixture
def watcher(spark, make_settings, tmp_path):
    def make(settings):
        t = settings.tracking  # the client as the jobs make it (lifecycle.JobContext)
        client = MlflowClient(t.effective_uri(), t.effective_registry_uri())
        w = build_watcher(settings, spark, client, BatchLedger(tmp_path / "ledger.jsonl"))
        w.start()
        return w

    return make


@pytest.mark.integration
def test_a_download_that_hangs_is_abandoned_in_time_and_retried_not_refused(services, make_settings, watcher):
    """The registry answers but its artifact downloads hang (a proxy in front of the real server
    holds them): the poll gives up after ``watch.download_timeout_s``, the version is not held
    against (no refusal), and once downloads answer again it is prepared after the backoff."""
    proxy = FaultProxy(services["mlflow"]).start()
    try:
        s = make_settings(tracking={"uri": proxy.address}, watch={"download_timeout_s": 2})
        train_and_register(s.model.name, "v1", alias="champion")
        w = watcher(s)
        v2 = train_and_register(s.model.name, "v2", alias="champion")
        proxy.hang("mlflow-artifacts")
        t0 = time.time()
        assert w.poll(force=True) == "validation-error"
        assert time.time() - t0 < 8 and proxy.held > 0  # the client alone would wait 10 s, twice
        assert w.refusals == [] and w.serving.version != v2
        proxy.heal()
        assert w.poll(force=True) == "retry-later"  # backoff: poll interval 0.5 s x 2
        time.sleep(1.1)
        assert w.poll(force=True) == "prepared"
        assert w.model_for_batch(0).version == v2
    finally:
        proxy.heal()
        proxy.stop()


@pytest.mark.integration
def test_a_version_must_be_ready(make_settings, watcher):
    """A version still registering is tried again later; one whose registration failed is refused."""
    from mlflow.entities.model_registry import ModelVersion

    from streamscore.errors import GateRefused, RegistryError
    from streamscore.registry_watch.resolve import ModelRef

    s = make_settings()
    train_and_register(s.model.name, "v1", alias="champion")
    w = watcher(s)
    v2 = train_and_register(s.model.name, "v2", alias=None)
    real = MlflowClient(s.tracking.uri).get_model_version(s.model.name, v2)

    def as_status(status: str) -> ModelVersion:
        return ModelVersion(real.name, real.version, real.creation_timestamp, run_id=real.run_id, status=status)

    with pytest.raises(RegistryError, match="not ready yet"):
        w.gate.admit(ModelRef("version", v2), w.spec, resolved=as_status("PENDING_REGISTRATION"))
    with pytest.raises(GateRefused, match="registration failed"):
        w.gate.admit(ModelRef("version", v2), w.spec, resolved=as_status("FAILED_REGISTRATION"))
    assert w.gate.admit(ModelRef("version", v2), w.spec, resolved=as_status("READY")).handle.version == v2


@pytest.mark.integration
def test_a_candidate_that_kills_its_worker_is_refused_and_the_old_version_serves(make_settings, watcher):
    s = make_settings()
    v1 = train_and_register(s.model.name, "v1", alias="champion")
    w = watcher(s)
    bad = register_worker_killer(s.model.name)
    MlflowClient(s.tracking.uri).set_registered_model_alias(s.model.name, "champion", bad)
    assert w.poll(force=True) == "refused"
    (refusal,) = w.refusals
    assert refusal.version == bad and "scoring the sample failed" in refusal.reason
    assert w.model_for_batch(0).version == v1
    assert w.poll(force=True) == "refused-recently"


def test_the_ledger_keeps_what_replays_need_and_no_more(tmp_path, monkeypatch):
    from streamscore.registry_watch import watcher as watcher_module

    monkeypatch.setattr(watcher_module, "LEDGER_KEEP", 5)
    ledger = BatchLedger(tmp_path / "ledger.jsonl")
    for b in range(23):
        ledger.record(b, "m", str(b // 10), "r")
    again = BatchLedger(tmp_path / "ledger.jsonl")
    kept = [b for b in range(23) if again.get(b) is not None]
    assert kept[-1] == 22 and 5 <= len(kept) <= 10 and again.get(0) is None


def test_a_torn_ledger_line_is_cut_and_the_ledger_goes_on(tmp_path):
    path = tmp_path / "batch_versions.jsonl"
    good = [{"batch_id": i, "name": "m", "version": "1", "run_id": "r", "at": 0} for i in range(2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in good) + '{"batch_id": 2, "na')
    ledger = BatchLedger(path)
    assert ledger.get(1)["version"] == "1" and ledger.get(2) is None
    ledger.record(2, "m", "2", "r2")
    again = BatchLedger(path)
    assert [again.get(i)["version"] for i in range(3)] == ["1", "1", "2"]


@pytest.mark.heavy
@pytest.mark.integration
def test_a_candidate_whose_predict_hangs_is_refused_within_the_time_limit(make_settings, watcher):
    import dataclasses

    from tests.helpers import register_hanging

    s = make_settings(watch={"gate_timeout_s": 30})  # the first version's start must fit in it on a busy machine
    v1 = train_and_register(s.model.name, "v1", alias="champion")
    w = watcher(s)
    w.gate.config = dataclasses.replace(w.gate.config, timeout_s=6.0)  # the candidate's limit: no need to wait 30 s
    bad = register_hanging(s.model.name)
    MlflowClient(s.tracking.uri).set_registered_model_alias(s.model.name, "champion", bad)
    t0 = time.time()
    assert w.poll(force=True) == "refused"
    assert time.time() - t0 < 60
    assert "watch.gate_timeout_s (6s)" in w.refusals[0].reason
    assert w.model_for_batch(0).version == v1


@pytest.mark.integration
def test_required_tag_policy(make_settings, watcher):
    s = make_settings(watch={"required_tag": "validation_status=approved"})
    v1 = train_and_register(s.model.name, "v1", alias="champion", tags={"validation_status": "approved"})
    w = watcher(s)
    assert w.serving.version == v1
    v2 = train_and_register(s.model.name, "v2", alias="champion")  # not approved
    assert w.poll(force=True) == "refused"
    assert "required tag validation_status=approved is missing" in w.refusals[0].reason
    v3 = train_and_register(s.model.name, "v2", alias="champion", tags={"validation_status": "pending"})
    assert w.poll(force=True) == "refused" and "is 'pending'" in w.refusals[1].reason
    assert w.model_for_batch(0).version == v1 and {v2, v3}.isdisjoint({w.serving.version})


@pytest.mark.integration
def test_latest_and_stage_references(make_settings, watcher):
    s = make_settings(model={"ref": "latest"})
    v1 = train_and_register(s.model.name, "v1", alias=None)
    w = watcher(s)
    assert w.serving.version == v1
    v2 = train_and_register(s.model.name, "v2", alias=None)
    assert w.poll(force=True) == "prepared" and w.model_for_batch(0).version == v2

    client = MlflowClient(s.tracking.uri)
    staged = make_settings(s.model.name, model={"ref": "stage:Production"})
    client.transition_model_version_stage(s.model.name, v1, "Production")
    w2 = build_watcher(staged, None, client, BatchLedger(Path(staged.checkpoint_path) / "ledger.jsonl"))
    assert w2.start().version == v1
    client.transition_model_version_stage(s.model.name, v2, "Production", archive_existing_versions=True)
    assert w2.poll(force=True) == "prepared" and w2.model_for_batch(0).version == v2
