"""Sources and sinks: the only module of ``scoring`` that reads or writes data.

Sources return the columns of :data:`scoring.transform.SOURCE_COLUMNS`. Sinks append to Delta with
``txnAppId``/``txnVersion`` so a replayed micro-batch is not written twice.
"""

from __future__ import annotations

from typing import Optional

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F


def kafka_options(kafka) -> dict[str, str]:
    opts = {
        "kafka.bootstrap.servers": kafka.bootstrap_servers,
        "subscribe": kafka.topic,
        "startingOffsets": kafka.starting_offsets,
        "failOnDataLoss": str(kafka.fail_on_data_loss).lower(),
    }
    if kafka.sasl_password is not None:
        opts["kafka.sasl.jaas.config"] = (
            "org.apache.kafka.common.security.plain.PlainLoginModule required "
            f'username="{kafka.sasl_username or ""}" password="{kafka.sasl_password.get_secret_value()}";'
        )
    opts.update(kafka.options)
    return opts


def _kafka_columns(df: DataFrame) -> DataFrame:
    return df.select(
        "value",
        F.col("topic").alias("source"),
        F.col("partition").alias("source_partition"),
        F.col("offset").alias("source_offset"),
        F.col("timestamp").alias("source_timestamp"),
    )


def read_kafka_stream(spark: SparkSession, kafka) -> DataFrame:
    reader = spark.readStream.format("kafka").options(**kafka_options(kafka))
    if kafka.max_offsets_per_trigger:
        reader = reader.option("maxOffsetsPerTrigger", str(kafka.max_offsets_per_trigger))
    return _kafka_columns(reader.load())


def read_kafka_range(spark: SparkSession, kafka, starting: str, ending: str,
                     starting_timestamp: Optional[int] = None, ending_timestamp: Optional[int] = None) -> DataFrame:
    """Bounded Kafka read (backfill): offsets as Spark's JSON offset specs or earliest/latest, or
    epoch-millisecond timestamps (which take precedence)."""
    opts = kafka_options(kafka) | {"startingOffsets": starting, "endingOffsets": ending}
    if starting_timestamp is not None:
        opts["startingTimestamp"] = str(starting_timestamp)
    if ending_timestamp is not None:
        opts["endingTimestamp"] = str(ending_timestamp)
    return _kafka_columns(spark.read.format("kafka").options(**opts).load())


def _delta_columns(df: DataFrame, path: str) -> DataFrame:
    """Each row becomes a JSON event; the table path is its coordinate."""
    from scoring.transform import as_events

    return as_events(df.select(F.to_json(F.struct(*[F.col(f"`{c}`") for c in df.columns])).alias("value")), path)


def read_delta_stream(spark: SparkSession, delta) -> DataFrame:
    reader = spark.readStream.format("delta")
    if delta.max_files_per_trigger:
        reader = reader.option("maxFilesPerTrigger", str(delta.max_files_per_trigger))
    return _delta_columns(reader.load(delta.path), delta.path)


def read_delta_table(spark: SparkSession, path: str, version: Optional[int] = None,
                     timestamp: Optional[str] = None, where: Optional[str] = None) -> DataFrame:
    reader = spark.read.format("delta")
    if version is not None:
        reader = reader.option("versionAsOf", version)
    if timestamp is not None:
        reader = reader.option("timestampAsOf", timestamp)
    df = reader.load(path)
    if where:
        df = df.where(where)
    return _delta_columns(df, path)


def ensure_delta_table(spark: SparkSession, path: str, ddl: str) -> None:
    """Create an empty Delta table with ``ddl`` at ``path`` unless one is there."""
    from delta.tables import DeltaTable

    if DeltaTable.isDeltaTable(spark, path):
        return
    spark.createDataFrame([], ddl).write.format("delta").mode("append").save(path)


def append_idempotent(df: DataFrame, path: str, app_id: str, version: int) -> None:
    """Append once per (app_id, version): Delta skips a write whose txnVersion it has already seen."""
    (
        df.write.format("delta")
        .mode("append")
        .option("txnAppId", app_id)
        .option("txnVersion", version)
        .save(path)
    )
