"""The step the stream's micro-batch and the backfill's chunk share: score a frame of raw events
once, write its outcomes, and say what happened.

Score (one UDF pass, persisted so it runs once), count scored and dead-lettered rows in one job,
write the scored rows and the dead letters through the given sinks, let the caller look at the
persisted result (``inspect``: the stream keeps a sample for the gate, the backfill compares
versions), release it. Every input row is counted once: rows in = rows scored + rows dead-lettered.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from pyspark import StorageLevel
from pyspark.sql import DataFrame

from streamscore.faults import failpoint
from streamscore.scoring.io import Sink
from streamscore.scoring.spec import InputSpec
from streamscore.scoring.transform import count_outcomes, dead_letter_rows, score, scored_rows
from streamscore.scoring.udf import ModelHandle


@dataclass(frozen=True)
class Outcome:
    rows_scored: int
    rows_dead_lettered: int
    score_s: float  # scoring + counting
    write_s: float  # both writes (and ``inspect``)

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


def score_and_write(
    events: DataFrame,
    handle: ModelHandle,
    spec: InputSpec,
    batch_id: int,
    sinks: Sinks,
    inspect: Callable[[DataFrame, int], None] | None = None,
) -> Outcome:
    """Score ``events`` with ``handle`` as batch ``batch_id`` and write both outcomes."""
    t0 = time.time()
    results = score(events, handle, spec, batch_id).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        scored, dead = count_outcomes(results)
        t_write = time.time()
        sinks.scored.write(scored_rows(results, spec), batch_id, scored)
        failpoint("between-writes")
        sinks.dead_letter.write(dead_letter_rows(results), batch_id, dead)
        failpoint("after-writes")
        if inspect is not None:
            inspect(results, scored)
        t_done = time.time()
    finally:
        results.unpersist()
    return Outcome(scored, dead, t_write - t0, t_done - t_write)
