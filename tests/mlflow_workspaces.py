"""Cloud workspaces' MLflow endpoints, emulated on this machine for the real client libraries
(Azure and Databricks cannot be reached from here). Each is a front in front of a real MLflow
server: MLflow REST calls are passed on to it (so what a job logged is read back with MLflow's own
client), run artifact URIs are rewritten to the cloud's form so the client uses the cloud's own
artifact path, and file uploads land on the real server. Every request is recorded; anything the
cloud would not answer gets 404, so an unexpected call shows up in ``calls``.

:class:`AzureMLWorkspace`, for the ``azureml-mlflow`` plugin, which

- always speaks HTTPS to the ``azureml://`` URI's host: TLS with a certificate from a test CA made
  for the test (``REQUESTS_CA_BUNDLE`` points at it);
- gets its bearer token through ``azure-identity``'s credential chain: a managed identity endpoint
  (``IDENTITY_ENDPOINT`` + ``IDENTITY_HEADER``, the App Service protocol) issues it for the right
  header only;
- calls MLflow under the workspace's scope (``/mlflow/v2.0/subscriptions/...``); MLflow 3's
  logged-models API answers 404, as Azure ML's does;
- logs run artifacts through Azure ML's artifact service (``/history/v1.0/.../batch/metadata``
  hands out a SAS URL) and a blob upload (``azure-storage-blob`` PUT).

:class:`DatabricksWorkspace`, for MLflow's ``databricks`` tracking store (through
``databricks-sdk``'s configuration): bearer token auth, ``dbfs:/databricks/mlflow-tracking/``
artifact URIs, uploads through the Files API; the SDK's host metadata probe.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import re
import secrets
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

from tests.httpkit import forward, read_body, reply, serve

SCOPE = "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.MachineLearningServices/workspaces/{ws}"


@dataclass
class Call:
    method: str
    path: str
    authorization: str | None
    body: bytes


def make_test_ca(folder: Path) -> tuple[Path, Path, Path]:
    """A CA made for this test, and a server certificate it signed for localhost / 127.0.0.1:
    (CA certificate, server certificate, server key) as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.timezone.utc)
    valid = (now - dt.timedelta(minutes=5), now + dt.timedelta(days=1))
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "streamscore test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


class _MlflowFront:
    """Records, checks the bearer token, passes MLflow calls on, stores uploads on the real server."""

    server_name = "mlflow-front"

    def __init__(self, upstream: str, tls: tuple[Path, Path] | None = None):
        up = urlsplit(upstream)
        self._up = (up.hostname or "127.0.0.1", up.port or 80)
        self.token = "tok-" + secrets.token_hex(12)  # the only bearer token the API accepts
        self._sig = "sig-" + secrets.token_hex(8)  # signs the upload URLs handed out
        self.calls: list[Call] = []
        self.blobs: dict[str, bytes] = {}  # artifact path in its run -> bytes uploaded
        self._lock = threading.Lock()
        front = self

        class Api(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                body = read_body(self)
                with front._lock:
                    front.calls.append(Call(self.command, self.path, self.headers.get("Authorization"), body))
                path = urlsplit(self.path).path
                if front._open(self, path):  # what the cloud answers without a token
                    pass
                elif path.startswith("/upload/"):  # signed URL: no bearer token, as in the clouds
                    front._upload(self, path, body)
                elif path.startswith("/signed/"):  # a signed download URL (Files API offload)
                    front._signed_download(self, path)
                elif self.headers.get("Authorization") != f"Bearer {front.token}":
                    reply(self, 401, {"error_code": "UNAUTHENTICATED", "message": "invalid bearer token"})
                elif not front._route(self, path, body):
                    reply(self, 404, {"error_code": "ENDPOINT_NOT_FOUND", "message": f"{path} is not served here"})

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle

        self._api = serve(Api, self.server_name, tls=tls)
        self._scheme = "https" if tls else "http"
        self.host = f"{'localhost' if tls else '127.0.0.1'}:{self._api.server_address[1]}"
        self._servers = [self._api]

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()

    def mlflow_calls(self) -> list[Call]:
        return [c for c in self.calls if "/api/2.0/mlflow/" in c.path]

    # what a subclass answers: True when it did
    def _open(self, h: BaseHTTPRequestHandler, path: str) -> bool:
        return False

    def _route(self, h: BaseHTTPRequestHandler, path: str, body: bytes) -> bool:
        raise NotImplementedError

    def _artifact_root(self, experiment_id: str, run_id: str) -> str:
        raise NotImplementedError

    def _pass_mlflow(self, h: BaseHTTPRequestHandler, api_path: str, body: bytes) -> None:
        status, reason, headers, data = forward(
            *self._up, h.command, api_path, body or None, {"Content-Type": "application/json"}
        )
        data = re.sub(  # runs keep their artifacts in the cloud's store: their URIs say so
            rb"mlflow-artifacts:/(\w+)/(\w+)/artifacts",
            lambda m: self._artifact_root(m[1].decode(), m[2].decode()).encode(),
            data,
        )
        reply(h, status, data, {**headers, "Content-Type": "application/json"}, reason)

    def _signed_download(self, h: BaseHTTPRequestHandler, path: str) -> None:
        if parse_qs(urlsplit(h.path).query).get("sig") != [self._sig]:
            reply(h, 403, {"error": "AuthenticationFailed"})
            return
        self._serve_signed(h, unquote(path[len("/signed") :]))

    def _serve_signed(self, h: BaseHTTPRequestHandler, path: str) -> None:
        reply(h, 404, {"error": "not found"})

    def _upload_url(self, experiment_id: str, run_id: str, path: str) -> str:
        return f"{self._scheme}://{self.host}/upload/{experiment_id}/{run_id}/artifacts/{path}?sig={self._sig}"

    def _upload(self, h: BaseHTTPRequestHandler, path: str, body: bytes) -> None:
        if parse_qs(urlsplit(h.path).query).get("sig") != [self._sig]:
            reply(h, 403, {"error": "AuthenticationFailed"})
            return
        if h.command != "PUT":
            reply(h, 405, {"error": f"{h.command} is not an upload"})
            return
        self._store(h, unquote(path[len("/upload/") :]), body)

    def _store(self, h: BaseHTTPRequestHandler, rel: str, body: bytes) -> None:
        """``rel`` = {experiment id}/{run id}/artifacts/{path}: onto the real server."""
        status, _, _, data = forward(
            *self._up,
            "PUT",
            f"/api/2.0/mlflow-artifacts/artifacts/{rel}",
            body,
            {"Content-Type": "application/octet-stream"},
        )
        if status != 200:
            reply(h, 500, {"error": data.decode(errors="replace")})
            return
        with self._lock:
            self.blobs[rel.split("/artifacts/", 1)[1]] = body
        now = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime())
        reply(h, 201, None, {"ETag": f'"0x{secrets.token_hex(8)}"', "Last-Modified": now})


class AzureMLWorkspace(_MlflowFront):
    server_name = "aml-workspace"

    def __init__(self, upstream: str, folder: Path, subscription: str = "00000000-0000-0000-0000-00000000aaaa"):
        self.scope = SCOPE.format(sub=subscription, rg="rg", ws="ws")
        self.ca, cert, key = make_test_ca(folder)
        super().__init__(upstream, tls=(cert, key))
        self.identity_header = secrets.token_hex(8)
        self.token_requests: list[dict[str, list[str]]] = []  # query of each token request
        ws = self

        class Identity(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                query = parse_qs(urlsplit(self.path).query)
                with ws._lock:
                    ws.token_requests.append(query)
                if self.headers.get("X-IDENTITY-HEADER") != ws.identity_header:
                    reply(self, 401, {"error": "invalid_request", "error_description": "X-IDENTITY-HEADER"})
                    return
                reply(
                    self,
                    200,
                    {
                        "access_token": ws.token,
                        "expires_on": str(int(time.time()) + 3600),
                        "resource": query.get("resource", [""])[0],
                        "token_type": "Bearer",
                    },
                )

        self._identity = serve(Identity, "aml-identity")
        self._servers.append(self._identity)

    def uri(self) -> str:
        return f"azureml://{self.host}/mlflow/v2.0{self.scope}"

    def env(self) -> dict[str, str]:
        return {
            "IDENTITY_ENDPOINT": f"http://127.0.0.1:{self._identity.server_address[1]}/msi/token",
            "IDENTITY_HEADER": self.identity_header,
            "REQUESTS_CA_BUNDLE": str(self.ca),
            "AZUREML_CURRENT_CLOUD": "AzureCloud",  # else the plugin asks Azure for its cloud list
        }

    def _artifact_root(self, experiment_id: str, run_id: str) -> str:
        return f"{self.uri()}/experiments/{experiment_id}/runs/{run_id}/artifacts"

    def _route(self, h: BaseHTTPRequestHandler, path: str, body: bytes) -> bool:
        mlflow_prefix = f"/mlflow/v2.0{self.scope}"
        if path.startswith(f"{mlflow_prefix}/api/2.0/mlflow/") and "logged-models" not in path:
            self._pass_mlflow(h, h.path[len(mlflow_prefix) :], body)
            return True
        m = re.fullmatch(
            rf"/history/v1\.0{re.escape(self.scope)}/experiments/([^/]+)/runs/([^/]+)/artifacts/batch/metadata", path
        )
        if m and h.command == "POST":  # the artifact service hands out a SAS URL per path
            exp, run = m[1], m[2]
            wanted = [p["path"] for p in json.loads(body)["paths"]]
            where = {"origin": "ExperimentRun", "container": f"dcid.{run}"}
            info = {p: {"contentUri": self._upload_url(exp, run, p), **where, "path": p} for p in wanted}
            artifacts = {p: {**where, "path": p} for p in wanted}
            reply(h, 200, {"artifacts": artifacts, "artifactContentInformation": info, "errors": {}})
            return True
        return False

    def _upload(self, h: BaseHTTPRequestHandler, path: str, body: bytes) -> None:
        if h.headers.get("x-ms-blob-type") != "BlockBlob":
            reply(h, 400, {"error": "not a block blob upload"})
            return
        super()._upload(h, path, body)


class DatabricksWorkspace(_MlflowFront):
    """With ``metric_quota``, a run that would hold more metric values than that is refused, as
    Databricks refuses metric logging past its per-run limit on metric steps (documented on its
    resource-limits page as 1,000,000 in total per run): HTTP 400, ``RESOURCE_LIMIT_EXCEEDED``,
    nothing of the refused batch kept."""

    server_name = "databricks-workspace"
    metric_quota: int | None = None

    def __init__(self, upstream: str, tls: tuple[Path, Path] | None = None, metric_quota: int | None = None):
        super().__init__(upstream, tls)
        self.metric_quota = metric_quota
        self.metric_values: dict[str, int] = {}  # run id -> metric values taken
        self.refused_metric_calls = 0

    # -- Unity Catalog's model registry (``databricks-uc``), answered from the real server's ----------
    # registry: three-level names, aliases only (no stages; ``latest`` is a reserved alias), model
    # files through the Files API under /Models/<catalog>/<schema>/<model>/<version>/
    UC = "/api/2.0/mlflow/unity-catalog/"

    def _upstream_json(self, method: str, path: str, query: dict[str, str]) -> tuple[int, dict]:
        from urllib.parse import urlencode

        status, _, _, data = forward(*self._up, method, f"{path}?{urlencode(query)}", None, {})
        return status, json.loads(data or b"{}")

    def _uc_refuse(self, h: BaseHTTPRequestHandler, status: int, code: str, message: str) -> bool:
        reply(h, status, {"error_code": code, "message": message})
        return True

    @staticmethod
    def _uc_version(mv: dict) -> dict:
        out = {k: mv[k] for k in ("name", "version", "creation_timestamp", "last_updated_timestamp") if k in mv}
        out.update(
            source=mv.get("source", ""),
            run_id=mv.get("run_id", ""),
            status="READY" if mv.get("status") == "READY" else "PENDING_REGISTRATION",
            storage_location=mv.get("source", ""),
            aliases=[{"alias": a, "version": mv["version"]} for a in mv.get("aliases", [])],
            tags=mv.get("tags", []),
        )
        return out

    def _uc_model_version(self, h: BaseHTTPRequestHandler, op: str, query: dict[str, str], what: str) -> bool:
        status, data = self._upstream_json("GET", f"/api/2.0/mlflow/{op}", query)
        if status != 200:
            return self._uc_refuse(h, 404, "RESOURCE_DOES_NOT_EXIST", f"{what} not found")
        reply(h, 200, {"model_version": self._uc_version(data["model_version"])})
        return True

    def _uc_registry(self, h: BaseHTTPRequestHandler, path: str, body: bytes) -> bool:
        query = {k: v[0] for k, v in parse_qs(urlsplit(h.path).query).items()}
        if body:
            query.update(json.loads(body))
        op = path[len(self.UC) :]
        name = query.get("name", "")
        if op != "registered-models:is-databricks-sdk-models-artifact-repository-enabled" and name.count(".") != 2:
            return self._uc_refuse(
                h, 400, "INVALID_PARAMETER_VALUE", f"Model name '{name}' is not a three-level name catalog.schema.model"
            )
        if op == "registered-models:is-databricks-sdk-models-artifact-repository-enabled":
            reply(h, 200, {"is_databricks_sdk_models_artifact_repository_enabled": True})
            return True
        if op == "model-versions/emit-lineage":  # accepted, nothing kept here
            reply(h, 200, {})
            return True
        if op == "registered-models/alias":
            alias = query.get("alias", "")
            if alias.lower() == "latest":
                return self._uc_refuse(
                    h, 400, "INVALID_PARAMETER_VALUE", "'latest' is a reserved alias name in Unity Catalog"
                )
            if h.command != "GET":
                return False  # setting or deleting aliases: through the real server in the tests
            return self._uc_model_version(h, "registered-models/alias", query, f"alias {alias} of {name}")
        if op == "model-versions/get":
            return self._uc_model_version(h, "model-versions/get", query, f"{name} version {query.get('version')}")
        if op == "registered-models/get":
            status, data = self._upstream_json("GET", "/api/2.0/mlflow/registered-models/get", {"name": name})
            if status != 200:
                return self._uc_refuse(h, 404, "RESOURCE_DOES_NOT_EXIST", f"registered model {name}")
            rm = data["registered_model"]
            aliases = [{"alias": a["alias"], "version": a["version"]} for a in rm.get("aliases", [])]
            keep = ("name", "creation_timestamp", "last_updated_timestamp", "description")
            reply(h, 200, {"registered_model": {**{k: rm[k] for k in keep if k in rm}, "aliases": aliases}})
            return True
        return self._uc_refuse(h, 501, "NOT_IMPLEMENTED", f"{op} is not emulated")

    def _serve_signed(self, h: BaseHTTPRequestHandler, path: str) -> None:
        if path.startswith("/Models/"):
            self._model_files(h, "files", path[len("/Models/") :])
        else:
            reply(h, 404, {"error": "not found"})

    def _model_files(self, h: BaseHTTPRequestHandler, kind: str, rest: str) -> bool:
        """``/api/2.0/fs/{files,directories}/Models/<c>/<s>/<m>/<version>/<path>``: a version's
        files, read from where the real server keeps them (its download URI)."""
        parts = unquote(rest).strip("/").split("/")
        if len(parts) < 4:
            return self._uc_refuse(h, 404, "NOT_FOUND", "no such path")
        name, version, rel = ".".join(parts[:3]), parts[3], "/".join(parts[4:])
        status, data = self._upstream_json(
            "GET", "/api/2.0/mlflow/model-versions/get-download-uri", {"name": name, "version": version}
        )
        if status != 200:
            return self._uc_refuse(h, 404, "NOT_FOUND", f"{name} version {version}")
        root = data["artifact_uri"].split("mlflow-artifacts:/", 1)[-1].strip("/")
        target = f"{root}/{rel}".rstrip("/")
        if kind == "directories":
            status, listing = self._upstream_json("GET", "/api/2.0/mlflow-artifacts/artifacts", {"path": target})
            files = listing.get("files", [])
            if status != 200 or (rel and not files):  # a file, or nothing: not a directory
                return self._uc_refuse(h, 404, "NOT_FOUND", f"/Models/{rest} is not a directory")
            base = "/" + "/".join(["Models", *parts])
            contents = [
                {
                    "path": f"{base.rstrip('/')}/{f['path']}",
                    "name": f["path"],
                    "is_directory": bool(f.get("is_dir")),
                    **({} if f.get("is_dir") else {"file_size": int(f.get("file_size", 0))}),
                }
                for f in files
            ]
            reply(h, 200, None if h.command == "HEAD" else {"contents": contents})
            return True
        status, _, _, raw = forward(*self._up, "GET", f"/api/2.0/mlflow-artifacts/artifacts/{target}", None, {})
        if status != 200:
            return self._uc_refuse(h, 404, "NOT_FOUND", f"/Models/{rest}")
        now = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime())
        reply(h, 200, raw, {"Content-Type": "application/octet-stream", "Last-Modified": now})
        return True

    def _over_quota(self, h: BaseHTTPRequestHandler, path: str, body: bytes) -> bool:
        if self.metric_quota is None or not path.endswith(("/runs/log-batch", "/runs/log-metric")):
            return False
        request = json.loads(body or b"{}")
        run_id = request.get("run_id") or request.get("run_uuid") or ""
        n = len(request.get("metrics", [])) if path.endswith("log-batch") else 1
        with self._lock:
            have = self.metric_values.get(run_id, 0)
            if n and have + n > self.metric_quota:
                self.refused_metric_calls += 1
                refuse = True
            else:
                self.metric_values[run_id] = have + n
                refuse = False
        if refuse:
            reply(
                h,
                400,
                {
                    "error_code": "RESOURCE_LIMIT_EXCEEDED",
                    "message": f"Run {run_id} has reached the limit of {self.metric_quota} metric steps",
                },
            )
        return refuse

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def _artifact_root(self, experiment_id: str, run_id: str) -> str:
        return f"dbfs:/databricks/mlflow-tracking/{experiment_id}/{run_id}/artifacts"

    def _open(self, h: BaseHTTPRequestHandler, path: str) -> bool:
        if path == "/.well-known/databricks-config":  # the SDK's host metadata probe
            reply(h, 200, {"oidc_endpoint": f"{self.url}/oidc", "workspace_id": "7001002003004005"})
            return True
        return False

    def _route(self, h: BaseHTTPRequestHandler, path: str, body: bytes) -> bool:
        m = re.fullmatch(r"/api/2\.0/fs/files/WorkspaceInternal/Mlflow/Artifacts/(\w+)/Runs/(\w+)/artifacts/(.+)", path)
        if m and h.command == "PUT":  # run artifacts go through the Files API
            self._store(h, f"{m[1]}/{m[2]}/artifacts/{unquote(m[3])}", body)
            return True
        if path == "/api/2.0/fs/endpoints" and h.command == "GET":
            # the SDK's transfer-endpoint discovery (databricks-sdk 0.167+): this workspace has none
            # to offer, and the SDK falls back to its built-in order (presigned URLs, then Files API)
            reply(h, 404, {"error_code": "ENDPOINT_NOT_FOUND", "message": "endpoint discovery is not enabled"})
            return True
        if path == "/api/2.0/fs/create-download-url" and h.command == "POST":  # the SDK's download offload
            target = parse_qs(urlsplit(h.path).query).get("path", [""])[0]
            url = f"{self.url}/signed{quote(target)}?sig={self._sig}"
            reply(h, 200, {"url": url, "headers": []})
            return True
        m = re.fullmatch(r"/api/2\.0/fs/(files|directories)/Models/(.+)", path)
        if m and h.command in ("GET", "HEAD"):
            return self._model_files(h, m[1], m[2])
        if path.startswith(self.UC):
            return self._uc_registry(h, path, body)
        if path.startswith("/api/2.0/mlflow/"):
            if not self._over_quota(h, path, body):
                self._pass_mlflow(h, h.path, body)
            return True
        return False
