"""One MLflow run per job run, and per-batch metrics that never take the stream down.

Metrics go through a bounded buffer: when the tracking server is unreachable the stream goes on,
the outage is logged once, the oldest buffered entries are dropped first (and counted), and the
buffer is flushed when the server answers again.

A job that never ends outgrows one run (Databricks caps the metric steps of a run): the run is
continued in a new one of the same experiment before it holds more metric values than its budget
(``tracking.run_metric_budget``), after ``tracking.rotate_after_h``, or on request (a model swap,
with ``tracking.rotate_on_swap``). The runs are linked by the tags ``streamscore.previous_run_id``
and ``streamscore.next_run_id`` and numbered by ``streamscore.run_part``; the new run gets the
params and every tag set so far (swaps, refusals, class labels), so the latest run is complete.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from streamscore.deadline import run_within
from streamscore.errors import ConfigError

if TYPE_CHECKING:
    from mlflow.entities import Metric

    from streamscore.conf.settings import Settings, TrackingSettings

log = logging.getLogger(__name__)


class Tracker(Protocol):
    """What the jobs need from a run tracker (:class:`RunTracker`, :class:`MirroredTracker`)."""

    @property
    def tracking_uri(self) -> str: ...

    @property
    def run_id(self) -> str | None: ...

    @property
    def dropped(self) -> int: ...

    @property
    def buffered(self) -> int: ...

    @property
    def mirror_run_id(self) -> str | None: ...

    def start(self, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> str: ...

    def log_metrics(self, metrics: Mapping[str, float | None], step: int) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def request_rotation(self) -> None: ...

    @property
    def run_ids(self) -> list[str]: ...

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None: ...

    def flush(self) -> bool: ...

    def finish(self, status: str, summary: dict[str, Any] | None = None, timeout_s: float = 30.0) -> bool: ...


def configure_mlflow(settings: Settings) -> tuple[str, str]:
    """Point mlflow at the configured tracking and registry URIs; returns both."""
    import mlflow

    t = settings.tracking
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(t.request_timeout_s)))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(t.request_max_retries))
    uris = [t.effective_uri(), t.effective_registry_uri(), t.mirror_uri or ""]
    if t.databricks_host and any(u.startswith("databricks") for u in uris):
        os.environ["DATABRICKS_HOST"] = t.databricks_host
    _register_credentials(t)
    from streamscore.logs import quiet_mlflow

    quiet_mlflow()
    tracking_uri = t.effective_uri()
    registry_uri = t.effective_registry_uri()
    if tracking_uri.startswith("azureml://"):
        _check_azureml_plugin()
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(registry_uri)
    return tracking_uri, registry_uri


def _register_credentials(t: TrackingSettings) -> None:
    """Each target's token for that target only (see :mod:`streamscore.credentials`): the
    primary's for the tracking and registry URIs, ``mirror_token`` for the mirror. Never logged."""
    from streamscore import credentials

    credentials.clear()
    databricks_token: str | None = None
    primary = [t.effective_uri(), t.effective_registry_uri()]
    for uris, secret in ((primary, t.token), ([t.mirror_uri or ""], t.mirror_token)):
        if secret is None:
            continue
        for uri in dict.fromkeys(uris):
            if uri.startswith(("http://", "https://")):
                credentials.register(uri, secret.get_secret_value())
            elif uri.startswith("databricks"):  # the SDK reads it; kept from Spark (build_spark)
                if databricks_token not in (None, secret.get_secret_value()):
                    raise ConfigError(
                        "tracking.mirror_token: two Databricks targets with different tokens need "
                        "databricks://<profile> URIs (one profile each in ~/.databrickscfg)"
                    )
                databricks_token = os.environ["DATABRICKS_TOKEN"] = secret.get_secret_value()


def _check_azureml_plugin() -> None:
    from importlib.metadata import entry_points

    names = {ep.name for ep in entry_points(group="mlflow.tracking_store")}
    if "azureml" not in names:
        raise ConfigError(
            "tracking.uri is an azureml:// URI but the azureml-mlflow plugin is not installed "
            "(pip install 'streamscore[azure]')"
        )


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = "" if v is None else str(v)[:500]
    return out


class RunTracker:
    def __init__(self, tracking_uri: str, config: TrackingSettings):
        """``config``: the ``tracking`` section (experiment, buffer, run budget and age)."""
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        self.experiment = config.experiment
        buffer_max_entries = config.buffer_max_entries
        self.client = MlflowClient(tracking_uri)
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._buffer: deque[tuple[int, Metric]] = deque()  # (sequence number, metric)
        self._tags: dict[str, str] = {}  # set, not yet sent
        self._seq = 0
        self._max = buffer_max_entries
        self.dropped = 0
        self._outage_since: float | None = None
        self._lock = threading.Lock()  # the buffer
        self._flush_lock = threading.Lock()  # one sender at a time
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._sender: threading.Thread | None = None
        # rotation: metric values sent to the current run, its start, what a new run repeats
        self.metric_budget = config.run_metric_budget
        self.max_age_s = None if config.rotate_after_h is None else config.rotate_after_h * 3600
        self.part = 1
        self.run_ids: list[str] = []
        self._values = 0
        self._run_started = time.time()
        self._rotate_requested = False
        self._run_name = ""
        self._params: dict[str, str] = {}
        self._carried: dict[str, str] = {}

    # -- run lifecycle ---------------------------------------------------------------------------
    def start(self, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
        exp = self.client.get_experiment_by_name(self.experiment)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(self.experiment)
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        self.run_ids = [self.run_id]
        self._run_name, self._params, self._carried = run_name, _flatten(params), dict(tags)
        self._run_started = time.time()
        self._log_params(self.run_id)
        return self.run_id

    def _log_params(self, run_id: str) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in self._params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def request_rotation(self) -> None:
        """Continue in a new run before the next metrics are sent (a model swap, say)."""
        self._rotate_requested = True
        self._wake.set()

    def _rotation_due(self) -> bool:
        aged = self.max_age_s is not None and time.time() - self._run_started >= self.max_age_s
        return self._values > 0 and (self._rotate_requested or aged or self._values >= self.metric_budget)

    def _rotate(self) -> bool:
        """Close the current run and continue in a new, linked one; False when the server did not
        take it (tried again at the next send; the metrics stay buffered)."""
        old = self.run_id
        assert old is not None and self.experiment_id is not None
        try:
            tags = {**self._carried, "streamscore.previous_run_id": old, "streamscore.run_part": str(self.part + 1)}
            run = self.client.create_run(
                self.experiment_id, run_name=f"{self._run_name} (part {self.part + 1})", tags=tags
            )
        except Exception as e:  # noqa: BLE001 - tracking must never stop scoring
            self._outage(e)
            return False
        self.run_id = run.info.run_id
        self.run_ids.append(self.run_id)
        self.part += 1
        self._values = 0
        self._run_started = time.time()
        self._rotate_requested = False
        try:
            self._log_params(self.run_id)
            self.client.set_tag(old, "streamscore.next_run_id", self.run_id)
            self.client.set_terminated(old, status="FINISHED")
        except Exception as e:  # noqa: BLE001 - the new run is open; the old one keeps what it has
            log.warning("MLflow run %s: could not link or close it after rotation: %s", old, e)
        log.info("MLflow run %s continues in run %s (part %d)", old, self.run_id, self.part)
        return True

    @property
    def mirror_run_id(self) -> str | None:
        return None

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        if self.run_id is not None:
            self.client.log_artifact(self.run_id, local_path, artifact_path)

    def finish(self, status: str, summary: dict[str, Any] | None = None, timeout_s: float = 30.0) -> bool:
        """Send what is buffered, store ``summary.json`` and set the run's status, all within
        ``timeout_s``. False when the server did not take it all in time: the run then keeps what
        it received (and stays RUNNING if the status could not be set); the job does not wait longer."""
        if self.run_id is None:
            return True
        run_id = self.run_id
        self._stopping.set()
        self._wake.set()

        def close() -> bool:
            nonlocal run_id
            if self._sender is not None:
                self._sender.join()
            if not self.flush():
                return False
            run_id = self.run_id or run_id  # the flush may have continued the run in a new one
            if summary is not None:
                try:
                    self.client.log_text(run_id, json.dumps(summary, indent=2, default=str), "summary.json")
                except Exception as e:  # noqa: BLE001
                    log.warning("could not store summary.json in run %s: %s", run_id, e)
            try:
                self.client.set_terminated(run_id, status=status)
            except Exception as e:  # noqa: BLE001
                log.warning("could not close MLflow run %s (%s): %s", run_id, status, e)
                return False
            return True

        outcome = run_within(close, timeout_s, "streamscore-run-close")
        closed = outcome.finished and outcome.value is True
        if not outcome.finished:
            log.warning(
                "tracking server %s did not take the end of run %s within tracking.close_timeout_s (%gs): "
                "the run keeps what it received and may stay RUNNING (%d metrics not sent)",
                self.tracking_uri,
                run_id,
                timeout_s,
                self.buffered,
            )
        return closed

    # -- metrics -----------------------------------------------------------------------------------
    def log_metrics(self, metrics: Mapping[str, float | None], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        with self._lock:
            for k, v in metrics.items():
                if v is None:
                    continue
                if len(self._buffer) >= self._max:
                    self._buffer.popleft()
                    self.dropped += 1
                self._seq += 1
                self._buffer.append((self._seq, Metric(k, float(v), ts, step)))
        self._start_sender()
        self._wake.set()

    def _start_sender(self) -> None:
        """Metrics are sent by a thread of their own: a slow or hanging tracking server never holds
        up a batch (the buffer bounds what waits)."""
        with self._lock:
            if self._sender is not None or self.run_id is None:
                return
            self._sender = threading.Thread(target=self._send_loop, name="streamscore-metrics", daemon=True)
            self._sender.start()

    def _send_loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(timeout=2.0)
            self._wake.clear()
            self.flush()

    def set_tags(self, tags: dict[str, str]) -> None:
        """Queued like metrics and sent by the same thread (a later value of a key replaces an unsent one)."""
        with self._lock:
            self._tags.update(tags)
            self._carried.update(tags)
        self._start_sender()
        self._wake.set()

    def flush(self) -> bool:
        """Send what is buffered; False (and the metrics kept) when the server does not take them."""
        if self.run_id is None:
            return True
        with self._flush_lock:
            if not self._send_tags():
                return False
            while True:
                with self._lock:
                    chunk = list(itertools.islice(self._buffer, 1000))
                if not chunk:
                    break
                if self._rotation_due() and not self._rotate():
                    return False
                chunk = chunk[: max(1, self.metric_budget - self._values)]
                try:
                    self.client.log_batch(self.run_id, metrics=[m for _, m in chunk])
                except Exception as e:  # noqa: BLE001 - tracking must never stop scoring
                    self._outage(e)
                    return False
                self._values += len(chunk)
                with self._lock:  # entries dropped meanwhile were the oldest: pop up to the last sent
                    while self._buffer and self._buffer[0][0] <= chunk[-1][0]:
                        self._buffer.popleft()
        if self._outage_since is not None:
            log.warning(
                "tracking server back after %.0fs; buffered metrics flushed (%d dropped)",
                time.time() - self._outage_since,
                self.dropped,
            )
            self._outage_since = None
        return True

    def _send_tags(self) -> bool:
        from mlflow.entities import RunTag

        with self._lock:
            tags = dict(self._tags)
        if not tags:
            return True
        assert self.run_id is not None
        try:
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        except Exception as e:  # noqa: BLE001 - tracking must never stop scoring
            self._outage(e)
            return False
        with self._lock:
            for k, v in tags.items():
                if self._tags.get(k) == v:
                    del self._tags[k]
        return True

    def _outage(self, e: Exception) -> None:
        if self._outage_since is None:
            self._outage_since = time.time()
            log.warning("tracking server unreachable (%s); buffering metrics (at most %d)", type(e).__name__, self._max)

    @property
    def buffered(self) -> int:
        return len(self._buffer)


class MirroredTracker:
    """The primary run plus a mirror run on a second tracking target with the same params, tags and
    metrics. The mirror is best effort: its failures are buffered like the primary's and never stop
    the job; a mirror that cannot even open its run is logged and left out."""

    def __init__(self, primary: RunTracker, mirror: RunTracker):
        self.primary = primary
        self.mirror: RunTracker | None = mirror

    @property
    def tracking_uri(self) -> str:
        return self.primary.tracking_uri

    @property
    def run_id(self) -> str | None:
        return self.primary.run_id

    @property
    def dropped(self) -> int:
        return self.primary.dropped

    @property
    def buffered(self) -> int:
        return self.primary.buffered

    def start(self, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
        run_id = self.primary.start(run_name, params, tags)
        if self.mirror is None:
            return run_id
        try:
            self.mirror.start(
                run_name,
                params,
                {
                    **tags,
                    "streamscore.primary_run_id": run_id,
                    "streamscore.primary_tracking_uri": self.primary.tracking_uri,
                },
            )
        except Exception as e:  # noqa: BLE001
            log.warning(
                "mirror tracking target %s unavailable, not mirroring this run: %s", self.mirror.tracking_uri, e
            )
            self.mirror = None
        return run_id

    @property
    def mirror_run_id(self) -> str | None:
        return self.mirror.run_id if self.mirror else None

    def _both(self) -> list[RunTracker]:
        return [t for t in (self.primary, self.mirror) if t is not None]

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        for t in self._both():
            try:
                t.log_artifact(local_path, artifact_path)
            except Exception as e:  # noqa: BLE001
                log.warning("could not store %s in run %s: %s", local_path, t.run_id, e)

    def log_metrics(self, metrics: Mapping[str, float | None], step: int) -> None:
        for t in self._both():
            t.log_metrics(metrics, step)

    def set_tags(self, tags: dict[str, str]) -> None:
        for t in self._both():
            t.set_tags(tags)

    def request_rotation(self) -> None:
        for t in self._both():
            t.request_rotation()

    @property
    def run_ids(self) -> list[str]:
        return self.primary.run_ids

    def flush(self) -> bool:
        return all([t.flush() for t in self._both()])

    def finish(self, status: str, summary: dict[str, Any] | None = None, timeout_s: float = 30.0) -> bool:
        deadline = time.time() + timeout_s
        closed = self.primary.finish(status, summary, timeout_s)
        if self.mirror is not None:  # best effort, within what is left of the time
            self.mirror.finish(status, summary, max(1.0, deadline - time.time()))
        return closed


def make_tracker(settings: Settings, tracking_uri: str) -> Tracker:
    t = settings.tracking

    def tracker(uri: str) -> RunTracker:
        return RunTracker(uri, t)

    primary = tracker(tracking_uri)
    if not t.mirror_uri:
        return primary
    if t.mirror_uri.startswith("azureml://"):
        _check_azureml_plugin()
    return MirroredTracker(primary, tracker(t.mirror_uri))
