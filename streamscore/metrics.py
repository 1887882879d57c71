"""Per-batch metrics folded into one MLflow step per window (``tracking.metrics_interval_s``).

A stream that never ends would otherwise log a dozen values per micro-batch, a batch every second
or so: Databricks caps a run's metric steps (1,000,000 on its resource-limits page). Over a
window, counts are summed, durations (``*_s``) become their mean and their max (``<name>_max``),
``rows_per_s`` is the window's rows over its wall time, a canary's or a shadow's comparison with
the served version is the mean weighted by the rows compared (a ``*_max_*`` the maximum), and the
rest (``model_version``, the dropped-metrics counter) keep their last value. The step is the
window's last batch id, so steps stay comparable with the tables' ``batch_id``. With an interval
of 0 every batch is its own step, with the names and values it has always had.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

SUMMED = (
    "rows_in",
    "rows_scored",
    "rows_dead_lettered",
    "rows_replayed",
    "canary_rows",
    "canary_rows_served",
    "canary_model_errors",
    "shadow_rows",
    "shadow_model_errors",
    "canary_rows_compared",
    "shadow_rows_compared",
)
# a canary's or a shadow's per-batch comparison: over a window, the mean weighted by the rows it is
# of (``<side>_rows_compared``, or ``<side>_rows`` for the time per row); a ``max_*`` the maximum
_MEANS = ("agreement", "mean_total_variation", "total_variation_distance", "mean_abs_diff", "mean_shift")


def _weight_key(key: str) -> str | None:
    side, _, measure = key.partition("_")
    if side not in ("canary", "shadow"):
        return None
    if measure in _MEANS:
        return f"{side}_rows_compared"
    return f"{side}_rows" if measure == "seconds_per_row" else None


class MetricsWindow:
    def __init__(self, interval_s: float, emit: Callable[[dict[str, float | None], int], None]):
        self.interval_s = interval_s
        self._emit = emit
        self._reset(time.monotonic())

    def _reset(self, now: float) -> None:
        self.opened_at = now
        self.batches = 0
        self.last_batch_id: int | None = None
        self.sums: dict[str, float] = {}
        self.maxima: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.weighted: dict[str, list[float]] = {}  # key -> [sum of value * weight, sum of weights]

    def add(self, metrics: dict[str, Any], batch_id: int) -> None:
        """One batch's metrics; emits the window when it is due (every batch with interval 0)."""
        if self.interval_s == 0:
            self._emit(metrics, batch_id)
            return
        self.batches += 1
        self.last_batch_id = batch_id
        for key, value in metrics.items():
            if value is None or key == "rows_per_s":  # a rate: the window's own, below
                continue
            v = float(value)
            weight = _weight_key(key)
            if weight is not None:
                w = float(metrics.get(weight) or 0.0)
                acc = self.weighted.setdefault(key, [0.0, 0.0])
                acc[0] += v * w
                acc[1] += w
                continue
            if key.startswith(("canary_max_", "shadow_max_")):
                self.maxima[key] = max(self.maxima.get(key, v), v)
                continue
            if key in SUMMED or key.endswith("_s"):
                self.sums[key] = self.sums.get(key, 0.0) + v
            if key.endswith("_s"):
                self.maxima[key] = max(self.maxima.get(key, v), v)
            elif key not in SUMMED:
                self.last[key] = v
        if time.monotonic() - self.opened_at >= self.interval_s:
            self.flush()

    def flush(self) -> None:
        """Emit what the window holds (nothing when no batch came)."""
        now = time.monotonic()
        if self.batches == 0 or self.last_batch_id is None:
            self.opened_at = now
            return
        out: dict[str, float | None] = {"batches": float(self.batches)}
        for key, total in self.sums.items():
            if key.endswith("_s"):
                out[key] = total / self.batches
                out[f"{key}_max"] = self.maxima[key]
            else:
                out[key] = total
        out.update(self.last)
        out.update({k: m for k, m in self.maxima.items() if not k.endswith("_s")})
        out.update({k: total / w for k, (total, w) in self.weighted.items() if w > 0})
        seconds = now - self.opened_at
        out["rows_per_s"] = self.sums.get("rows_in", 0.0) / seconds if seconds > 0 else None
        step = self.last_batch_id
        self._reset(now)
        self._emit(out, step)
