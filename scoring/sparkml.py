"""Spark ML versions, scored natively: a version with MLflow's ``spark`` flavor is loaded once on
the driver (``mlflow.spark.load_model``, MLlib's own format: no pickle) and applied with
``transform`` to the parsed, validated rows of a batch. The model runs in the executors' JVMs;
Python only parses the events (the same parse, checks and reasons as for any other version).

Its outputs come from what ``transform`` adds: ``prediction`` (double) and, for a classifier with
a probability column, ``probabilities`` (``array<double>``, one value per class index; the class
labels are a label ``StringIndexer``'s when the pipeline has one). A row the model gives no
prediction (null or NaN) is dead-lettered with the reason. A pipeline that would drop rows
(a stage with ``handleInvalid='skip'``) is refused by the gate: its rows would vanish unaccounted.

Rows a stage would fail on (``handleInvalid='error'``) are dead-lettered before ``transform`` by
:func:`guards`: a value a ``StringIndexer`` has no index for, a null or NaN input of a
``VectorAssembler``. Without them one such event would fail its batch, and the batch would fail
again at every restart (a poison pill).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from streamscore.scoring.spec import PREDICTION, PROBABILITIES, InputSpec, Output

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

    from streamscore.scoring.udf import ModelHandle

INPUT_REFUSED = "input the model refuses: "  # the reason of a row a guard took out (see guards)
CACHE_SIZE = 2  # the serving version and the one it replaced (or a candidate)
# loaded pipelines on the driver, process-wide like the workers' cache (streamscore.scoring.udf):
# a replayed batch after a swap finds its version without loading it again
_cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
_lock = threading.Lock()


def flavor_of(model_dir: str | Path) -> str:
    """``spark`` for a version MLflow logged with its Spark flavor, else ``pyfunc``."""
    try:
        meta = yaml.safe_load((Path(model_dir) / "MLmodel").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return "pyfunc"
    return "spark" if isinstance((meta.get("flavors") or {}).get("spark"), dict) else "pyfunc"


def load(handle: ModelHandle) -> Any:
    """The ``PipelineModel`` of ``handle``, loaded once per driver (off a cluster's driver disk,
    MLflow copies it to the distributed file system so executors can read its stages)."""
    key = (handle.name, handle.version)
    with _lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    import mlflow.spark

    model = mlflow.spark.load_model(handle.local_path)
    with _lock:
        _cache[key] = model
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return model


def stages(model: Any) -> list[Any]:
    """Every stage of a (possibly nested) pipeline model, in order."""
    inner = getattr(model, "stages", None)
    if inner is None:
        return [model]
    return [s for st in inner for s in stages(st)]


def _final(model: Any) -> Any:
    """The last stage that predicts (has a prediction column)."""
    found = [s for s in stages(model) if s.hasParam("predictionCol")]
    if not found:
        raise ValueError("the pipeline has no stage with a prediction column")
    return found[-1]


def problems(model: Any) -> list[str]:
    """Why the pipeline cannot serve (empty: it can)."""
    out = []
    for s in stages(model):
        if s.hasParam("handleInvalid") and s.getOrDefault("handleInvalid") == "skip":
            out.append(
                f"stage {type(s).__name__} ({s.uid}) drops rows it cannot handle (handleInvalid='skip'), "
                "which would lose them unaccounted; log it with handleInvalid='error' or 'keep'"
            )
    try:
        _final(model)
    except ValueError as e:
        out.append(str(e))
    return out


def outputs(model: Any, spec: InputSpec, spark: SparkSession) -> tuple[Output, ...]:
    """The outputs ``transform`` gives for the spec's input columns (no Spark job: the schema only)."""
    from pyspark.sql.types import StructType

    from streamscore.scoring.schema import feature_fields

    empty = spark.createDataFrame([], StructType(feature_fields(spec)))
    names = set(model.transform(empty).schema.names)
    final = _final(model)
    found = [Output(PREDICTION, "double")]
    prob = final.getOrDefault("probabilityCol") if final.hasParam("probabilityCol") else None
    if prob and prob in names:
        n = getattr(final, "numClasses", None)
        found.append(Output(PROBABILITIES, "double", array=True, length=int(n) if n else None))
    return tuple(found)


def class_labels(model: Any) -> tuple[str, ...] | None:
    """What a position of ``probabilities`` stands for: the labels of the ``StringIndexer`` that made
    the classifier's label column, else the class indices."""
    final = _final(model)
    n = getattr(final, "numClasses", None)
    if not n:
        return None
    label_col = final.getOrDefault("labelCol") if final.hasParam("labelCol") else None
    for s in stages(model):
        single = type(s).__name__ == "StringIndexerModel" and not s.isSet("inputCols")
        if single and s.isDefined("outputCol") and s.getOrDefault("outputCol") == label_col:
            labels = list(s.labels)
            if len(labels) == n:
                return tuple(str(x) for x in labels)
    return tuple(str(i) for i in range(int(n)))


def apply(model: Any, frame: DataFrame, spec: InputSpec) -> DataFrame:
    """``frame``'s columns with the model's outputs added as the spec's output columns."""
    from pyspark.ml.functions import vector_to_array
    from pyspark.sql import functions as F

    from streamscore.scoring.schema import output_type

    final = _final(model)
    pred_col = final.getOrDefault("predictionCol")
    prob_col = final.getOrDefault("probabilityCol") if final.hasParam("probabilityCol") else None
    keep = frame.columns
    applied = model.transform(frame)
    columns = []
    for o in spec.output_list:
        if o.name == PROBABILITIES:
            c = vector_to_array(F.col(f"`{prob_col}`")) if prob_col else F.lit(None)
        else:
            c = F.col(f"`{pred_col}`")
        columns.append(c.cast(output_type(o)).alias(o.name))
    return applied.select(*[F.col(f"`{c}`") for c in keep], *columns)


def _indexed(model: Any) -> list[tuple[str, list[str]]]:
    """(input column, its labels) of every fitted ``StringIndexer`` of the pipeline."""
    found = []
    for s in stages(model):
        if type(s).__name__ == "StringIndexerModel":
            multi = s.isSet("inputCols")
            cols = s.getInputCols() if multi else [s.getInputCol()]
            labels = s.labelsArray if multi else [s.labels]
            found += [(c, list(known)) for c, known in zip(cols, labels, strict=True)]
    return found


def known_values(model: Any) -> dict[str, list[str]]:
    """The values the pipeline's string indexers know, per input column (rows the gate builds
    from the signature's types take them, so a sample is one the model can score)."""
    return dict(_indexed(model))


def guards(model: Any, spec: InputSpec) -> list[tuple[Column, str]]:
    """(condition, reason) pairs: a valid row where a condition holds would make a stage of the
    pipeline raise; it is dead-lettered with the reason instead. Only the stream's own input
    columns are guarded (a column a stage derives is as good as its inputs)."""
    from pyspark.sql import functions as F

    inputs = {f.name: f for f in spec.features}
    found: list[tuple[Column, str]] = []
    for s in stages(model):
        if not (s.hasParam("handleInvalid") and s.getOrDefault("handleInvalid") == "error"):
            continue
        kind = type(s).__name__
        if kind == "StringIndexerModel":
            for col, known in _indexed(s):
                if col in inputs:
                    c = F.col(f"`{col}`").cast("string")
                    found.append(
                        (
                            c.isNull() | ~c.isin(list(known)),
                            f"field {col!r}: a value the model's {kind} has no index for",
                        )
                    )
        elif kind == "VectorAssembler":
            for col in s.getInputCols():
                f = inputs.get(col)
                if f is None:
                    continue
                c = F.col(f"`{col}`")
                bad = c.isNull() | (F.isnan(c) if f.type in ("double", "float") else F.lit(False))
                found.append((bad, f"field {col!r}: null or NaN, which the model's {kind} cannot assemble"))
    return found


def score_parsed(handle: ModelHandle, parsed: DataFrame, spec: InputSpec) -> DataFrame:
    """Parsed rows (``ok``, ``reason``, event, features, ...) with the version's outputs, in one
    pass: rows a stage would raise on become dead letters (:func:`guards`), every row goes through
    ``transform`` (a row that is not valid with input values the stages take, its outputs then
    discarded: no split of the rows, so the parse runs once without persisting anything), and a
    valid row the model gives no prediction becomes a dead letter too."""
    from pyspark.sql import functions as F

    model = load(handle)
    checks = guards(model, spec)
    guarded = F.lit(None).cast("string")
    for cond, reason in reversed(checks):
        guarded = F.when(cond, F.lit(f"{INPUT_REFUSED}{reason} ({handle.label})")).otherwise(guarded)
    ok = F.col("ok") & guarded.isNull()
    safe = known_values(model)
    features = {f.name: f for f in spec.features}
    placeholders = {
        name: F.lit(safe[name][0]) if safe.get(name) else F.lit(0).cast(f.type) if f.type != "string" else F.lit("")
        for name, f in features.items()
    }
    frame = parsed.select(
        ok.alias("ok"),
        F.when(F.col("ok"), guarded).otherwise(F.col("reason")).alias("reason"),
        *[
            (F.when(ok, F.col(f"`{c}`")).otherwise(placeholders[c]) if c in features else F.col(f"`{c}`")).alias(c)
            for c in parsed.columns
            if c not in ("ok", "reason")
        ],
    )
    applied = apply(model, frame, spec)
    pred = F.col(f"`{spec.primary.name}`")
    missing = pred.isNull() | (F.isnan(pred) if spec.primary.type in ("double", "float") else F.lit(False))
    why = F.when(F.col("ok") & missing, F.lit(f"model error: no prediction (null) for this row ({handle.label})"))
    scored = F.col("ok") & ~missing
    names = {o.name for o in spec.output_list}
    return applied.select(
        scored.alias("ok"),
        F.coalesce(why, F.col("reason")).alias("reason"),
        *[
            (F.when(scored, F.col(f"`{c}`")) if c in names else F.col(f"`{c}`")).alias(c)
            for c in applied.columns
            if c not in ("ok", "reason")
        ],
    )
