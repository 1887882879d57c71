"""The scoring transform: raw events -> one row per event, scored or dead-lettered, with lineage.

Pure frame-to-frame logic (no reads, no writes): :func:`score` runs the model's UDF once per input
row; :func:`scored_rows` and :func:`dead_letter_rows` project its result onto the two output tables
(:mod:`streamscore.scoring.schema`).
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from streamscore.scoring import schema
from streamscore.scoring.spec import InputSpec
from streamscore.scoring.udf import ModelHandle, make_score_udf

COORDINATES = schema.names(schema.COORDINATES)


def score(events: DataFrame, handle: ModelHandle, spec: InputSpec, batch_id: int) -> DataFrame:
    """Every input row comes out once: ``ok`` rows carry features + prediction, others ``reason``."""
    udf = make_score_udf(handle, spec)
    scored = events.select(
        udf(F.col(schema.VALUE)).alias("r"),
        # the payload as text for the dead-letter table; bytes that are not UTF-8 become U+FFFD so
        # every reader can read the table (the row's reason says the payload was not valid UTF-8)
        F.expr(f"make_valid_utf8(CAST({schema.VALUE} AS STRING))").alias("raw_value"),
        *COORDINATES,
    )
    lineage = {
        "model_name": F.lit(handle.name),
        "model_version": F.lit(handle.version),
        "model_run_id": F.lit(handle.run_id),
        "scored_at": F.current_timestamp(),
        "batch_id": F.lit(batch_id),
    }
    return scored.select("r.*", "raw_value", *COORDINATES, *_typed(lineage, schema.LINEAGE))


def _typed(columns: dict[str, Column], struct: schema.StructType) -> list[Column]:
    return [columns[f.name].cast(f.dataType).alias(f.name) for f in struct.fields]


def as_events(values: DataFrame, source: str) -> DataFrame:
    """A frame with a ``value`` column as a source would give it, the coordinates being ``source``
    and nulls: for Delta rows, samples and benchmarks."""
    coordinates = {f.name: F.lit(None) for f in schema.COORDINATES.fields} | {"source": F.lit(source)}
    return values.select(schema.VALUE, *_typed(coordinates, schema.COORDINATES))


def count_outcomes(results: DataFrame) -> tuple[int, int]:
    """(rows scored, rows dead-lettered) of a scored frame, in one job."""
    counts = {r["ok"]: r["count"] for r in results.groupBy("ok").count().collect()}
    return counts.get(True, 0), counts.get(False, 0)


def scored_rows(results: DataFrame, spec: InputSpec) -> DataFrame:
    return results.where("ok").select(*[F.col(f"`{n}`") for n in schema.names(schema.output_schema(spec))])


def dead_letter_rows(results: DataFrame) -> DataFrame:
    renamed = {"dead_lettered_at": F.col("scored_at")}
    return results.where("NOT ok").select(
        *[renamed.get(f.name, F.col(f.name)).alias(f.name) for f in schema.DEAD_LETTER.fields]
    )
