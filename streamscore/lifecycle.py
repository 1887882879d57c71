"""One lifecycle for every job that opens an MLflow run (stream, backfill, demo).

``with JobContext("stream", settings) as ctx:`` sets up, in order, MLflow (tracking and registry
URIs), Spark, the MLflow client and the run tracker, and installs SIGTERM / SIGINT handlers that
ask the job to stop after its current batch (a second signal interrupts at once). The job then
calls :meth:`JobContext.start_run`, registers what must be closed (:meth:`JobContext.on_close`) and
what its summary says (:meth:`JobContext.describe`).

A ``preflight`` check (the stream's: broker, topic, tracking server) runs before Spark starts;
``while_spark_starts`` work (the stream's: its start version downloaded and loaded) runs while the
SparkContext starts in a thread of its own.

On the way out, whatever the exit path: resources are closed (last registered first), the status
is decided (FINISHED, KILLED when a stop was requested or the job was interrupted, FAILED on an
exception), the summary is completed and stored with the run (``summary.json``), and the run is
closed with that status. A failure is re-raised as :class:`~streamscore.errors.JobFailed`, which
carries the summary, so the command line prints it too.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any

from streamscore.errors import EXIT_FAILED, JobFailed, JobStatus, StreamscoreError

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from pyspark.sql import SparkSession

    from streamscore.checkpoint import CheckpointClaim
    from streamscore.conf.settings import Settings
    from streamscore.tracking import Tracker

log = logging.getLogger(__name__)


class JobContext:
    """Settings -> MLflow -> Spark -> client -> tracker -> run, closed in one place."""

    spark: SparkSession
    client: MlflowClient
    tracker: Tracker
    tracking_uri: str
    registry_uri: str

    def __init__(
        self,
        job: str,
        settings: Settings,
        *,
        handle_signals: bool = True,
        preflight: Callable[[Settings], None] | None = None,
        checkpoint: str | None = None,
        while_spark_starts: Callable[[JobContext], None] | None = None,
    ):
        """``checkpoint``: the stream's, claimed before anything starts (one job per checkpoint,
        :mod:`streamscore.checkpoint`). ``while_spark_starts(ctx)``: work that needs no Spark,
        done while the SparkContext starts (``ctx.client`` is there; its errors are the caller's
        to handle: an exception fails the job)."""
        self.job = job
        self.checkpoint = checkpoint
        self.claim: CheckpointClaim | None = None
        self.preflight = preflight
        self.while_spark_starts = while_spark_starts
        self.settings = settings
        self.handle_signals = handle_signals
        self.stop_requested = threading.Event()
        self.status: JobStatus | None = None
        self.summary: dict[str, Any] = {"job": job}
        self.started_at = time.time()
        self._describers: list[Callable[[], dict[str, Any]]] = []
        self._stack = contextlib.ExitStack()
        self._previous_handlers: dict[int, Any] = {}
        self.phases: dict[str, float] = {}  # start-up phases, seconds (the summary's ``startup_s``)

    # -- set-up -----------------------------------------------------------------------------------
    def __enter__(self) -> JobContext:
        try:
            self._open()
        except BaseException as e:
            self.__exit__(type(e), e, e.__traceback__)
            raise  # pragma: no cover - __exit__ raises JobFailed for errors
        return self

    def _open(self) -> None:
        from mlflow import MlflowClient

        from streamscore.spark import SparkStart
        from streamscore.tracking import configure_mlflow, make_tracker

        if self.checkpoint is not None:
            from streamscore.checkpoint import CheckpointClaim

            self.claim = self._stack.enter_context(CheckpointClaim(self.checkpoint, self.job))
        self.tracking_uri, self.registry_uri = configure_mlflow(self.settings)
        self.summary.update(tracking_uri=self.tracking_uri, experiment=self.settings.tracking.experiment)
        if self.preflight is not None:
            with self.phase("preflight"):
                self.preflight(self.settings)
        self.client = MlflowClient(self.tracking_uri, self.registry_uri)
        with self.phase("spark"):  # launch to ready, the work done meanwhile included
            starting = SparkStart(self.settings)
            if self.while_spark_starts is not None:
                with self.phase("while_spark_starts"):
                    self.while_spark_starts(self)
            self.spark = starting.session()
        self.tracker = make_tracker(self.settings, self.tracking_uri)
        if self.handle_signals:
            self._install_signal_handlers()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a start-up step; the summary reports them under ``startup_s``."""
        t0 = time.time()
        try:
            yield
        finally:
            self.phases[name] = round(time.time() - t0, 3)

    def start_run(self, params: dict[str, Any], tags: dict[str, str]) -> str:
        """Open the job's MLflow run (in ``tracking.experiment``)."""
        name = self.settings.app.run_name or f"{self.job}-{time.strftime('%Y%m%d-%H%M%S')}"
        with self.phase("run"):
            run_id = self.tracker.start(name, params, {"streamscore.job": self.job, **tags})
        self.summary["run_id"] = run_id
        if self.claim is not None:
            self.claim.note(run_id=run_id)
        return run_id

    def on_close(self, fn: Callable[[], Any]) -> None:
        """Call ``fn`` when the job ends (last registered, first called); its errors are logged."""

        def guarded() -> None:
            try:
                fn()
            except Exception:
                log.exception("%s: clean-up step %s failed", self.job, getattr(fn, "__qualname__", fn))

        self._stack.callback(guarded)

    def describe(self, fn: Callable[[], dict[str, Any]]) -> None:
        """``fn()`` adds to the summary when the job ends, on every exit path."""
        self._describers.append(fn)

    # -- stop requests ------------------------------------------------------------------------------
    def request_stop(self) -> None:
        self.stop_requested.set()

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum: int, _frame: FrameType | None) -> None:
            log.warning(
                "received %s: stopping after the current batch (again to interrupt now)", signal.Signals(signum).name
            )
            self.request_stop()
            self._restore_signal_handlers()

        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous_handlers[sig] = signal.signal(sig, handler)

    def _restore_signal_handlers(self) -> None:
        for sig, previous in self._previous_handlers.items():
            with contextlib.suppress(ValueError):  # not the main thread any more
                signal.signal(sig, previous)
        self._previous_handlers.clear()

    # -- tear-down ----------------------------------------------------------------------------------
    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        self._stack.close()
        self._restore_signal_handlers()
        if exc is None:
            status = JobStatus.KILLED if self.stop_requested.is_set() else JobStatus.FINISHED
        elif isinstance(exc, KeyboardInterrupt):
            status = JobStatus.KILLED
        else:
            status = JobStatus.FAILED
        self.status = status
        self._complete_summary(status, exc)
        tracker = getattr(self, "tracker", None)
        if tracker is not None and tracker.run_id is not None:
            closed = tracker.finish(status.value, self.summary, self.settings.tracking.close_timeout_s)
            self.summary["tracking_closed"] = closed
            self.summary["run_id"] = tracker.run_id  # the latest, when the run was continued in new ones
            if len(tracker.run_ids) > 1:
                self.summary["tracking_runs"] = tracker.run_ids
        log.info("%s %s in %.1fs", self.job, status.value, self.summary["duration_s"])
        if status is JobStatus.FAILED and isinstance(exc, Exception):
            code = exc.exit_code if isinstance(exc, StreamscoreError) else EXIT_FAILED
            raise JobFailed(f"{self.job} failed: {self.summary['error']}", self.summary, code) from exc
        return isinstance(exc, KeyboardInterrupt)  # an interrupted job ends KILLED, with its summary

    def _complete_summary(self, status: JobStatus, exc: BaseException | None) -> None:
        for describe in self._describers:
            try:
                self.summary.update(describe())
            except Exception:
                log.exception("%s: could not complete the summary", self.job)
        if self.phases:
            self.summary["startup_s"] = dict(self.phases)
        self.summary["status"] = status.value
        self.summary["duration_s"] = round(time.time() - self.started_at, 3)
        if exc is not None and not isinstance(exc, KeyboardInterrupt):
            self.summary["error"] = f"{type(exc).__name__}: {exc}"
