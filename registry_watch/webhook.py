"""Receiver for MLflow model-registry webhooks: a faster trigger for the watcher (polling stays).

MLflow signs each delivery with HMAC-SHA256 over ``"<delivery id>.<unix timestamp>.<body>"`` and
sends ``X-MLflow-Signature: v1,<base64>``, ``X-MLflow-Delivery-Id`` and ``X-MLflow-Timestamp``.
A delivery with a missing or wrong signature, or older than ``max_age_s``, is rejected (401) and
changes nothing. An accepted ``model_version_alias.created`` / ``model_version.created`` event for
the watched model asks the watcher to poll now (the watcher coalesces requests: a burst of them
costs one poll). A delivery id seen before within the freshness window is answered "duplicate" and
changes nothing. The body length is checked from the header before anything is read (at most
64 KiB); a client has ``client_timeout_s`` to send its request; at most ``max_connections`` are
served at once, and any beyond are closed unread.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from streamscore.errors import ConfigError

if TYPE_CHECKING:
    from streamscore.conf.settings import WebhookSettings

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024  # registry events are small; a larger body is refused unread
EVENTS = {("model_version_alias", "created"), ("model_version", "created")}


def sign(secret: str, delivery_id: str, timestamp: str, body: str) -> str:
    digest = hmac.new(secret.encode(), f"{delivery_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(
    secret: str, headers: Mapping[str, str] | Message, body: bytes, max_age_s: float, now: float | None = None
) -> str | None:
    """None when the delivery is authentic and fresh, else why not."""
    signature = headers.get("X-MLflow-Signature")
    delivery_id = headers.get("X-MLflow-Delivery-Id")
    timestamp = headers.get("X-MLflow-Timestamp")
    if not (signature and delivery_id and timestamp):
        return "missing signature headers"
    try:
        age = (now or time.time()) - int(timestamp)
    except ValueError:
        return "bad timestamp"
    if abs(age) > max_age_s:
        return f"stale delivery ({age:.0f}s old)"
    expected = sign(secret, delivery_id, timestamp, body.decode("utf-8", errors="replace"))
    if not hmac.compare_digest(expected, signature):
        return "signature mismatch"
    return None


class WebhookReceiver:
    def __init__(self, config: WebhookSettings, model_name: str, on_event: Callable[[dict, float], None]):
        """``config``: the ``watch.webhook`` section (its secret is required here)."""
        if config.secret is None:
            raise ConfigError("watch.webhook.secret is required to receive webhooks")
        self.secret = config.secret.get_secret_value()
        self.model_name = model_name
        self.on_event = on_event
        self.max_age_s = config.max_age_s
        client_timeout_s, host, port, max_connections = (
            config.client_timeout_s,
            config.host,
            config.port,
            config.max_connections,
        )
        self.accepted = 0
        self.rejected = 0
        self.duplicates = 0
        self.refused_connections = 0
        # delivery id -> when it may be forgotten: a replay inside the freshness window is
        # recognised; after it, the stale check refuses the replay anyway
        self._seen: dict[str, float] = {}
        self._seen_lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            timeout = client_timeout_s  # seconds a client may take to send its request

            def do_POST(self) -> None:
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                except ValueError:
                    length = -1
                if not 0 <= length <= MAX_BODY_BYTES:
                    receiver.rejected += 1
                    return self._reply(413 if length > 0 else 400, {"error": "bad or oversized body length"})
                body = self.rfile.read(length)
                problem = verify(receiver.secret, self.headers, body, receiver.max_age_s)
                if problem:
                    receiver.rejected += 1
                    log.warning("webhook delivery rejected: %s", problem)
                    return self._reply(401, {"error": problem})
                try:
                    event = json.loads(body)
                except ValueError:
                    receiver.rejected += 1
                    return self._reply(400, {"error": "body is not JSON"})
                if not receiver._first_delivery(self.headers["X-MLflow-Delivery-Id"]):
                    receiver.duplicates += 1
                    return self._reply(200, {"status": "duplicate"})
                receiver.accepted += 1
                key = (event.get("entity"), event.get("action"))
                data = event.get("data") or {}
                if key in EVENTS and data.get("name") == receiver.model_name:
                    receiver.on_event(event, float(self.headers["X-MLflow-Timestamp"]))
                    return self._reply(200, {"status": "poll requested"})
                return self._reply(200, {"status": "ignored"})

            def _reply(self, code: int, payload: dict) -> None:
                raw = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("webhook %s", format % args)

        self.server = _BoundedServer((host, port), Handler, max_connections, self)
        self.thread = threading.Thread(target=self.server.serve_forever, name="streamscore-webhook", daemon=True)

    def _first_delivery(self, delivery_id: str) -> bool:
        now = time.time()
        with self._seen_lock:
            if len(self._seen) > 1024:
                self._seen = {d: t for d, t in self._seen.items() if t > now}
            if self._seen.get(delivery_id, 0) > now:
                return False
            self._seen[delivery_id] = now + 2 * self.max_age_s
            return True

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}/"

    def start(self) -> WebhookReceiver:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _BoundedServer(ThreadingHTTPServer):
    """At most ``max_connections`` connections are served at once (one thread each); a connection
    beyond that is closed at once, unread."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type, max_connections: int, receiver: WebhookReceiver):
        self._slots = threading.BoundedSemaphore(max_connections)
        self._receiver = receiver
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self._receiver.refused_connections += 1
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        # the slot is free before the connection closes: a client that sees its connection end
        # and connects again finds it free
        try:
            self.finish_request(request, client_address)
        except Exception:  # noqa: BLE001 - as socketserver's own thread does
            self.handle_error(request, client_address)
        finally:
            self._slots.release()
            self.shutdown_request(request)
