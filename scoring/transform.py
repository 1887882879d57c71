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
from streamscore.scoring.udf import ModelHandle, make_parse_udf, make_score_udf

COORDINATES = schema.names(schema.COORDINATES)


def score(
    events: DataFrame,
    handle: ModelHandle,
    spec: InputSpec,
    batch_id: int,
    keep_valid_raw: bool = True,
) -> DataFrame:
    """Every input row comes out once: ``ok`` rows carry features + the model's outputs, others
    ``reason``.

    ``raw_value`` (the payload as text) is what the dead-letter table keeps; for valid rows it is
    kept only with ``keep_valid_raw`` (a sample for the gate, a comparison of versions), so a
    batch does not carry every payload a second time for nothing.

    A pyfunc version is one pandas UDF (parse + predict). A Spark ML version
    (:mod:`~streamscore.scoring.sparkml`) is a parse UDF, then the pipeline's ``transform``."""
    if handle.flavor == "spark":
        from streamscore.scoring import sparkml

        parsed = events.select(make_parse_udf(spec)(F.col(schema.VALUE)).alias("r"), schema.VALUE, *COORDINATES)
        parsed = parsed.select("r.*", schema.VALUE, *COORDINATES)
        flat = sparkml.score_parsed(handle, parsed, spec)
    else:
        udf = make_score_udf(handle, spec)
        flat = events.select(udf(F.col(schema.VALUE)).alias("r"), schema.VALUE, *COORDINATES)
        flat = flat.select("r.*", schema.VALUE, *COORDINATES)
    # the payload as text; bytes that are not UTF-8 become U+FFFD so every reader can read the
    # dead-letter table (the row's reason says the payload was not valid UTF-8)
    raw = F.expr(f"make_valid_utf8(CAST({schema.VALUE} AS STRING))")
    lineage = {
        "model_name": F.lit(handle.name),
        "model_version": F.lit(handle.version),
        "model_run_id": F.lit(handle.run_id),
        "scored_at": F.current_timestamp(),
        "batch_id": F.lit(batch_id),
    }
    return flat.select(
        *[F.col(f"`{n}`") for n in schema.names(schema.result_schema(spec))],
        (raw if keep_valid_raw else F.when(~F.col("ok"), raw)).alias("raw_value"),
        *COORDINATES,
        *_typed(lineage, schema.LINEAGE),
    )


def _typed(columns: dict[str, Column], struct: schema.StructType) -> list[Column]:
    return [columns[f.name].cast(f.dataType).alias(f.name) for f in struct.fields]


def as_events(values: DataFrame, source: str) -> DataFrame:
    """A frame with a ``value`` column as a source would give it, the coordinates being ``source``
    and nulls: for Delta rows, samples and benchmarks."""
    coordinates = {f.name: F.lit(None) for f in schema.COORDINATES.fields} | {"source": F.lit(source)}
    return values.select(schema.VALUE, *_typed(coordinates, schema.COORDINATES))


def scored_rows(results: DataFrame, spec: InputSpec) -> DataFrame:
    return results.where("ok").select(*[F.col(f"`{n}`") for n in schema.names(schema.output_schema(spec))])


def dead_letter_rows(results: DataFrame) -> DataFrame:
    renamed = {"dead_lettered_at": F.col("scored_at")}
    return results.where("NOT ok").select(
        *[renamed.get(f.name, F.col(f.name)).alias(f.name) for f in schema.DEAD_LETTER.fields]
    )
