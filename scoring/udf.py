"""The scoring pandas UDF, bound to exactly one model version.

Unlike ``mlflow.pyfunc.spark_udf`` (which reloads the model in every task in local mode), the model
is kept in a small per-process cache keyed by (name, version): a Python worker loads a version once
and reuses it across tasks and micro-batches. The cache holds at most ``CACHE_SIZE`` versions (the
serving one, a canary or the one it replaced, and a shadow), so repeated swaps do not grow worker
memory.

On a cluster the driver ships the model folder as an archive (``SparkContext.addArchive``); a
worker loads that copy through ``SparkFiles``.
"""

from __future__ import annotations

import gc
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import pandas as pd

from streamscore.errors import RegistryError
from streamscore.scoring.records import score_chunk
from streamscore.scoring.schema import parse_schema, result_schema
from streamscore.scoring.spec import InputSpec, Output

if TYPE_CHECKING:
    from streamscore.scoring.plan import ScoringPlan

CACHE_SIZE = 3


@dataclass(frozen=True)
class ModelHandle:
    """A concrete, downloaded model version (small and picklable: it travels inside the UDF)."""

    name: str
    version: str
    run_id: str
    local_path: str  # the model folder on the driver
    ship_name: str  # the folder's name under SparkFiles on executors
    flavor: str = "pyfunc"  # pyfunc (a pandas UDF on the workers) | spark (Spark ML, applied natively)
    classes: tuple[str, ...] | None = None  # what the positions of a probabilities output stand for
    # the version's own outputs (the gate's): the table's names and types, but where this version
    # puts them in what it returns (a tensor, or a DataFrame's columns) may differ from another's
    outputs: tuple[Output, ...] | None = None

    @property
    def label(self) -> str:
        return f"model {self.name!r} version {self.version}"

    def own_spec(self, spec: InputSpec) -> InputSpec:
        """The stream's spec with this version's own outputs (when the gate recorded them)."""
        return spec if self.outputs is None else replace(spec, outputs=self.outputs)


# Process-wide on purpose: a Spark Python worker is a process that outlives the tasks it runs
# (spark.python.worker.reuse), and nothing but module state survives from one task to the next,
# so this is where a loaded version stays for the next batch. Bounded (CACHE_SIZE versions).
_cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
_lock = threading.Lock()


def _model_dir(handle: ModelHandle) -> str:
    """The copy the driver shipped to this executor if there is one, else the driver's folder
    (local mode, where driver and workers share the file system)."""
    try:
        from pyspark import SparkFiles

        shipped = SparkFiles.get(handle.ship_name + ".zip")
        if os.path.isfile(os.path.join(shipped, "MLmodel")):
            return shipped
    except Exception:  # noqa: BLE001 - no SparkFiles outside a Spark worker
        pass
    if os.path.isdir(handle.local_path):
        return handle.local_path
    raise RegistryError(f"{handle.label}: model files found neither in SparkFiles nor at {handle.local_path}")


def load_model(handle: ModelHandle) -> Any:
    """The pyfunc model for ``handle``, loaded once per process."""
    key = (handle.name, handle.version)
    with _lock:
        model = _cache.get(key)
        if model is not None:
            _cache.move_to_end(key)
            return model
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(_model_dir(handle))
    with _lock:
        _cache[key] = model
        _cache.move_to_end(key)
        evicted = False
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
            evicted = True
    if evicted:
        gc.collect()
    return model


def cached_versions() -> list[tuple[str, str]]:
    with _lock:
        return list(_cache)


def make_score_udf(handle: ModelHandle, spec: InputSpec) -> Any:
    """A pandas UDF ``value -> struct<ok, reason, event_id, event_time, features..., prediction>``."""
    from pyspark.sql.functions import pandas_udf

    spec = handle.own_spec(spec)

    @pandas_udf(result_schema(spec))  # type: ignore[call-overload]
    def score(batches: Iterator[pd.Series]) -> Iterator[pd.DataFrame]:
        model = load_model(handle)
        for values in batches:
            yield score_chunk(values, spec, model, handle.label)

    return score


def make_plan_udf(plan: ScoringPlan, spec: InputSpec) -> Any:
    """The scoring UDF of a plan with a canary or a shadow (:mod:`~streamscore.scoring.plan`): the
    result struct of :func:`make_score_udf` plus the plan's extra columns."""
    from pyspark.sql.functions import pandas_udf
    from pyspark.sql.types import StructType

    from streamscore.scoring.plan import LoadedPlan, extra_fields, score_plan_chunk

    for h in plan.handles:
        if h.flavor != "pyfunc":
            raise RegistryError(
                f"{h.label} is a Spark ML model: a canary or a shadow needs pyfunc versions (set "
                "watch.canary.fraction: 0 and no watch.shadow_ref to swap Spark ML versions whole)"
            )
    returns = StructType([*result_schema(spec).fields, *extra_fields(spec, plan)])

    def loaded(handle: ModelHandle | None) -> tuple[Any, InputSpec, str] | None:
        return None if handle is None else (load_model(handle), handle.own_spec(spec), handle.label)

    @pandas_udf(returns)  # type: ignore[call-overload]
    def score(batches: Iterator[pd.Series]) -> Iterator[pd.DataFrame]:
        served = loaded(plan.served)
        assert served is not None
        models = LoadedPlan(
            served, loaded(plan.canary), plan.fraction, loaded(plan.shadow), plan.shadow_max_seconds_per_row
        )
        for values in batches:
            yield score_plan_chunk(values, spec, models)

    return score


def make_parse_udf(spec: InputSpec) -> Any:
    """A pandas UDF ``value -> struct<ok, reason, event_id, event_time, features...>``: the parse
    and checks alone, for a model applied outside Python (Spark ML)."""
    from pyspark.sql.functions import pandas_udf

    @pandas_udf(parse_schema(spec))  # type: ignore[call-overload]
    def parse(batches: Iterator[pd.Series]) -> Iterator[pd.DataFrame]:
        for values in batches:
            yield score_chunk(values, spec, None)

    return parse
