"""The micro-batch pipeline shared by the stream and the backfill jobs.

``foreachBatch(batch_df, batch_id)``: pick the batch's model version (the watcher may swap here),
score every row once (persisted, so the UDF runs once), append scored rows and dead-letter rows to
Delta idempotently (``txnAppId``/``txnVersion``), log the batch's metrics, then let the watcher
poll the registry.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import Counter, deque
from typing import Optional

from pyspark import StorageLevel

from scoring import io as sio
from scoring.transform import (DEAD_LETTER_DDL, count_outcomes, dead_letter_rows, output_schema_ddl, score,
                               scored_rows)

log = logging.getLogger(__name__)


class BatchProcessor:
    def __init__(self, spark, settings, watcher, tracker, recent_rows: int = 50):
        self.spark = spark
        self.settings = settings
        self.watcher = watcher
        self.tracker = tracker
        self.app_id = settings.app_id
        self.output_path = settings.output_path
        self.dead_letter_path = settings.dead_letter_path
        self.totals = Counter()
        self.rows_by_version: Counter = Counter()
        self.batches = 0
        self.last_input_at = time.time()
        self._recent: deque = deque(maxlen=recent_rows)
        self.batch_log: list[dict] = []

    def ensure_tables(self) -> None:
        spec = self.watcher.spec
        sio.ensure_delta_table(self.spark, self.output_path, output_schema_ddl(spec))
        sio.ensure_delta_table(self.spark, self.dead_letter_path, DEAD_LETTER_DDL)

    def recent_sample(self) -> list[str]:
        """Recent valid raw events, used by the validation gate."""
        return list(self._recent)

    def __call__(self, batch_df, batch_id: int) -> None:
        t0 = time.time()
        handle = self.watcher.model_for_batch(batch_id)
        results = score(batch_df, handle, self.watcher.spec, batch_id).persist(StorageLevel.MEMORY_AND_DISK)
        try:
            t_score = time.time()
            scored, dead = count_outcomes(results)
            rows_in = scored + dead
            t_write = time.time()
            if scored:
                sio.append_idempotent(scored_rows(results, self.watcher.spec), self.output_path, self.app_id, batch_id)
                self._recent.extend(r.raw_value for r in results.where("ok").select("raw_value").limit(20).collect())
            if dead:
                sio.append_idempotent(dead_letter_rows(results), self.dead_letter_path, self.app_id + "-dead-letter",
                                      batch_id)
            t_done = time.time()
        finally:
            results.unpersist()
        seconds = time.time() - t0
        phases = {"pick_model_s": t_score - t0, "score_s": t_write - t_score, "write_s": t_done - t_write}
        self.batches += 1
        self.totals.update(rows_in=rows_in, rows_scored=scored, rows_dead_lettered=dead)
        self.rows_by_version[handle.version] += scored
        if rows_in:
            self.last_input_at = time.time()
        entry = {"batch_id": batch_id, "model_version": handle.version, "rows_in": rows_in,
                 "rows_scored": scored, "rows_dead_lettered": dead, "seconds": round(seconds, 3),
                 **{k: round(v, 3) for k, v in phases.items()}}
        self.batch_log.append(entry)
        log.info("batch %d: %d in, %d scored, %d dead-lettered by version %s in %.2fs (%s)",
                 batch_id, rows_in, scored, dead, handle.version, seconds,
                 ", ".join(f"{k} {v:.2f}" for k, v in phases.items()))
        self.tracker.log_metrics(
            {
                "rows_in": rows_in,
                "rows_scored": scored,
                "rows_dead_lettered": dead,
                "batch_duration_s": seconds,
                "rows_per_s": rows_in / seconds if seconds > 0 else 0.0,
                **phases,
                "model_version": float(handle.version) if handle.version.isdigit() else None,
                "tracking_metrics_dropped": self.tracker.dropped,
            },
            step=batch_id,
        )
        self.watcher.batch_scored(batch_id, scored)
        self.watcher.poll()

    def summary(self) -> dict:
        return {
            "rows_in": self.totals["rows_in"],
            "rows_scored": self.totals["rows_scored"],
            "rows_dead_lettered": self.totals["rows_dead_lettered"],
            "batches": self.batches,
            "rows_by_version": dict(self.rows_by_version),
        }


class StopController:
    """Stops a streaming query between batches: on SIGTERM/SIGINT, after ``max_batches``, after
    ``idle_timeout_s`` without input, or when ``should_stop()`` says so."""

    def __init__(self, processor: BatchProcessor, max_batches: Optional[int] = None,
                 idle_timeout_s: Optional[float] = None, should_stop=None):
        self.processor = processor
        self.max_batches = max_batches
        self.idle_timeout_s = idle_timeout_s
        self.should_stop = should_stop
        self.reason: Optional[str] = None
        self._signal = threading.Event()

    def install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, _frame):
            log.warning("received %s: stopping after the current batch", signal.Signals(signum).name)
            self.reason = "killed"
            self._signal.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def _want_stop(self) -> Optional[str]:
        if self._signal.is_set():
            return "killed"
        if self.max_batches and self.processor.batches >= self.max_batches:
            return "max_batches"
        if self.idle_timeout_s and time.time() - self.processor.last_input_at > self.idle_timeout_s:
            return "idle_timeout"
        if self.should_stop is not None and self.should_stop():
            return "requested"
        return None

    def run(self, query) -> str:
        """Block until the query ends by itself or a stop condition holds; returns why it ended."""
        while query.isActive:
            reason = self._want_stop()
            if reason and not query.status.get("isTriggerActive", False):
                self.reason = reason
                query.stop()
                break
            query.awaitTermination(0.2)
        if query.exception() is not None:
            raise RuntimeError(f"streaming query failed: {query.exception()}")
        return self.reason or "completed"
