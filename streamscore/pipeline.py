"""The step the stream's micro-batch and the backfill's chunk share: score a frame of raw events
once, write its outcomes, and say what happened.

Score (one UDF pass, persisted so the model runs once per row even when two tables are written),
write the scored rows — that write is the job that scores, and it counts the batch's rows and
valid rows on the way (a Spark :class:`~pyspark.sql.Observation`, no separate count job) — then
the dead letters, only when there are any, then let the caller look at the persisted result
(``inspect``: the stream refreshes its sample for the gate, the backfill compares versions), and
release it. A clean batch is one Spark job. A replayed batch (its write may be skipped as already
done) is counted first instead. Every input row is counted once: rows in = rows scored
+ rows dead-lettered.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, Observation
from pyspark.sql import functions as F

from streamscore.deadline import run_within
from streamscore.faults import failpoint
from streamscore.rollout import RolloutStats, batch_stats
from streamscore.scoring.io import KafkaTopics, Sink
from streamscore.scoring.plan import ScoringPlan
from streamscore.scoring.spec import InputSpec
from streamscore.scoring.transform import (
    dead_letter_rows,
    kafka_dead_letters,
    kafka_messages,
    score,
    scored_rows,
    shadow_rows,
)
from streamscore.scoring.udf import ModelHandle

log = logging.getLogger(__name__)
_observations = itertools.count()
OBSERVATION_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Outcome:
    rows_scored: int
    rows_dead_lettered: int
    score_s: float  # scoring and writing the scored rows (one Spark job)
    write_s: float  # the dead-letter write and ``inspect``
    rollout: RolloutStats | None = None  # a batch scored with a canary or a shadow

    @property
    def rows_in(self) -> int:
        return self.rows_scored + self.rows_dead_lettered

    def counts(self) -> dict[str, int]:
        """The three row counts, named as in metrics and summaries."""
        return {"rows_in": self.rows_in, "rows_scored": self.rows_scored, "rows_dead_lettered": self.rows_dead_lettered}


@dataclass(frozen=True)
class Sinks:
    scored: Sink
    dead_letter: Sink
    kafka: KafkaTopics | None = None  # scored events (and dead letters) as messages too
    shadow: Sink | None = None  # a shadow version's outputs beside the served ones


def score_and_write(
    events: DataFrame,
    handle: ModelHandle,
    spec: InputSpec,
    batch_id: int,
    sinks: Sinks,
    inspect: Callable[[DataFrame, int], None] | None = None,
    keep_valid_raw: bool = False,
    count_first: bool = False,
    plan: ScoringPlan | None = None,
) -> Outcome:
    """Score ``events`` with ``handle`` as batch ``batch_id`` and write both outcomes; ``inspect``
    sees valid rows' payloads (``raw_value``) only with ``keep_valid_raw``.

    ``count_first``: count in a job of its own before writing. A batch that may already be written
    (a replay after a crash) needs it: Delta skips its write, so the write observes nothing.

    ``plan``: a canary or a shadow besides ``handle`` (:mod:`~streamscore.scoring.plan`). The
    shadow's rows go to ``sinks.shadow`` after the other writes; a shadow write that fails is
    logged and costs only the shadow's rows. The outcome then carries the batch's canary and
    shadow figures."""
    t0 = time.time()
    results = score(events, handle, spec, batch_id, keep_valid_raw, plan).persist(StorageLevel.MEMORY_AND_DISK)
    rollout = None
    try:
        if count_first:
            scored, dead = _count(results)
            sinks.scored.write(scored_rows(results, spec), batch_id, scored)
        else:
            seen = Observation(f"streamscore_outcomes_{next(_observations)}")
            counted = results.observe(seen, *_outcome_counts())
            sinks.scored.write(scored_rows(counted, spec), batch_id, None)
            scored, dead = _observed(seen, results, batch_id)
        t_write = time.time()
        failpoint("between-writes")
        sinks.dead_letter.write(dead_letter_rows(results), batch_id, dead)
        if sinks.kafka is not None:
            _write_messages(sinks.kafka, results, spec, scored, dead)
        if plan is not None and not plan.plain:
            written = plan.shadow is None or _write_shadow(sinks.shadow, results, spec, plan, batch_id, scored)
            rollout = batch_stats(results, spec, plan, written)
        failpoint("after-writes")
        if inspect is not None:
            inspect(results, scored)
        t_done = time.time()
    finally:
        results.unpersist()
    return Outcome(scored, dead, t_write - t0, t_done - t_write, rollout)


def _write_shadow(
    sink: Sink | None, results: DataFrame, spec: InputSpec, plan: ScoringPlan, batch_id: int, scored: int
) -> bool:
    """The shadow table's rows of the batch; False (logged) when they could not be written."""
    if sink is None:
        return False
    try:
        sink.write(shadow_rows(results, spec, plan), batch_id, scored)
        return True
    except Exception as e:  # noqa: BLE001 - a shadow never fails the batch
        log.warning("batch %d: the shadow table's rows were not written: %s: %s", batch_id, type(e).__name__, e)
        return False


def _write_messages(topics: KafkaTopics, results: DataFrame, spec: InputSpec, scored: int, dead: int) -> None:
    """The batch's messages, after both tables: written whether or not Delta skipped the tables'
    writes as already done (a replay), so a crash anywhere before the checkpoint records the batch
    leaves its messages written at least once, with the same identities (at least once: a replay
    whose messages were already written writes them again)."""
    failpoint("before-kafka-write")
    if scored:
        topics.write(kafka_messages(scored_rows(results, spec), spec, topics.backfill_id), topics.topic)
    if dead and topics.dead_letter_topic is not None:
        topics.write(kafka_dead_letters(dead_letter_rows(results), topics.backfill_id), topics.dead_letter_topic)


def _outcome_counts() -> tuple[Column, Column]:
    """The two counts a result is summed up by: all rows, and valid (scored) ones."""
    return F.count(F.lit(1)).alias("rows"), F.count(F.when(F.col("ok"), 1)).alias("scored")


def _scored_and_dead(counts: Any) -> tuple[int, int]:
    return int(counts["scored"]), int(counts["rows"]) - int(counts["scored"])


def _count(results: DataFrame) -> tuple[int, int]:
    row = results.agg(*_outcome_counts()).first()
    assert row is not None
    return _scored_and_dead(row)


def _observed(seen: Observation, results: DataFrame, batch_id: int) -> tuple[int, int]:
    """(scored, dead-lettered) as the write observed them. Spark delivers them just after the write
    (through its listener bus); should they not come (a write that did not run), the persisted
    result is counted instead, so a batch never waits for them for ever."""
    outcome = run_within(lambda: seen.get, OBSERVATION_TIMEOUT_S, "streamscore-observation")
    if outcome.finished and outcome.error is None:
        return _scored_and_dead(outcome.result())
    log.warning("batch %s: the write's row counts did not arrive; counting the batch instead", batch_id)
    return _count(results)
