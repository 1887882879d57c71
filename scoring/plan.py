"""What scores one micro-batch: the served version, and optionally a canary and a shadow.

* **served**: scores every valid row;
* **canary** (``fraction``): a candidate that serves the events whose stable hash
  (:func:`canary_bucket`) is below ``fraction``. The served version scores those rows too, so the
  two can be compared, and a row the candidate fails on is served by the served version instead
  (the candidate's failure is recorded, not dead-lettered: nothing is lost to a candidate);
* **shadow**: a version that scores every valid row beside them; its outputs go to the shadow
  table only and never change what is served. A shadow that fails costs its own rows there.

All of it happens in one pass over a chunk (:func:`score_plan_chunk`): the chunk is parsed and
checked once and each version predicts on the same parsed rows. Besides the usual result columns
(:func:`streamscore.scoring.schema.result_schema`) the chunk carries the columns of
:func:`extra_fields`, which only the batch's accounting and the shadow table read.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from streamscore.scoring.compare import compared_output
from streamscore.scoring.records import Parsed, parse, predict, problems, result_frame
from streamscore.scoring.spec import InputSpec

if TYPE_CHECKING:
    from pyspark.sql.types import StructField

    from streamscore.scoring.udf import ModelHandle

# result columns of a plan's chunk (prefixed: they never meet a feature or output of the model)
CANARY = "_ss_canary"  # bool: the row is the canary's (its hash is below the fraction)
BY_CANARY = "_ss_by_canary"  # bool: the canary's outputs are the row's served outputs
CANARY_ERROR = "_ss_canary_error"  # the canary's problem with the row (then the served version's outputs serve)
CANARY_BASE = "_ss_canary_base"  # the served version's compared output on a canary row
CANARY_SECONDS = "_ss_canary_s"  # the canary's predict time, shared out over the rows it was asked
SHADOW_PREFIX = "_ss_shadow_"  # + an output's name: the shadow's value
SHADOW_REASON = "_ss_shadow_reason"  # why the shadow has no value for a valid row
SHADOW_SECONDS = "_ss_shadow_s"


@dataclass(frozen=True)
class ScoringPlan:
    served: ModelHandle
    canary: ModelHandle | None = None
    fraction: float = 0.0
    shadow: ModelHandle | None = None
    shadow_max_seconds_per_row: float = 0.01

    @property
    def plain(self) -> bool:
        """One version scores everything (the stream's usual pass)."""
        return self.canary is None and self.shadow is None

    @property
    def handles(self) -> list[ModelHandle]:
        return [h for h in (self.served, self.canary, self.shadow) if h is not None]

    def versions(self) -> dict[str, Any]:
        """What the batch ledger records for a batch scored by this plan."""
        out: dict[str, Any] = {}
        if self.canary is not None:
            out["canary"] = {"version": self.canary.version, "run_id": self.canary.run_id, "fraction": self.fraction}
        if self.shadow is not None:
            out["shadow"] = {"version": self.shadow.version, "run_id": self.shadow.run_id}
        return out


def canary_bucket(event_id: str) -> float:
    """Where an event falls in [0, 1): the first 8 bytes of the SHA-256 of its id (UTF-8), read as
    an unsigned big-endian integer, over 2**64. The same id always lands in the same place, in any
    process and after any restart; in Spark SQL it is
    ``conv(substr(sha2(event_id, 256), 1, 16), 16, 10) / pow(2, 64)``."""
    digest = hashlib.sha256(event_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def canary_rows(parsed: Parsed, fraction: float) -> np.ndarray:
    """The valid rows whose event id falls below ``fraction``."""
    if fraction <= 0.0 or not len(parsed.valid_idx):
        return parsed.valid_idx[:0]
    if fraction >= 1.0:
        return parsed.valid_idx
    ids = parsed.ids
    keep = [i for i in parsed.valid_idx if canary_bucket(str(ids[i])) < fraction]
    return np.asarray(keep, dtype=parsed.valid_idx.dtype)


def extra_fields(spec: InputSpec, plan: ScoringPlan) -> list[StructField]:
    """The columns a plan's chunk adds to the result (none for a plain plan)."""
    from pyspark.sql.types import BooleanType, DoubleType, StringType, StructField

    from streamscore.scoring.schema import output_type

    fields: list[StructField] = []
    if plan.canary is not None:
        fields += [
            StructField(CANARY, BooleanType()),
            StructField(BY_CANARY, BooleanType()),
            StructField(CANARY_ERROR, StringType()),
            StructField(CANARY_BASE, output_type(compared_output(spec))),
            StructField(CANARY_SECONDS, DoubleType()),
        ]
    if plan.shadow is not None:
        fields += [StructField(SHADOW_PREFIX + o.name, output_type(o)) for o in spec.output_list]
        fields += [StructField(SHADOW_REASON, StringType()), StructField(SHADOW_SECONDS, DoubleType())]
    return fields


@dataclass
class LoadedPlan:
    """A plan's models as a worker holds them, with each version's own output spec."""

    served: tuple[Any, InputSpec, str]
    canary: tuple[Any, InputSpec, str] | None
    fraction: float
    shadow: tuple[Any, InputSpec, str] | None
    shadow_max_seconds_per_row: float
    shadow_skip: str | None = None  # set once the shadow is too slow: the rest of the task skips it


def score_plan_chunk(values: pd.Series, spec: InputSpec, plan: LoadedPlan) -> pd.DataFrame:
    """Parse once; the served version predicts every valid row, the canary its share, the shadow
    every valid row. The result has the usual columns (the served outputs being, per row, the
    canary's or the served version's) and :func:`extra_fields`."""
    parsed = parse(values, spec)
    model, own, label = plan.served
    base = predict(model, parsed, own, label)
    reasons = problems(parsed, base)
    columns = dict(base.columns)
    extra: dict[str, Any] = {}
    if plan.canary is not None:
        extra = _canary(parsed, spec, plan, base.columns, reasons, columns)
    if plan.shadow is not None:
        extra |= _shadow(parsed, spec, plan)
    out = result_frame(parsed, reasons, spec, columns)
    for k, v in extra.items():
        out[k] = v
    return out


def _canary(
    parsed: Parsed,
    spec: InputSpec,
    plan: LoadedPlan,
    base_columns: dict[str, Any],
    reasons: list[str | None],
    columns: dict[str, Any],
) -> dict[str, Any]:
    """Route the canary's rows (``reasons`` and ``columns`` are updated in place)."""
    assert plan.canary is not None
    n = parsed.n
    rows = canary_rows(parsed, plan.fraction)
    model, own, label = plan.canary
    t0 = time.perf_counter()
    cand = predict(model, parsed, own, label, rows)
    seconds = time.perf_counter() - t0
    use = cand.scored_idx
    picked = np.zeros(n, dtype=bool)
    picked[rows] = True
    by_canary = np.zeros(n, dtype=bool)
    by_canary[use] = True
    for o in spec.output_list:
        col = columns[o.name].copy()
        col[use] = cand.columns[o.name][use]
        columns[o.name] = col
    for i in use:
        reasons[i] = None  # the canary scored it: served, whatever the served version made of it
    share = np.zeros(n, dtype="float64")
    if len(rows):
        share[rows] = seconds / len(rows)
    compared = compared_output(spec).name
    return {
        CANARY: picked,
        BY_CANARY: by_canary,
        CANARY_ERROR: [cand.reasons[i] if picked[i] else None for i in range(n)],
        CANARY_BASE: base_columns[compared],
        CANARY_SECONDS: share,
    }


def _shadow(parsed: Parsed, spec: InputSpec, plan: LoadedPlan) -> dict[str, Any]:
    assert plan.shadow is not None
    model, own, label = plan.shadow
    n, valid = parsed.n, parsed.valid_idx
    share = np.zeros(n, dtype="float64")
    problem, sh = plan.shadow_skip, None
    if problem is None and len(valid):
        t0 = time.perf_counter()
        try:
            sh = predict(model, parsed, own, label)
        except Exception as e:  # noqa: BLE001 - a shadow never fails the batch: its rows carry the error
            problem = f"shadow error: {type(e).__name__}: {e}"[:1000]
        seconds = time.perf_counter() - t0
        share[valid] = seconds / len(valid)
        if seconds / len(valid) > plan.shadow_max_seconds_per_row and len(valid) >= 100:
            plan.shadow_skip = (
                f"shadow skipped: {label} took {seconds / len(valid) * 1000:.2f} ms per row, more than "
                f"watch.shadow_max_seconds_per_row ({plan.shadow_max_seconds_per_row:g} s)"
            )
    if sh is None:  # not asked (too slow before) or failed whole: null outputs, the reason on each valid row
        sh = predict(None, parsed, own, label, valid[:0])
        for i in valid:
            sh.reasons[i] = problem
    out: dict[str, Any] = {SHADOW_PREFIX + o.name: sh.columns[o.name] for o in spec.output_list}
    out[SHADOW_REASON] = sh.reasons
    out[SHADOW_SECONDS] = share
    return out
