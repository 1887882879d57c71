"""Safe rollout: what a batch scored with a canary or a shadow tells, and what the stream does about it.

* :class:`RolloutStats`: one batch's figures (read off its persisted result after the writes);
* :class:`CanaryProgress`: a canary's figures so far, recorded in the batch ledger so a restart
  continues where it was; :meth:`CanaryProgress.breach` says which ``watch.rollback.*`` threshold
  it crossed, :meth:`CanaryProgress.due` when ``watch.canary.promote_after_*`` is reached.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from streamscore.scoring import plan as P
from streamscore.scoring.compare import compare_predictions, compared_output
from streamscore.scoring.spec import InputSpec

if TYPE_CHECKING:
    from streamscore.conf.settings import CanarySettings, RollbackSettings


@dataclass(frozen=True)
class Side:
    """One extra version's figures in a batch: rows it was asked, rows it failed on (model
    errors), its predict seconds, and the comparison with the served version's outputs on the
    rows both scored (:func:`~streamscore.scoring.compare.compare_predictions`)."""

    version: str
    rows: int
    errors: int
    seconds: float
    comparison: dict[str, Any]
    served: int = 0  # a canary: rows whose served outputs are its own

    def metrics(self, prefix: str) -> dict[str, float]:
        out = {
            f"{prefix}_rows": float(self.rows),
            f"{prefix}_model_errors": float(self.errors),
            f"{prefix}_seconds_per_row": self.seconds / self.rows if self.rows else 0.0,
            f"{prefix}_rows_compared": float(self.comparison.get("rows", 0)),
        }
        if prefix == "canary":
            out["canary_rows_served"] = float(self.served)
        if self.version.isdigit():
            out[f"{prefix}_version"] = float(self.version)
        if self.comparison.get("rows"):  # a batch with no row to compare says nothing of agreement
            for k, v in self.comparison.items():
                if isinstance(v, (int, float)) and k != "rows":
                    out[f"{prefix}_{k}"] = float(v)
        return out


@dataclass(frozen=True)
class RolloutStats:
    canary: Side | None = None
    shadow: Side | None = None
    shadow_written: bool = True

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.canary is not None:
            out |= self.canary.metrics("canary")
        if self.shadow is not None:
            out |= self.shadow.metrics("shadow")
            out["shadow_write_failed"] = 0.0 if self.shadow_written else 1.0
        return out


def batch_stats(results: DataFrame, spec: InputSpec, plan: P.ScoringPlan, shadow_written: bool) -> RolloutStats:
    """The batch's canary and shadow figures, from its persisted result (one small job: the
    compared output of the valid rows and of the canary's, and the plan's columns)."""
    compared = compared_output(spec)
    cols = [F.col(f"`{compared.name}`").alias("served"), F.col("ok")]
    if plan.canary is not None:
        cols += [F.col(c) for c in (P.CANARY, P.BY_CANARY, P.CANARY_ERROR, P.CANARY_BASE, P.CANARY_SECONDS)]
        keep = F.col("ok") | F.col(P.CANARY)
    else:
        keep = F.col("ok")
    if plan.shadow is not None:
        cols += [F.col(f"`{P.SHADOW_PREFIX}{compared.name}`").alias("shadow"), F.col(P.SHADOW_REASON)]
        cols += [F.col(P.SHADOW_SECONDS)]
    df: Any = results.where(keep).select(*cols).toPandas()
    canary = shadow = None
    if plan.canary is not None:
        picked = df[P.CANARY].fillna(False).astype(bool)
        by = df[P.BY_CANARY].fillna(False).astype(bool)
        pairs = df[by & df[P.CANARY_BASE].notna()]
        canary = Side(
            plan.canary.version,
            rows=int(picked.sum()),
            errors=int((picked & df[P.CANARY_ERROR].notna()).sum()),
            seconds=float(df[P.CANARY_SECONDS].fillna(0.0).sum()),
            comparison=_compare(pairs[P.CANARY_BASE], pairs["served"], compared.ddl),
            served=int(by.sum()),
        )
    if plan.shadow is not None:
        ok = df["ok"].astype(bool)
        failed = ok & df[P.SHADOW_REASON].notna()
        pairs = df[ok & ~failed]
        shadow = Side(
            plan.shadow.version,
            rows=int(ok.sum()),
            errors=int(failed.sum()),
            seconds=float(df[P.SHADOW_SECONDS].fillna(0.0).sum()),
            comparison=_compare(pairs["served"], pairs["shadow"], compared.ddl),
        )
    return RolloutStats(canary, shadow, shadow_written)


def _compare(base: Any, other: Any, ddl: str) -> dict[str, Any]:
    import pandas as pd

    out = compare_predictions([pd.DataFrame({"base": list(base), "other": list(other)})], ddl)
    out.pop("distribution", None)
    out.pop("class_share", None)
    return out


@dataclass
class CanaryProgress:
    """A canary's figures since it started serving its share (kept across restarts by the ledger)."""

    version: str
    run_id: str
    fraction: float
    batches: int = 0
    rows: int = 0  # rows it was asked
    errors: int = 0  # of which it failed on
    seconds: float = 0.0
    compared: int = 0  # rows compared with the served version
    agreeing: float = 0.0  # classifiers: rows whose (top) class agreed
    abs_diff: float = 0.0  # regressors: the sum of |difference|
    kind: str | None = None  # the comparison's kind (classification, probabilities, regression)

    def add(self, side: Side) -> None:
        self.batches += 1
        self.rows += side.rows
        self.errors += side.errors
        self.seconds += side.seconds
        n = int(side.comparison.get("rows", 0))
        self.compared += n
        self.kind = side.comparison.get("kind", self.kind)
        if "agreement" in side.comparison:
            self.agreeing += float(side.comparison["agreement"]) * n
        if "mean_abs_diff" in side.comparison:
            self.abs_diff += float(side.comparison["mean_abs_diff"]) * n

    def breach(self, rb: RollbackSettings) -> str | None:
        """The first threshold crossed, as a sentence naming it and the fix; None while within all
        of them (or before ``min_rows`` rows)."""
        if self.rows < rb.min_rows:
            return None
        rate = self.errors / self.rows
        if rb.max_model_error_rate is not None and rate > rb.max_model_error_rate:
            return (
                f"it failed on {self.errors} of the {self.rows} rows it scored ({rate:.3f}), more than "
                f"watch.rollback.max_model_error_rate {rb.max_model_error_rate:g}"
            )
        if self.compared and rb.max_disagreement is not None and self.kind != "regression":
            disagreement = 1.0 - self.agreeing / self.compared
            if disagreement > rb.max_disagreement:
                return (
                    f"it disagreed with the previous version on {disagreement:.3f} of {self.compared} rows, more "
                    f"than watch.rollback.max_disagreement {rb.max_disagreement:g}"
                )
        if self.compared and rb.max_mean_abs_diff is not None and self.kind == "regression":
            mean = self.abs_diff / self.compared
            if mean > rb.max_mean_abs_diff:
                return (
                    f"its outputs differ from the previous version's by {mean:.4g} on average over {self.compared} "
                    f"rows, more than watch.rollback.max_mean_abs_diff {rb.max_mean_abs_diff:g}"
                )
        per_row = self.seconds / self.rows
        if rb.max_seconds_per_row is not None and per_row > rb.max_seconds_per_row:
            return (
                f"it took {per_row:.3g} s per row to score, more than watch.rollback.max_seconds_per_row "
                f"{rb.max_seconds_per_row:g}"
            )
        return None

    def due(self, canary: CanarySettings) -> bool:
        return self.batches >= canary.promote_after_batches and self.rows >= canary.promote_after_rows

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CanaryProgress:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
