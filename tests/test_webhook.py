"""Registry webhooks: HMAC verification, and real deliveries from the MLflow server."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid

import pytest
import requests

from streamscore.registry_watch.webhook import WebhookReceiver, sign, verify
from tests.helpers import unique

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


def _config(**values):
    from streamscore.conf.settings import WebhookSettings

    return WebhookSettings(enabled=True, secret=SECRET, **values)


@pytest.fixture
def receiver():
    events = []
    r = WebhookReceiver(_config(), "m", lambda ev, ts: events.append((ev, ts))).start()
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


def _no_delivery(client, webhook_id: str, server_log: str) -> str:
    """Why no delivery came: the server's own test delivery to the same webhook, its webhook list,
    and what its log says about webhooks."""
    from pathlib import Path

    probe = client.test_webhook(webhook_id)
    hooks = [(h.name, h.url, [str(e) for e in h.events]) for h in client.list_webhooks()]
    lines = [line for line in Path(server_log).read_text(errors="replace").splitlines() if "ebhook" in line]
    return f"no webhook delivery from the MLflow server; test delivery: {probe}; webhooks: {hooks}; log: {lines[-20:]}"


@pytest.mark.integration
def test_real_mlflow_server_delivery_reaches_the_receiver(services, tracking):
    from mlflow import MlflowClient

    from streamscore.demo import promote, train_and_register

    name = unique("webhook-model")
    v1 = train_and_register(name, "v1", alias=None)
    got = threading.Event()
    seen = []
    r = WebhookReceiver(_config(), name, lambda ev, ts: (seen.append(ev), got.set())).start()
    client = MlflowClient()
    hook = client.create_webhook(name="t", url=r.url, secret=SECRET, events=["model_version_alias.created"])
    try:
        # the server tries an event once: when listing its webhooks fails (its store busy under the
        # other worker's load, say) it logs the error and drops the event (mlflow.webhooks.delivery).
        # One CI run saw no delivery in 60 s; the alias is set again after 30 s, at most twice more,
        # and every delivery that does arrive must verify
        for _ in range(3):
            promote(name, v1, "champion")
            if got.wait(30):
                break
        assert got.is_set(), _no_delivery(client, hook.webhook_id, services["mlflow_log"])
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


def _signed(body: dict, delivery: str | None = None) -> tuple[str, dict]:
    raw, delivery, ts = json.dumps(body), delivery or str(uuid.uuid4()), str(int(time.time()))
    return raw, {
        "X-MLflow-Delivery-Id": delivery,
        "X-MLflow-Timestamp": ts,
        "X-MLflow-Signature": sign(SECRET, delivery, ts, raw),
    }


def test_a_replayed_delivery_requests_one_poll_and_forged_ones_none(receiver):
    raw, headers = _signed(EVENT)
    first = requests.post(receiver.url, data=raw, headers=headers, timeout=10)
    again = [requests.post(receiver.url, data=raw, headers=headers, timeout=10) for _ in range(5)]
    assert first.json()["status"] == "poll requested"
    assert {r.json()["status"] for r in again} == {"duplicate"} and receiver.duplicates == 5
    for i in range(100):  # forged: signed with another secret, or a valid id with another body
        _, h = _signed(EVENT)
        forged = {**h, "X-MLflow-Signature": sign("guess", h["X-MLflow-Delivery-Id"], h["X-MLflow-Timestamp"], raw)}
        resp = requests.post(receiver.url, data=raw if i % 2 else raw + " ", headers=forged, timeout=10)
        assert resp.status_code == 401
    assert len(receiver.events) == 1 and receiver.rejected == 100


def _raw_request(url: str, head: bytes) -> socket.socket:
    host, port = url.removeprefix("http://").rstrip("/").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(head)
    return sock


def test_an_oversized_body_is_refused_from_its_header_unread(receiver):
    _, headers = _signed(EVENT)
    lines = [f"{k}: {v}" for k, v in headers.items()] + ["Content-Length: 1073741824"]
    sock = _raw_request(receiver.url, ("POST / HTTP/1.1\r\nHost: x\r\n" + "\r\n".join(lines) + "\r\n\r\n").encode())
    started = time.monotonic()
    answer = sock.recv(4096)  # answered without the client sending any of the 1 GiB
    sock.close()
    assert answer.startswith(b"HTTP/1.0 413") and time.monotonic() - started < 5
    assert receiver.events == [] and receiver.rejected == 1


def test_slow_clients_time_out_and_connections_beyond_the_bound_are_closed():
    events = []
    r = WebhookReceiver(_config(max_connections=3, client_timeout_s=1.5), "m", lambda ev, ts: events.append(ev))
    r.start()
    try:
        slow = [_raw_request(r.url, b"POST / HTTP/1.1\r\nHost: x\r\n") for _ in range(3)]  # never finish
        time.sleep(0.3)
        extra = _raw_request(r.url, b"")
        assert extra.recv(100) == b""  # closed at once: every slot is held
        raw, headers = _signed(EVENT)
        started = time.monotonic()
        for sock in slow:
            assert sock.recv(100) == b""  # each slow client is dropped after its timeout
        assert 1.0 < time.monotonic() - started + 0.3 < 8
        resp = requests.post(r.url, data=raw, headers=headers, timeout=10)  # slots free again
        assert resp.json()["status"] == "poll requested" and len(events) == 1
        assert r.refused_connections >= 1
    finally:
        r.stop()
