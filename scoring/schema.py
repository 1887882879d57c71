"""Every table and frame schema of the project, in one place (Spark ``StructType``).

* :data:`COORDINATES`: where an input record came from (topic or table, partition, offset, time);
  every source yields ``value`` (the raw payload) plus these columns;
* :data:`LINEAGE`: which model version scored a row, when, in which micro-batch;
* :func:`result_schema`: the struct the scoring UDF returns for each input row (one column per
  model output: :func:`output_fields`);
* :func:`output_schema`: the scored-rows table; :data:`DEAD_LETTER`: the dead-letter table;
* :data:`BACKFILL_ID`: the column that names a backfill run's slice of its tables.
"""

from __future__ import annotations

from pyspark.sql.types import (
    ArrayType,
    BooleanType,
    DataType,
    DoubleType,
    FloatType,
    IntegerType,
    LongType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

from streamscore.errors import SignatureError
from streamscore.scoring.spec import InputSpec, Output

# MLflow ColSpec type name -> Spark type
SPARK_TYPES: dict[str, DataType] = {
    "double": DoubleType(),
    "float": FloatType(),
    "long": LongType(),
    "integer": IntegerType(),
    "string": StringType(),
    "boolean": BooleanType(),
}

VALUE = "value"  # the raw payload column of every source (binary from Kafka, string from Delta)

COORDINATES = StructType(
    [
        StructField("source", StringType()),  # Kafka topic or Delta table path
        StructField("source_partition", IntegerType()),
        StructField("source_offset", LongType()),
        StructField("source_timestamp", TimestampType()),
    ]
)

LINEAGE = StructType(
    [
        StructField("model_name", StringType()),
        StructField("model_version", StringType()),
        StructField("model_run_id", StringType()),
        StructField("scored_at", TimestampType()),
        StructField("batch_id", LongType()),
    ]
)

EVENT = StructType([StructField("event_id", StringType()), StructField("event_time", TimestampType())])

DEAD_LETTER = StructType(
    [
        StructField("raw_value", StringType()),
        StructField("reason", StringType()),
        *COORDINATES.fields,
        StructField("model_name", StringType()),
        StructField("model_version", StringType()),
        StructField("batch_id", LongType()),
        StructField("dead_lettered_at", TimestampType()),
    ]
)

BACKFILL_ID = StructField("backfill_id", StringType())


def names(schema: StructType) -> list[str]:
    return [f.name for f in schema.fields]


def feature_fields(spec: InputSpec) -> list[StructField]:
    return [StructField(f.name, SPARK_TYPES[f.type]) for f in spec.features]


def output_type(output: Output) -> DataType:
    t = SPARK_TYPES[output.type]
    return ArrayType(t) if output.array else t


def output_fields(spec: InputSpec) -> list[StructField]:
    """One column per model output (``prediction``, ``probabilities``, or the model's own names)."""
    return [StructField(o.name, output_type(o)) for o in spec.output_list]


def result_schema(spec: InputSpec) -> StructType:
    """What the scoring UDF returns per input row: ``ok`` + ``reason``, the parsed event, then the
    model's outputs."""
    return StructType([*parse_schema(spec).fields, *output_fields(spec)])


def parse_schema(spec: InputSpec) -> StructType:
    """What parsing alone returns per input row (the result without the model's outputs)."""
    return StructType(
        [StructField("ok", BooleanType()), StructField("reason", StringType()), *EVENT.fields, *feature_fields(spec)]
    )


def output_schema(spec: InputSpec) -> StructType:
    """The scored-rows table: event, features, the model's outputs, lineage, source coordinates."""
    return StructType(
        [*EVENT.fields, *feature_fields(spec), *output_fields(spec), *LINEAGE.fields, *COORDINATES.fields]
    )


SHADOW_LINEAGE = StructType(
    [
        StructField("shadow_model_version", StringType()),
        StructField("shadow_model_run_id", StringType()),
        StructField("shadow_reason", StringType()),  # why the shadow has no outputs for the row (null: it has)
    ]
)


def shadow_schema(spec: InputSpec) -> StructType:
    """The shadow table (``watch.shadow_ref``): per valid event, the served outputs (under their
    own names, with the served version's lineage) and the shadow's (``shadow_<name>``)."""
    shadow_outputs = [StructField("shadow_" + f.name, f.dataType) for f in output_fields(spec)]
    return StructType(
        [
            *EVENT.fields,
            *output_fields(spec),
            *shadow_outputs,
            *LINEAGE.fields,
            *SHADOW_LINEAGE.fields,
            *COORDINATES.fields,
        ]
    )


def with_label(schema: StructType, label_col: str | None, spec: InputSpec) -> StructType:
    """The output table with a label column (``monitor.label_col``), of the prediction's type: null
    when rows are scored (appends leave it out), filled when labels are joined in later."""
    if label_col is None:
        return schema
    if label_col in schema.fieldNames():
        raise SignatureError(
            f"monitor.label_col={label_col!r} is already a column of the output table (an input or an "
            "output of the model): name the label column differently"
        )
    primary = next(f for f in output_fields(spec) if f.name == spec.primary.name)
    return StructType([*schema.fields, StructField(label_col, primary.dataType, nullable=True)])


def with_backfill_id(schema: StructType) -> StructType:
    return StructType([*schema.fields, BACKFILL_ID])
