"""Credentials per tracking target, held in this process only.

MLflow's HTTP client takes a bearer token from ``MLFLOW_TRACKING_TOKEN``: one process-wide
variable, sent to every server the process talks to (the mirror too) and inherited by every child
(the Spark JVM and its Python workers, which run model code). Instead, each target's token is kept
here, keyed by the target's URI, and added to a request only when the request's URL is under that
target. MLflow reaches this through its request-auth plugin point (the ``mlflow.request_auth_provider``
entry point named ``streamscore``, selected by ``MLFLOW_TRACKING_AUTH=streamscore``, which is not a
secret).

Databricks and Azure targets authenticate through their SDKs' own configuration (``DATABRICKS_TOKEN``,
``AZURE_CLIENT_SECRET``, ...); :func:`hidden_from_children` keeps those variables out of the Spark
JVM's environment, so neither the JVM nor the Python workers it forks inherit them.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

from requests import PreparedRequest
from requests.auth import AuthBase

AUTH_NAME = "streamscore"

_lock = threading.Lock()
_tokens: dict[str, str] = {}  # normalised target URI prefix -> token
# credentials the client libraries read from the environment (MLflow, the Databricks SDK, Azure)
SECRET_ENV_VARS = frozenset(
    {
        "MLFLOW_TRACKING_TOKEN",
        "MLFLOW_TRACKING_PASSWORD",
        "DATABRICKS_TOKEN",
        "DATABRICKS_CLIENT_SECRET",
        "AZURE_CLIENT_SECRET",
        "AZURE_CLIENT_CERTIFICATE_PASSWORD",
    }
)


def _prefix(uri: str) -> str:
    parts = urlsplit(uri)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    path = parts.path.rstrip("/")
    return f"{parts.scheme}://{(parts.hostname or '').lower()}:{port}{path}"


def register(uri: str, token: str) -> None:
    """Send ``token`` with every request to ``uri`` and below it (http/https targets)."""
    if not uri.startswith(("http://", "https://")):
        raise ValueError(f"not an http(s) target: {uri}")
    with _lock:
        _tokens[_prefix(uri)] = token
    os.environ["MLFLOW_TRACKING_AUTH"] = AUTH_NAME


def token_for(url: str) -> str | None:
    """The token of the longest registered target that ``url`` lies under."""
    key = _prefix(url)
    with _lock:
        best = None
        for prefix, token in _tokens.items():
            if (key == prefix or key.startswith(prefix + "/")) and (best is None or len(prefix) > len(best[0])):
                best = (prefix, token)
    return best[1] if best else None


def clear() -> None:
    with _lock:
        _tokens.clear()
    if os.environ.get("MLFLOW_TRACKING_AUTH") == AUTH_NAME:
        del os.environ["MLFLOW_TRACKING_AUTH"]


@contextmanager
def hidden_from_children() -> Iterator[None]:
    """While the Spark JVM is launched: the variables that hold credentials are taken out of this
    process's environment, so the JVM, its executors and the Python workers they fork (where model
    code runs) do not inherit them; they are put back for this process's own clients after."""
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k in SECRET_ENV_VARS}
    try:
        yield
    finally:
        os.environ.update(saved)


class _TargetAuth(AuthBase):
    def __call__(self, request: PreparedRequest) -> PreparedRequest:
        token = token_for(request.url or "")
        if token is not None:
            request.headers["Authorization"] = f"Bearer {token}"
        return request


class TargetAuthProvider:
    """MLflow request-auth provider (see ``mlflow.tracking.request_auth``)."""

    def get_name(self) -> str:
        return AUTH_NAME

    def get_auth(self) -> AuthBase:
        return _TargetAuth()
