"""The stream's micro-batch processor and the loop that stops its query between batches.

``foreachBatch(batch_df, batch_id)``: pick the batch's model version (the watcher may swap here),
score and write it (:func:`streamscore.pipeline.score_and_write`: Delta appends with
``txnAppId``/``txnVersion``, so a replayed batch is not written twice), and queue the batch's
metrics. Nothing on this path waits for the registry or the tracking server: the watcher polls and
validates in its own thread, and metrics and tags are sent by the tracker's own thread.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pyspark.errors import StreamingQueryException
from pyspark.sql import DataFrame

from streamscore.errors import StreamFailed
from streamscore.metrics import MetricsWindow
from streamscore.pipeline import Outcome, Sinks, score_and_write
from streamscore.scoring import io as sio
from streamscore.scoring import schema

if TYPE_CHECKING:
    from pyspark.sql import SparkSession
    from pyspark.sql.streaming import StreamingQuery

    from streamscore.conf.settings import Settings
    from streamscore.registry_watch.watcher import RegistryWatcher
    from streamscore.scoring.udf import ModelHandle
    from streamscore.tracking import Tracker

log = logging.getLogger(__name__)


class Halted(RuntimeError):
    """Raised by a batch to end the query before the batch reads anything (see StopController):
    the processor records the batch id, which is how the controller tells this end from a failure."""


class RecentSample:
    """The last valid raw events the stream scored: the validation gate scores a candidate on them.

    Taking rows is a Spark job of its own, so it is done only when due: while fewer than ``size``
    rows are held, and then at most every ``refresh_s`` seconds (a sample that old is still recent
    for a gate; a busy stream does not pay for it batch after batch)."""

    def __init__(self, size: int = 50, per_batch: int = 20, refresh_s: float = 30.0):
        self._rows: deque[str] = deque(maxlen=size)
        self.per_batch = per_batch
        self.refresh_s = refresh_s
        self._taken_at = float("-inf")

    def due(self) -> bool:
        return len(self._rows) < (self._rows.maxlen or 0) or time.monotonic() - self._taken_at >= self.refresh_s

    def take_from(self, results: DataFrame, rows_scored: int) -> None:
        if rows_scored:
            picked = results.where("ok").select("raw_value").limit(self.per_batch).collect()
            self._rows.extend(r.raw_value for r in picked)
            self._taken_at = time.monotonic()

    def rows(self) -> list[str]:
        return list(self._rows)


class BatchProcessor:
    def __init__(
        self,
        spark: SparkSession,
        watcher: RegistryWatcher,
        tracker: Tracker,
        sinks: Sinks,
        recent: RecentSample,
        warmer: sio.SnapshotWarmer | None,
        settings: Settings,
    ):
        self.spark = spark
        # how missing output tables are created (sink.change_data_feed, catalog.create_schemas)
        self.creation = sio.Creation.from_settings(settings)
        self.label_col = settings.monitor.label_col  # a column of the output table, null when scored
        # one MLflow step per window of batches (tracking.metrics_interval_s; 0: per batch)
        self.metrics = MetricsWindow(
            settings.tracking.metrics_interval_s, lambda m, step: self.tracker.log_metrics(m, step=step)
        )
        self.warmer = warmer
        self.watcher = watcher
        self.tracker = tracker
        self.sinks = sinks
        self.recent = recent
        self.totals: Counter[str] = Counter()
        self.rows_by_version: Counter[str] = Counter()
        self.batches = 0
        self.last_input_at = time.time()
        self.batch_log: list[dict[str, Any]] = []
        self.halt = threading.Event()  # set by the StopController: no new batch starts
        self.halted_before: int | None = None
        self.tables_s: float | None = None  # the start's ensure_tables, seconds
        self.query_started_at: float | None = None
        self.first_batch_done_at: float | None = None
        self._classes_recorded: set[str] = set()

    def ensure_tables(self) -> None:
        spec = self.watcher.spec
        assert spec is not None, "the watcher must be started first"
        serving = self.watcher.serving.label
        t0 = time.time()
        tables = [
            (self.sinks.scored.table, schema.with_label(schema.output_schema(spec), self.label_col, spec)),
            (self.sinks.dead_letter.table, schema.DEAD_LETTER),
        ]
        if self.sinks.shadow is not None:
            tables.append((self.sinks.shadow.table, schema.shadow_schema(spec)))
        for table, columns in tables:
            sio.ensure_delta_table(self.spark, table, columns, serving, self.creation)
        self.record_classes(self.watcher.serving)
        self.tables_s = round(time.time() - t0, 3)
        if self.warmer is not None:
            self.warmer.request()

    def record_classes(self, handle: ModelHandle) -> None:
        """Once per version: what its ``probabilities`` positions stand for, as a property of the
        output table and a tag of the run (between batches: a table property is a Delta commit)."""
        if handle.classes is None or handle.version in self._classes_recorded:
            return
        self._classes_recorded.add(handle.version)
        key = sio.record_classes(self.spark, self.sinks.scored.table, handle.version, handle.classes)
        self.tracker.set_tags({key: json.dumps(list(handle.classes))})
        log.info("%s: probabilities are of the classes %s (table property %s)", handle.label, handle.classes, key)

    def __call__(self, batch_df: DataFrame, batch_id: int) -> None:
        if self.halt.is_set():  # before anything is read, recorded or written: Spark reads it again next time
            self.halted_before = batch_id
            raise Halted(f"streamscore: stopping before batch {batch_id} (its events are read again at the next start)")
        t0 = time.time()
        ledger = self.watcher.ledger
        replay = ledger is not None and ledger.get(batch_id) is not None  # begun before: maybe written
        plan = self.watcher.plan_for_batch(batch_id)
        handle = plan.served
        self.record_classes(handle)
        if plan.canary is not None:
            self.record_classes(plan.canary)
        t_picked = time.time()
        assert self.watcher.spec is not None
        sample = self.recent.due()
        outcome = score_and_write(
            batch_df,
            handle,
            self.watcher.spec,
            batch_id,
            self.sinks,
            self.recent.take_from if sample else None,
            keep_valid_raw=sample,
            count_first=replay,
            plan=plan,
        )
        if self.warmer is not None:
            self.warmer.request()  # the next batch's writes find the tables' state ready
        self._account(batch_id, handle.version, outcome, t_picked - t0, time.time() - t0)
        self.watcher.batch_scored(batch_id, outcome.rows_scored)
        self.watcher.batch_judged(batch_id, outcome.rollout)
        if self.first_batch_done_at is None:
            self.first_batch_done_at = time.time()

    def _account(self, batch_id: int, version: str, o: Outcome, pick_s: float, seconds: float) -> None:
        phases = {"pick_model_s": pick_s, "score_s": o.score_s, "write_s": o.write_s}  # see Outcome
        self.batches += 1
        self.totals.update(rows_in=o.rows_in, rows_scored=o.rows_scored, rows_dead_lettered=o.rows_dead_lettered)
        canary = o.rollout.canary if o.rollout is not None else None
        by_canary = canary.served if canary is not None else 0
        if canary is not None:  # the rows the canary served are its own
            self.rows_by_version[canary.version] += by_canary
        self.rows_by_version[version] += o.rows_scored - by_canary
        if o.rows_in:
            self.last_input_at = time.time()
        counts = o.counts()
        self.batch_log.append(
            {
                "batch_id": batch_id,
                "model_version": version,
                **counts,
                "seconds": round(seconds, 3),
                **{k: round(v, 3) for k, v in phases.items()},
            }
        )
        side = f" (of them {by_canary} by canary {canary.version})" if canary is not None else ""
        log.info(
            "batch %d: %d in, %d scored%s, %d dead-lettered by version %s in %.2fs (%s)",
            batch_id,
            o.rows_in,
            o.rows_scored,
            side,
            o.rows_dead_lettered,
            version,
            seconds,
            ", ".join(f"{k} {v:.2f}" for k, v in phases.items()),
        )
        self.metrics.add(
            {
                **counts,
                "batch_duration_s": seconds,
                "rows_per_s": o.rows_in / seconds if seconds > 0 else 0.0,
                **phases,
                "model_version": float(version) if version.isdigit() else None,
                "tracking_metrics_dropped": self.tracker.dropped,
                **(o.rollout.metrics() if o.rollout is not None else {}),
            },
            batch_id,
        )

    def first_batch_s(self) -> float | None:
        """Seconds from the query's start to the end of its first batch (None: no batch yet)."""
        if self.query_started_at is None or self.first_batch_done_at is None:
            return None
        return round(self.first_batch_done_at - self.query_started_at, 3)

    def summary(self) -> dict[str, Any]:
        return {
            "rows_in": self.totals["rows_in"],
            "rows_scored": self.totals["rows_scored"],
            "rows_dead_lettered": self.totals["rows_dead_lettered"],
            "batches": self.batches,
            "rows_by_version": dict(self.rows_by_version),
        }


class StopController:
    """Stops a streaming query between batches: when ``stop_requested`` is set (SIGTERM / SIGINT),
    after ``max_batches``, after ``idle_timeout_s`` without input, or when ``should_stop()`` says so."""

    def __init__(
        self,
        processor: BatchProcessor,
        stop_requested: threading.Event,
        max_batches: int | None = None,
        idle_timeout_s: float | None = None,
        should_stop: Callable[[], bool] | None = None,
    ):
        self.processor = processor
        self.stop_requested = stop_requested
        self.max_batches = max_batches
        self.idle_timeout_s = idle_timeout_s
        self.should_stop = should_stop
        self.reason: str | None = None
        self._first_progress_at: float | None = None

    def _want_stop(self, query: StreamingQuery) -> str | None:
        if self.stop_requested.is_set():
            return "killed"
        if self.max_batches and self.processor.batches >= self.max_batches:
            return "max_batches"
        if self.idle_timeout_s and self._idle_for(query) > self.idle_timeout_s:
            return "idle_timeout"
        if self.should_stop is not None and self.should_stop():
            return "requested"
        return None

    def _idle_for(self, query: StreamingQuery) -> float:
        """Seconds without input, counted from the query's first progress report at the earliest: a
        query still starting (slow on a busy machine) has not been idle yet."""
        if self._first_progress_at is None:
            if query.lastProgress is None:
                return 0.0
            self._first_progress_at = time.time()
        return time.time() - max(self.processor.last_input_at, self._first_progress_at)

    def run(self, query: StreamingQuery, checkpoint: str | None = None) -> str:
        """Block until the query ends by itself or a stop condition holds; returns why it ended.

        The query is stopped while no trigger is active. A stream under load runs batches back to
        back and may never be seen idle: then the processor is told to halt, and the next batch
        ends the query before it reads anything (Spark has not committed it, so a restart reads
        its events again)."""
        while query.isActive:
            reason = self._want_stop(query)
            if reason:
                self.reason = self.reason or reason
                if not query.status.get("isTriggerActive", False):
                    query.stop()
                    break
                self.processor.halt.set()
            try:
                query.awaitTermination(0.2)  # type: ignore[arg-type] # seconds; pyspark takes a float
            except StreamingQueryException:
                break  # the query failed (or halted): told apart below
        error = query.exception()
        if error is not None and not (self.reason and self.processor.halted_before is not None):
            failure = StreamFailed.from_query_error(error, checkpoint)
            log.error("the streaming query failed: %s", failure.detail)
            raise failure
        return self.reason or "completed"
