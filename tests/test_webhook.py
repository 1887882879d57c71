"""Registry webhooks: HMAC verification, and real deliveries from the MLflow server."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest
import requests

from streamscore.registry_watch.webhook import WebhookReceiver, sign, verify

SECRET = "test-webhook-secret"


def _post(url, body: dict, secret=SECRET, ts=None, tamper=False):
    raw = json.dumps(body)
    delivery, ts = str(uuid.uuid4()), str(int(ts or time.time()))
    sig = sign(secret, delivery, ts, raw)
    headers = {
        "X-MLflow-Delivery-Id": delivery,
        "X-MLflow-Timestamp": ts,
        "X-MLflow-Signature": sig,
        "Content-Type": "application/json",
    }
    return requests.post(url, data=raw + (" " if tamper else ""), headers=headers, timeout=10)


@pytest.fixture
def receiver():
    events = []
    r = WebhookReceiver(SECRET, "m", lambda ev, ts: events.append((ev, ts))).start()
    r.events = events
    yield r
    r.stop()


EVENT = {
    "entity": "model_version_alias",
    "action": "created",
    "data": {"name": "m", "alias": "champion", "version": "2"},
}


def test_good_signature_requests_a_poll(receiver):
    resp = _post(receiver.url, EVENT)
    assert resp.status_code == 200 and resp.json()["status"] == "poll requested"
    assert len(receiver.events) == 1


@pytest.mark.parametrize(
    "kwargs, why",
    [
        ({"secret": "wrong-secret"}, "signature mismatch"),
        ({"tamper": True}, "signature mismatch"),
        ({"ts": time.time() - 3600}, "stale delivery"),
    ],
)
def test_bad_deliveries_are_rejected_and_change_nothing(receiver, kwargs, why):
    resp = _post(receiver.url, EVENT, **kwargs)
    assert resp.status_code == 401 and why in resp.json()["error"]
    assert receiver.events == [] and receiver.rejected == 1


def test_unsigned_delivery_is_rejected(receiver):
    resp = requests.post(receiver.url, json=EVENT, timeout=10)
    assert resp.status_code == 401 and receiver.events == []


def test_other_models_and_events_are_ignored(receiver):
    other = {**EVENT, "data": {**EVENT["data"], "name": "another-model"}}
    assert _post(receiver.url, other).json()["status"] == "ignored"
    assert _post(receiver.url, {**EVENT, "entity": "prompt"}).json()["status"] == "ignored"
    assert receiver.events == []


def test_verify_matches_mlflow_signing():
    from mlflow.webhooks.delivery import _generate_hmac_signature

    ts = str(int(time.time()))
    assert sign(SECRET, "d1", ts, '{"a": 1}') == _generate_hmac_signature(SECRET, "d1", ts, '{"a": 1}')
    assert (
        verify(
            SECRET,
            {"X-MLflow-Signature": sign(SECRET, "d1", ts, "x"), "X-MLflow-Delivery-Id": "d1", "X-MLflow-Timestamp": ts},
            b"x",
            300,
        )
        is None
    )


@pytest.mark.integration
def test_real_mlflow_server_delivery_reaches_the_receiver(tracking):
    from mlflow import MlflowClient

    from streamscore.demo import promote, train_and_register

    name = f"webhook-model-{int(time.time())}"
    v1 = train_and_register(name, "v1", alias=None)
    got = threading.Event()
    seen = []
    r = WebhookReceiver(SECRET, name, lambda ev, ts: (seen.append(ev), got.set())).start()
    client = MlflowClient()
    hook = client.create_webhook(name="t", url=r.url, secret=SECRET, events=["model_version_alias.created"])
    try:
        promote(name, v1, "champion")
        assert got.wait(60), "no webhook delivery from the MLflow server"
        assert seen[0]["data"]["alias"] == "champion" and str(seen[0]["data"]["version"]) == v1
        assert r.rejected == 0
    finally:
        client.delete_webhook(hook.webhook_id)
        r.stop()


@pytest.mark.integration
@pytest.mark.parametrize("ref", ["@champion", "latest"])
def test_a_stream_with_webhooks_swaps_on_a_delivery_and_removes_its_webhook(spark, make_settings, ref):
    """Polling is made so slow that only the webhook can trigger the swap in time: an alias move
    (``model_version_alias.created``) for ``@champion``, a new version (``model_version.created``)
    for ``latest``."""
    from mlflow import MlflowClient

    from streamscore.demo import ensure_topic, produce_events, promote, train_and_register
    from tests.helpers import StreamThread, wait_for

    s = make_settings(
        model={"ref": ref}, watch={"poll_interval_s": 3600, "webhook": {"enabled": True, "secret": SECRET}}
    )
    v1 = train_and_register(s.model.name, "v1", alias="champion")
    k = s.source.kafka
    ensure_topic(k.bootstrap_servers, k.topic)
    client = MlflowClient(s.tracking.uri)
    stream = StreamThread(s)
    try:
        hooks = [h for h in client.list_webhooks() if h.name == f"streamscore-{s.app_id}"]
        assert len(hooks) == 1
        produce_events(k.bootstrap_servers, k.topic, 50, prefix="wh1")
        wait_for(lambda: stream.processor.rows_by_version.get(v1, 0) == 50, what="rows by v1")
        v2 = train_and_register(s.model.name, "v2", alias=None)
        if ref == "@champion":
            assert not stream.watcher.swap_pending  # registering alone does not move the alias
            promote(s.model.name, v2, "champion")
        wait_for(lambda: stream.watcher.swap_pending or stream.watcher.swaps, timeout=90, what="webhook-driven swap")
        produce_events(k.bootstrap_servers, k.topic, 50, prefix="wh2", start=50)
        wait_for(lambda: stream.processor.rows_by_version.get(v2, 0) == 50, what="rows by v2")
    finally:
        summary = stream.stop()
    assert [(sw["from_version"], sw["to_version"]) for sw in summary["swaps"]] == [(v1, v2)]
    assert not [h for h in client.list_webhooks() if h.name == f"streamscore-{s.app_id}"]  # deleted at stop
