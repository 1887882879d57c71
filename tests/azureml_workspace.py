"""An Azure Machine Learning workspace's MLflow endpoint, emulated on this machine for the real
``azureml-mlflow`` plugin (Azure cannot be reached from here).

What the plugin does against Azure, it does here, with its own code:

- it always speaks HTTPS to the ``azureml://`` URI's host: the emulator serves TLS with a
  certificate from a test CA made for the test (``REQUESTS_CA_BUNDLE`` points at it);
- it gets its bearer token through ``azure-identity``'s credential chain: the emulator answers as
  a managed identity endpoint does (``IDENTITY_ENDPOINT`` + ``IDENTITY_HEADER``, the App Service
  protocol) and issues a token only for the right header;
- MLflow REST calls arrive under the workspace's scope (``/mlflow/v2.0/subscriptions/...``) and are
  passed on to a real MLflow server (so what was logged is read back with MLflow's own client);
  MLflow 3's logged-models API answers 404, as Azure ML's does;
- run artifacts go through Azure ML's artifact service (``/history/v1.0/.../artifacts/batch/metadata``
  hands out a SAS URL) and a blob upload (``azure-storage-blob`` PUT to that URL), which the
  emulator stores on the real server; runs therefore carry ``azureml://`` artifact URIs.

Anything else is answered 404 and recorded, so an unexpected call shows up in :attr:`calls`.
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
from urllib.parse import parse_qs, unquote, urlsplit

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


class AzureMLWorkspace:
    def __init__(
        self, upstream: str, folder: Path, subscription: str = "00000000-0000-0000-0000-00000000aaaa", rg: str = "rg"
    ):
        self.scope = SCOPE.format(sub=subscription, rg=rg, ws="ws")
        self.ca, cert, key = make_test_ca(folder)
        up = urlsplit(upstream)
        self._up = (up.hostname or "127.0.0.1", up.port or 80)
        self.token = "aad-" + secrets.token_hex(12)  # what the identity endpoint issues
        self.identity_header = secrets.token_hex(8)
        self._sas = "sig-" + secrets.token_hex(8)
        self.calls: list[Call] = []
        self.token_requests: list[dict[str, list[str]]] = []  # query of each token request
        self.blobs: dict[str, bytes] = {}  # artifact path -> bytes uploaded to the blob store
        self._lock = threading.Lock()
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

        class Api(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                body = read_body(self)
                with ws._lock:
                    ws.calls.append(Call(self.command, self.path, self.headers.get("Authorization"), body))
                path = urlsplit(self.path).path
                if path.startswith("/blobstore/"):  # SAS-signed: no bearer token here, as in Azure
                    ws._blob(self, path, body)
                elif self.headers.get("Authorization") != f"Bearer {ws.token}":
                    reply(self, 401, {"error_code": "UNAUTHENTICATED", "message": "invalid bearer token"})
                elif path.startswith(f"/mlflow/v2.0{ws.scope}/api/2.0/mlflow/") and "logged-models" not in path:
                    ws._mlflow(self, self.path[len(f"/mlflow/v2.0{ws.scope}") :], body)
                elif path.startswith(f"/history/v1.0{ws.scope}/") and path.endswith("/artifacts/batch/metadata"):
                    ws._artifact_metadata(self, path, body)
                else:
                    reply(self, 404, {"error_code": "ENDPOINT_NOT_FOUND", "message": f"{path} is not served here"})

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        self._identity = serve(Identity, "aml-identity")
        self._api = serve(Api, "aml-workspace", tls=(cert, key))
        self.host = f"localhost:{self._api.server_address[1]}"

    # -- what a job is given ----------------------------------------------------------------------
    def uri(self) -> str:
        return f"azureml://{self.host}/mlflow/v2.0{self.scope}"

    def env(self) -> dict[str, str]:
        return {
            "IDENTITY_ENDPOINT": f"http://127.0.0.1:{self._identity.server_address[1]}/msi/token",
            "IDENTITY_HEADER": self.identity_header,
            "REQUESTS_CA_BUNDLE": str(self.ca),
            "AZUREML_CURRENT_CLOUD": "AzureCloud",  # else the plugin asks Azure for its cloud list
        }

    def stop(self) -> None:
        for server in (self._api, self._identity):
            server.shutdown()
            server.server_close()

    def mlflow_calls(self) -> list[Call]:
        return [c for c in self.calls if "/api/2.0/mlflow/" in c.path]

    # -- the services -----------------------------------------------------------------------------
    def _mlflow(self, h: BaseHTTPRequestHandler, api_path: str, body: bytes) -> None:
        status, reason, headers, data = forward(
            *self._up, h.command, api_path, body or None, {"Content-Type": "application/json"}
        )
        # runs live in Azure ML's artifact store: their artifact URIs say so
        data = re.sub(
            rb"mlflow-artifacts:/(\w+)/(\w+)/artifacts",
            lambda m: f"{self.uri()}/experiments/{m[1].decode()}/runs/{m[2].decode()}/artifacts".encode(),
            data,
        )
        reply(h, status, data, {**headers, "Content-Type": "application/json"}, reason)

    def _artifact_metadata(self, h: BaseHTTPRequestHandler, path: str, body: bytes) -> None:
        m = re.search(r"/experiments/([^/]+)/runs/([^/]+)/artifacts/batch/metadata$", path)
        assert m is not None
        exp, run = m[1], m[2]
        wanted = [p["path"] for p in json.loads(body)["paths"]]
        info = {
            p: {
                "contentUri": f"https://{self.host}/blobstore/{exp}/{run}/artifacts/{p}"
                f"?sv=2021-08-06&sr=b&sp=rcw&sig={self._sas}",
                "origin": "ExperimentRun",
                "container": f"dcid.{run}",
                "path": p,
            }
            for p in wanted
        }
        artifacts = {p: {"origin": "ExperimentRun", "container": f"dcid.{run}", "path": p} for p in wanted}
        reply(h, 200, {"artifacts": artifacts, "artifactContentInformation": info, "errors": {}})

    def _blob(self, h: BaseHTTPRequestHandler, path: str, body: bytes) -> None:
        query = parse_qs(urlsplit(h.path).query)
        if query.get("sig") != [self._sas]:
            reply(h, 403, {"error": "AuthenticationFailed"})
            return
        if h.command != "PUT" or h.headers.get("x-ms-blob-type") != "BlockBlob":
            reply(h, 400, {"error": f"{h.command} {h.headers.get('x-ms-blob-type')} is not a block blob upload"})
            return
        rel = unquote(path[len("/blobstore/") :])  # {exp}/{run}/artifacts/{path}
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
        reply(
            h,
            201,
            None,
            {"ETag": f'"0x{secrets.token_hex(8)}"', "Last-Modified": now, "x-ms-request-server-encrypted": "true"},
        )
