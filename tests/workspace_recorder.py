"""A local HTTP server that answers like a Databricks workspace's Jobs and Files APIs and records
every request, for the real ``databricks-sdk`` client to talk to (a workspace cannot be reached
from here). Runs move PENDING -> RUNNING -> TERMINATED one step per ``runs/get``; ``fail`` makes
the next matching requests answer with an error as the workspace would."""

from __future__ import annotations

import itertools
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.httpkit import read_body, reply, serve


@dataclass
class Call:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


@dataclass
class _Fault:
    path_part: str
    status: int
    error_code: str
    message: str
    times: int
    retry_after: int | None = None


@dataclass
class WorkspaceRecorder:
    result_state: str = "SUCCESS"  # how submitted runs end
    calls: list[Call] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)
    jobs: dict[int, dict] = field(default_factory=dict)  # job id -> settings
    runs: dict[int, dict] = field(default_factory=dict)  # run id -> {"steps": n, "job_id": ...}
    tokens: dict[str, int] = field(default_factory=dict)  # idempotency token -> run id

    def __post_init__(self) -> None:
        self._ids = itertools.count(101)
        self._faults: list[_Fault] = []
        self._lock = threading.Lock()
        rec = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                body = read_body(self)
                parts = urlsplit(self.path)
                call = Call(self.command, parts.path, parse_qs(parts.query), dict(self.headers), body)
                with rec._lock:
                    rec.calls.append(call)
                    status, payload, extra = rec._answer(call)
                reply(self, status, payload, extra)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle

        self._server = serve(Handler, "workspace-recorder")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def fail(
        self, path_part: str, status: int, error_code: str, message: str, times: int = 1, retry_after: int | None = None
    ) -> None:
        self._faults.append(_Fault(path_part, status, error_code, message, times, retry_after))

    def api_calls(self, part: str = "") -> list[Call]:
        return [c for c in self.calls if part in c.path]

    # -- the workspace -----------------------------------------------------------------------------
    def _answer(self, c: Call) -> tuple[int, Any, dict[str, str]]:
        for f in self._faults:
            if f.times > 0 and f.path_part in c.path:
                f.times -= 1
                extra = {"Retry-After": str(f.retry_after)} if f.retry_after is not None else {}
                return f.status, {"error_code": f.error_code, "message": f.message}, extra
        p = c.path
        if p.startswith("/api/2.0/fs/files/") and c.method == "PUT":
            self.files[p.removeprefix("/api/2.0/fs/files")] = c.body
            return 204, None, {}
        if p.startswith("/api/2.0/fs/directories/"):
            return 204, None, {}
        if p == "/api/2.2/jobs/list":
            name = (c.query.get("name") or [None])[0]
            found = [
                {"job_id": i, "settings": {"name": s.get("name")}}
                for i, s in self.jobs.items()
                if name is None or s.get("name") == name
            ]
            return 200, {"jobs": found, "has_more": False}, {}
        if p == "/api/2.2/jobs/create":
            job_id = next(self._ids)
            self.jobs[job_id] = c.json()
            return 200, {"job_id": job_id}, {}
        if p == "/api/2.2/jobs/reset":
            body = c.json()
            if body["job_id"] not in self.jobs:
                return (
                    400,
                    {"error_code": "INVALID_PARAMETER_VALUE", "message": f"Job {body['job_id']} does not exist."},
                    {},
                )
            self.jobs[body["job_id"]] = body["new_settings"]
            return 200, {}, {}
        if p == "/api/2.2/jobs/run-now":
            job_id = c.json()["job_id"]
            run_id = next(self._ids)
            self.runs[run_id] = {"steps": 0, "job_id": job_id}
            return 200, {"run_id": run_id, "number_in_job": run_id}, {}
        if p == "/api/2.2/jobs/runs/submit":
            token = c.json().get("idempotency_token")
            if token in self.tokens:
                return 200, {"run_id": self.tokens[token]}, {}
            run_id = next(self._ids)
            self.runs[run_id] = {"steps": 0, "job_id": None}
            if token:
                self.tokens[token] = run_id
            return 200, {"run_id": run_id}, {}
        if p == "/api/2.2/jobs/runs/get":
            run_id = int(c.query["run_id"][0])
            run = self.runs.get(run_id)
            if run is None:
                return 400, {"error_code": "INVALID_PARAMETER_VALUE", "message": f"Run {run_id} does not exist."}, {}
            states = ["PENDING", "RUNNING", "TERMINATED"]
            life = states[min(run["steps"], 2)]
            run["steps"] += 1
            state: dict[str, Any] = {"life_cycle_state": life, "state_message": "" if life != "TERMINATED" else "done"}
            if life == "TERMINATED":
                state["result_state"] = self.result_state
            return (
                200,
                {
                    "run_id": run_id,
                    "job_id": run["job_id"],
                    "state": state,
                    "run_page_url": f"{self.url}/#job/run/{run_id}",
                },
                {},
            )
        return 404, {"error_code": "ENDPOINT_NOT_FOUND", "message": f"no API at {c.method} {p}"}, {}
