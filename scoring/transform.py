"""The scoring transform: raw events -> one row per event, scored or dead-lettered, with lineage."""

from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from scoring.spec import InputSpec
from scoring.udf import ModelHandle, make_score_udf

# columns every source provides (see scoring.io): the raw payload and where it came from
SOURCE_COLUMNS = ["value", "source", "source_partition", "source_offset", "source_timestamp"]
COORDINATES = SOURCE_COLUMNS[1:]
LINEAGE = ["model_name", "model_version", "model_run_id", "scored_at", "batch_id"]


def score(events: DataFrame, handle: ModelHandle, spec: InputSpec, batch_id: int) -> DataFrame:
    """Every input row comes out once: ``ok`` rows carry features + prediction, others ``reason``."""
    udf = make_score_udf(handle, spec)
    scored = events.select(
        udf(F.col("value")).alias("r"),
        F.col("value").cast("string").alias("raw_value"),
        *COORDINATES,
    )
    return scored.select(
        "r.*",
        "raw_value",
        *COORDINATES,
        F.lit(handle.name).alias("model_name"),
        F.lit(handle.version).alias("model_version"),
        F.lit(handle.run_id).alias("model_run_id"),
        F.current_timestamp().alias("scored_at"),
        F.lit(batch_id).cast("bigint").alias("batch_id"),
    )


def as_events(values: DataFrame, source: str) -> DataFrame:
    """A frame with a ``value`` column as a source would give it (no coordinates): for samples and benchmarks."""
    return values.select(
        "value",
        F.lit(source).alias("source"),
        F.lit(None).cast("int").alias("source_partition"),
        F.lit(None).cast("bigint").alias("source_offset"),
        F.lit(None).cast("timestamp").alias("source_timestamp"),
    )


def count_outcomes(results: DataFrame) -> tuple[int, int]:
    """(rows scored, rows dead-lettered) of a scored frame, in one job."""
    counts = {r["ok"]: r["count"] for r in results.groupBy("ok").count().collect()}
    return counts.get(True, 0), counts.get(False, 0)


def scored_rows(results: DataFrame, spec: InputSpec) -> DataFrame:
    cols = ["event_id", "event_time", *[f"`{n}`" for n in spec.feature_names], "prediction", *LINEAGE, *COORDINATES]
    return results.where("ok").select(*cols)


def dead_letter_rows(results: DataFrame) -> DataFrame:
    return results.where("NOT ok").select(
        "raw_value", "reason", *COORDINATES, "model_name", "model_version", "batch_id",
        F.col("scored_at").alias("dead_lettered_at"),
    )


def output_schema_ddl(spec: InputSpec) -> str:
    from scoring.spec import SPARK_TYPES

    cols = ["event_id string", "event_time timestamp"]
    cols += [f"`{f.name}` {SPARK_TYPES[f.type]}" for f in spec.features]
    cols += [f"prediction {SPARK_TYPES[spec.prediction_type]}"]
    cols += ["model_name string", "model_version string", "model_run_id string", "scored_at timestamp",
             "batch_id bigint"]
    cols += [*_COORD_DDL]
    return ", ".join(cols)


_COORD_DDL = ["source string", "source_partition int", "source_offset bigint", "source_timestamp timestamp"]

DEAD_LETTER_DDL = ", ".join(
    ["raw_value string", "reason string", *_COORD_DDL, "model_name string", "model_version string",
     "batch_id bigint", "dead_lettered_at timestamp"]
)
