"""A fault injector in front of a real HTTP server (the tests' MLflow server).

Requests pass through unchanged until the test says :meth:`FaultProxy.hang`: from then on the proxy
accepts connections and reads requests (all of them, or those whose path contains a given text) but
never answers, as a server stuck behind a load balancer does. :meth:`FaultProxy.heal` lets requests
through again (the ones held meanwhile get their connection closed, unanswered). Clients talk to
the proxy with their real libraries; only the network between them is faulty.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from tests.httpkit import forward, read_body, reply, serve


class FaultProxy:
    def __init__(self, upstream: str):
        parts = urlsplit(upstream)
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 80
        self._hang_paths: list[str] | None = None  # None: pass everything; "" matches every path
        self._lock = threading.Lock()
        self._healed = threading.Event()
        self._closing = threading.Event()
        self.held = 0  # requests left unanswered so far
        self.passed = 0
        self.seen: list[tuple[str, str, str | None]] = []  # (method, path, Authorization header)
        self.refuse: dict[str, int] = {}  # path part -> status answered instead of passing through
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _handle(self) -> None:
                body = read_body(self) or None
                with proxy._lock:
                    proxy.seen.append((self.command, self.path, self.headers.get("Authorization")))
                refused = next((code for part, code in proxy.refuse.items() if part in self.path), None)
                if refused is not None:  # an API this server does not have
                    reply(self, refused, {"error_code": "ENDPOINT_NOT_FOUND", "message": "not implemented here"})
                    return
                if proxy._should_hang(self.path):
                    with proxy._lock:
                        proxy.held += 1
                    while not (proxy._healed.wait(0.5) or proxy._closing.is_set()):
                        pass
                    self.close_connection = True
                    return
                status, reason, headers, data = forward(
                    proxy.upstream_host, proxy.upstream_port, self.command, self.path, body, dict(self.headers)
                )
                with proxy._lock:
                    proxy.passed += 1
                reply(self, status, data, headers, reason)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle

        self._handler = Handler
        self._server: ThreadingHTTPServer | None = None

    @property
    def address(self) -> str:
        assert self._server is not None, "start() the proxy first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FaultProxy:
        self._server = serve(self._handler, "fault-proxy")
        return self

    def hang(self, path_contains: str = "") -> None:
        """From now on, leave requests (whose path contains ``path_contains``) unanswered."""
        with self._lock:
            self._healed.clear()
            self._hang_paths = [*(self._hang_paths or []), path_contains]

    def heal(self) -> None:
        with self._lock:
            self._hang_paths = None
            self._healed.set()

    def _should_hang(self, path: str) -> bool:
        with self._lock:
            return self._hang_paths is not None and any(p in path for p in self._hang_paths)

    def stop(self) -> None:
        self._closing.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
