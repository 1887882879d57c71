"""What the tests' local HTTP servers share: start one (plain or TLS), read a request body, answer
with JSON or bytes, pass a request on to a real server."""

from __future__ import annotations

import http.client
import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


def serve(
    handler: type[BaseHTTPRequestHandler], name: str, tls: tuple[Path, Path] | None = None
) -> ThreadingHTTPServer:
    """A threading server on a loopback port the OS picks (no bind-then-release race), already
    serving; ``tls`` = (certificate chain, key) makes it HTTPS."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    if tls is not None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(tls[0]), str(tls[1]))
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, name=name, daemon=True).start()
    return server


def read_body(handler: BaseHTTPRequestHandler) -> bytes:
    n = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(n) if n > 0 else b""


def reply(
    handler: BaseHTTPRequestHandler,
    status: int,
    payload: Any = None,
    headers: dict[str, str] | None = None,
    reason: str | None = None,
) -> None:
    """Answer ``payload``: bytes as they are, anything else as JSON (None: an empty body)."""
    if isinstance(payload, bytes):
        raw, kind = payload, "application/octet-stream"
    else:
        raw, kind = (b"" if payload is None else json.dumps(payload).encode()), "application/json"
    handler.send_response(status, reason)
    sent = {k.lower() for k in (headers or {})}
    for k, v in (headers or {}).items():
        handler.send_header(k, v)
    if "content-type" not in sent:
        handler.send_header("Content-Type", kind)
    handler.send_header("Content-Length", str(len(raw)))
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(raw)


def forward(
    host: str, port: int, method: str, path: str, body: bytes | None, headers: dict[str, str], timeout: float = 120
) -> tuple[int, str, dict[str, str], bytes]:
    """The request as it came (hop-by-hop headers dropped) to a real server; its answer."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        sent = {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}
        conn.request(method, path, body=body, headers=sent)
        resp = conn.getresponse()
        data = resp.read()
        kept = {k: v for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP and k.lower() != "content-length"}
        return resp.status, resp.reason, kept, data
    finally:
        conn.close()
