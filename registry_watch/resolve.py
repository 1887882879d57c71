"""Model references and their resolution to a concrete, downloaded version.

A reference is one of: ``@alias`` (``@champion``), ``stage:<Stage>`` (legacy stages such as
``stage:Production``), ``latest`` (highest version number), or a pinned version number (``3``).
MLflow's model URIs ``models:/<name>@<alias>`` and ``models:/<name>/<version>`` say the same with
the name (:meth:`ModelRef.parse_uri`). A Unity Catalog registry (``databricks-uc``) has no stages
and reserves ``latest``: :func:`check_uc_ref` refuses those at start.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from streamscore.errors import ConfigError, RegistryError
from streamscore.scoring.sparkml import flavor_of
from streamscore.scoring.udf import ModelHandle

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelRef:
    kind: str  # alias | stage | latest | version
    value: str

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        t = str(text).strip()
        if t.startswith("@") and len(t) > 1:
            return cls("alias", t[1:])
        if t.lower().startswith("stage:") and len(t) > 6:
            return cls("stage", t[6:])
        if t.lower() == "latest":
            return cls("latest", "")
        if t.isdigit():
            return cls("version", t)
        raise ConfigError(
            f"model.ref: {text!r} is not a model reference (use @alias, stage:<Stage>, latest or a version number)"
        )

    @classmethod
    def parse_uri(cls, uri: str) -> tuple[str, ModelRef]:
        """``models:/<name>@<alias>`` or ``models:/<name>/<version>`` -> (name, reference)."""
        body = uri.strip()[len("models:/") :].strip("/")
        if "@" in body:
            name, _, alias = body.rpartition("@")
            if name and alias and "/" not in name:
                return name, cls("alias", alias)
        else:
            name, _, rest = body.partition("/")
            if name and rest.isdigit():
                return name, cls("version", rest)
            if name and rest:
                return name, cls.parse(f"stage:{rest}" if rest.lower() != "latest" else "latest")
        raise ConfigError(f"model.ref: {uri!r} is not a model URI (models:/<name>@<alias> or models:/<name>/<version>)")

    def __str__(self) -> str:
        return {"alias": f"@{self.value}", "stage": f"stage:{self.value}", "latest": "latest"}.get(
            self.kind, self.value
        )


def is_unity_catalog(registry_uri: str | None) -> bool:
    return str(registry_uri or "").split("://")[0] == "databricks-uc"


def check_uc_ref(ref: ModelRef, name: str) -> None:
    """Unity Catalog has no stages and no ``latest``; it reserves the alias ``latest`` too. Raises
    :class:`ConfigError` with the fix, so such a job stops at start instead of on a 4xx later."""
    why = {
        "stage": f"Unity Catalog models have no stages ({ref} is a legacy workspace-registry reference)",
        "latest": "Unity Catalog has no 'latest' reference (its registry reserves the name)",
    }.get(ref.kind)
    if ref.kind == "alias" and ref.value.lower() == "latest":
        why = "Unity Catalog reserves the alias 'latest'"
    if why:
        raise ConfigError(
            f"model.ref: {why}; use an alias (@champion) or a version number for {name!r} "
            "(or set tracking.registry_uri to a workspace registry)"
        )


def resolve_version(client: MlflowClient, name: str, ref: ModelRef) -> ModelVersion:
    """The ``ModelVersion`` that ``ref`` points at now."""
    from mlflow.exceptions import MlflowException

    try:
        if ref.kind == "alias":
            return client.get_model_version_by_alias(name, ref.value)
        if ref.kind == "version":
            return client.get_model_version(name, ref.value)
        if ref.kind == "stage":
            found = client.get_latest_versions(name, stages=[ref.value])
            if not found:
                raise RegistryError(f"model {name!r} has no version in stage {ref.value!r}")
            return found[0]
        versions = client.search_model_versions(f"name = '{name}'")
        if not versions:
            raise RegistryError(f"model {name!r} has no versions")
        return max(versions, key=lambda v: int(v.version))
    except MlflowException as e:
        raise RegistryError(f"cannot resolve model {name!r} reference {ref}: {e.message}") from None


def materialize(
    client: MlflowClient, mv: ModelVersion, models_dir: Path, spark: SparkSession | None = None
) -> ModelHandle:
    """Download version ``mv`` once under ``models_dir`` and ship it to executors (``addFile``)."""
    import mlflow.artifacts

    ship_name = local_name(mv.name, str(mv.version))
    dest = models_dir / ship_name
    if not (dest / "MLmodel").exists():
        # each attempt downloads into a folder of its own: an abandoned (timed out) attempt that
        # finishes later never mixes its files with a newer one's
        tmp = models_dir / f"{ship_name}.partial-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            uri = f"models:/{mv.name}/{mv.version}"
            log.info("downloading %s", uri)
            tracking_uri, registry_uri = _download_uris(client)
            local = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=uri, dst_path=str(tmp), tracking_uri=tracking_uri, registry_uri=registry_uri
                )
            )
            if not (local / "MLmodel").exists():
                candidates = list(local.rglob("MLmodel"))
                if not candidates:
                    raise RegistryError(f"model {mv.name!r} version {mv.version}: no MLmodel file in its artifacts")
                local = candidates[0].parent
            if not (dest / "MLmodel").exists():
                shutil.rmtree(dest, ignore_errors=True)  # a copy without its MLmodel is incomplete
                try:
                    os.rename(local, dest)
                except OSError:  # another attempt finished first: keep its copy
                    if not (dest / "MLmodel").exists():
                        raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    handle = ModelHandle(mv.name, str(mv.version), mv.run_id or "", str(dest), ship_name, flavor_of(dest))
    if spark is not None and not str(spark.sparkContext.master).startswith("local["):
        _ship(spark, dest)
    return handle


# (Spark application id, folder): archives already added. addArchive is per SparkContext, and a
# process has one SparkContext at a time: a new one (a new application id) is shipped to again.
_shipped: set[tuple[str, str]] = set()


def local_name(name: str, version: str) -> str:
    """The folder a version is downloaded to (under the models folder) and shipped as."""
    return f"streamscore-model-{_safe(name)}-v{version}"


def local_handle(
    models_dir: Path, name: str, version: str, run_id: str, spark: SparkSession | None = None
) -> ModelHandle | None:
    """A handle on a version already downloaded under ``models_dir`` (no registry call), or None."""
    dest = models_dir / local_name(name, version)
    if not (dest / "MLmodel").exists():
        return None
    if spark is not None and not str(spark.sparkContext.master).startswith("local["):
        _ship(spark, dest)
    return ModelHandle(name, version, run_id, str(dest), dest.name, flavor_of(dest))


def _ship(spark: SparkSession, folder: Path) -> None:
    """Send the model folder to every executor as an archive (Spark unpacks it there under
    ``SparkFiles.get("<folder name>.zip")``); ``addFile`` refuses local directories on a cluster."""
    key = (str(spark.sparkContext.applicationId), str(folder))
    if key in _shipped:
        return
    archive = shutil.make_archive(str(folder), "zip", root_dir=folder)
    spark.sparkContext.addArchive(archive)
    _shipped.add(key)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _download_uris(client: Any) -> tuple[str, str]:
    """(tracking, registry) URIs a registered version is downloaded with. A version stored on an
    MLflow server (``mlflow-artifacts:``) is served by that registry server, so an http(s) registry
    also resolves the artifacts, whatever the tracking target is (an ``azureml://`` or
    ``databricks`` tracking URI cannot resolve them)."""
    tracking, registry = str(client._tracking_client.tracking_uri), str(client._registry_uri)
    if registry.startswith(("http://", "https://")):
        return registry, registry
    return tracking, registry


class MlflowRegistry:
    """The registry as the watcher sees it (:class:`~streamscore.registry_watch.watcher.Registry`):
    one registered model on an MLflow client."""

    def __init__(self, client: MlflowClient, model_name: str):
        self.client = client
        self.model_name = model_name

    def resolve(self, ref: ModelRef) -> ModelVersion:
        return resolve_version(self.client, self.model_name, ref)

    def alias_set_at(self, alias: str) -> float | None:
        """When ``alias`` was moved, if the promoter recorded it (``streamscore promote`` does)."""
        try:
            rm = self.client.get_registered_model(self.model_name)
            raw = (rm.tags or {}).get(f"streamscore.alias_set_at.{alias}")
            return float(raw) if raw else None
        except Exception:  # noqa: BLE001 - purely informational
            return None
