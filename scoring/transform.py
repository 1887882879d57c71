"""The scoring transform: raw events -> one row per event, scored or dead-lettered, with lineage.

Pure frame-to-frame logic (no reads, no writes): :func:`score` runs the model's UDF once per input
row; :func:`scored_rows` and :func:`dead_letter_rows` project its result onto the two output tables
(:mod:`streamscore.scoring.schema`).
"""

from __future__ import annotations

from typing import Any

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from streamscore.scoring import schema
from streamscore.scoring.plan import BY_CANARY, SHADOW_PREFIX, SHADOW_REASON, ScoringPlan, extra_fields
from streamscore.scoring.spec import InputSpec
from streamscore.scoring.udf import ModelHandle, make_parse_udf, make_plan_udf, make_score_udf

COORDINATES = schema.names(schema.COORDINATES)


def score(
    events: DataFrame,
    handle: ModelHandle,
    spec: InputSpec,
    batch_id: int,
    keep_valid_raw: bool = True,
    plan: ScoringPlan | None = None,
) -> DataFrame:
    """Every input row comes out once: ``ok`` rows carry features + the model's outputs, others
    ``reason``.

    ``raw_value`` (the payload as text) is what the dead-letter table keeps; for valid rows it is
    kept only with ``keep_valid_raw`` (a sample for the gate, a comparison of versions), so a
    batch does not carry every payload a second time for nothing.

    A pyfunc version is one pandas UDF (parse + predict). A Spark ML version
    (:mod:`~streamscore.scoring.sparkml`) is a parse UDF, then the pipeline's ``transform``.

    ``plan``: a canary or a shadow besides ``handle`` (its ``served``): one pandas UDF scores with
    all of them (:mod:`~streamscore.scoring.plan`); the lineage names, per row, the version whose
    outputs it carries, and the plan's extra columns follow the usual ones."""
    extra: list[str] = []
    if plan is not None and not plan.plain:
        flat = _applied(events, make_plan_udf(plan, spec))
        extra = [f.name for f in extra_fields(spec, plan)]
    elif handle.flavor == "spark":
        from streamscore.scoring import sparkml

        flat = sparkml.score_parsed(handle, _applied(events, make_parse_udf(spec)), spec)
    else:
        flat = _applied(events, make_score_udf(handle, spec))
    # the payload as text; bytes that are not UTF-8 become U+FFFD so every reader can read the
    # dead-letter table (the row's reason says the payload was not valid UTF-8)
    raw = F.expr(f"make_valid_utf8(CAST({schema.VALUE} AS STRING))")
    version, run_id = F.lit(handle.version), F.lit(handle.run_id)
    if plan is not None and plan.canary is not None:
        by_canary = F.col(BY_CANARY)
        version = F.when(by_canary, F.lit(plan.canary.version)).otherwise(version)
        run_id = F.when(by_canary, F.lit(plan.canary.run_id)).otherwise(run_id)
    lineage = {
        "model_name": F.lit(handle.name),
        "model_version": version,
        "model_run_id": run_id,
        "scored_at": F.current_timestamp(),
        "batch_id": F.lit(batch_id),
    }
    return flat.select(
        *[F.col(f"`{n}`") for n in schema.names(schema.result_schema(spec))],
        (raw if keep_valid_raw else F.when(~F.col("ok"), raw)).alias("raw_value"),
        *COORDINATES,
        *_typed(lineage, schema.LINEAGE),
        *[F.col(n) for n in extra],
    )


def _applied(events: DataFrame, udf: Any) -> DataFrame:
    """``udf`` applied to each event's payload, its struct's fields as columns beside the payload
    and the source coordinates."""
    applied = events.select(udf(F.col(schema.VALUE)).alias("r"), schema.VALUE, *COORDINATES)
    return applied.select("r.*", schema.VALUE, *COORDINATES)


def _typed(columns: dict[str, Column], struct: schema.StructType) -> list[Column]:
    return [columns[f.name].cast(f.dataType).alias(f.name) for f in struct.fields]


def as_events(values: DataFrame, source: str) -> DataFrame:
    """A frame with a ``value`` column as a source would give it, the coordinates being ``source``
    and nulls: for Delta rows, samples and benchmarks."""
    coordinates = {f.name: F.lit(None) for f in schema.COORDINATES.fields} | {"source": F.lit(source)}
    return values.select(schema.VALUE, *_typed(coordinates, schema.COORDINATES))


def scored_rows(results: DataFrame, spec: InputSpec) -> DataFrame:
    return results.where("ok").select(*[F.col(f"`{n}`") for n in schema.names(schema.output_schema(spec))])


def shadow_rows(results: DataFrame, spec: InputSpec, plan: ScoringPlan) -> DataFrame:
    """The shadow table's rows (:func:`~streamscore.scoring.schema.shadow_schema`): every valid row."""
    assert plan.shadow is not None
    shadow = {
        **{"shadow_" + o.name: F.col(f"`{SHADOW_PREFIX}{o.name}`") for o in spec.output_list},
        "shadow_model_version": F.lit(plan.shadow.version),
        "shadow_model_run_id": F.lit(plan.shadow.run_id),
        "shadow_reason": F.col(SHADOW_REASON),
    }
    return results.where("ok").select(
        *[
            shadow[f.name].cast(f.dataType).alias(f.name) if f.name in shadow else F.col(f"`{f.name}`")
            for f in schema.shadow_schema(spec).fields
        ]
    )


def dead_letter_rows(results: DataFrame) -> DataFrame:
    renamed = {"dead_lettered_at": F.col("scored_at")}
    return results.where("NOT ok").select(
        *[renamed.get(f.name, F.col(f.name)).alias(f.name) for f in schema.DEAD_LETTER.fields]
    )


# -- Kafka messages ----------------------------------------------------------------------------
HEADER_MODEL_NAME = "streamscore.model_name"
HEADER_MODEL_VERSION = "streamscore.model_version"
HEADER_MESSAGE_ID = "streamscore.message_id"
HEADER_BACKFILL = "streamscore.backfill"  # on messages a backfill wrote: its backfill id
HEADER_KIND = "streamscore.kind"  # scored | dead_letter


def message_id(without_offset: Column) -> Column:
    """A message's identity, the same when a batch is written again after a crash: the version that
    scored it, the batch, and where the event came from (topic, partition, offset; for a Delta
    source, which has no offsets: the table and ``without_offset``, the event id of a scored row,
    a hash of a dead letter's payload)."""
    where = F.when(
        F.col("source_offset").isNotNull(),
        F.concat_ws(":", F.col("source_partition").cast("string"), F.col("source_offset").cast("string")),
    ).otherwise(F.coalesce(without_offset, F.lit("")))
    return F.concat_ws(
        ":", F.col("model_version"), F.col("batch_id").cast("string"), F.coalesce(F.col("source"), F.lit("")), where
    )


def _headers(kind: str, backfill_id: str | None) -> Column:
    pairs = [
        (HEADER_KIND, F.lit(kind)),
        (HEADER_MODEL_NAME, F.col("model_name")),
        (HEADER_MODEL_VERSION, F.col("model_version")),
        (HEADER_MESSAGE_ID, F.col("message_id")),
    ]
    if backfill_id is not None:
        pairs.append((HEADER_BACKFILL, F.lit(backfill_id)))
    return F.array(
        *[F.struct(F.lit(k).alias("key"), F.encode(F.coalesce(v, F.lit("")), "UTF-8").alias("value")) for k, v in pairs]
    )


def kafka_messages(scored: DataFrame, spec: InputSpec, backfill_id: str | None = None) -> DataFrame:
    """One message per scored row (``key``, ``value``, ``headers``, as Spark's Kafka writer takes
    them): key = the event id, so a partitioned consumer sees an event's replays in order; value =
    JSON of the event id and time, every model output, the lineage and the source coordinates, and
    the message id (:func:`message_id`)."""
    outputs = [o.name for o in spec.output_list]
    fields = [
        "event_id",
        "event_time",
        *outputs,
        *schema.names(schema.LINEAGE),
        *COORDINATES,
    ]
    with_id = scored.withColumn("message_id", message_id(F.col("event_id")))
    value = F.to_json(F.struct(*[F.col(f"`{n}`") for n in fields], F.col("message_id")))
    return with_id.select(
        F.col("event_id").alias("key"), value.alias("value"), _headers("scored", backfill_id).alias("headers")
    )


def kafka_dead_letters(dead: DataFrame, backfill_id: str | None = None) -> DataFrame:
    """One message per dead letter: the payload as text, the reason, the coordinates and the
    version that read it; keyed by the message id (a dead letter has no trusted event id: from a
    Delta source, which has no offsets, its identity holds a hash of its payload)."""
    payload = F.sha2(F.coalesce(F.col("raw_value"), F.lit("")), 256)
    with_id = dead.withColumn("message_id", message_id(payload))
    fields = [f.name for f in schema.DEAD_LETTER.fields]
    value = F.to_json(F.struct(*[F.col(n) for n in fields], F.col("message_id")))
    return with_id.select(
        F.col("message_id").alias("key"), value.alias("value"), _headers("dead_letter", backfill_id).alias("headers")
    )
