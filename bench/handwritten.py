"""The job a Databricks user writes by hand, as the benchmark's reference for streamscore's stream.

Kafka -> ``from_json`` with the schema of the model's signature -> ``mlflow.pyfunc.spark_udf``
(``env_manager="local"``) -> the Delta streaming sink, ``availableNow``. It does none of what
streamscore adds: no per-row validation or dead letters (a malformed event becomes a row of nulls
and its prediction whatever the model makes of them), no lineage, no model swap, no exactly-once
beyond the Delta sink's own. Written fairly: the same Spark session settings that matter for speed
as streamscore's jobs (the local jar folder, Delta and its snapshot partitions, Arrow, the shuffle
partitions, the same events per micro-batch), the model loaded once per task as ``spark_udf`` does.

Run by ``bench/benchmark.py`` in its own process; its last stdout line is a JSON summary::

    python bench/handwritten.py --bootstrap HOST:PORT --topic T --model-uri models:/m/1 --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--model-uri", required=True)
    p.add_argument("--tracking-uri", default=None, help="the MLflow server the model is registered on")
    p.add_argument("--out", required=True, help="folder for the Delta table and the checkpoint")
    p.add_argument("--max-offsets", type=int, default=200_000, help="events per micro-batch at most")
    p.add_argument("--jars", default="", help="comma-separated jars (Kafka connector, Delta)")
    p.add_argument("--shuffle-partitions", type=int, default=2)
    p.add_argument(
        "--snapshot-partitions",
        type=int,
        default=2,
        help="spark.databricks.delta.snapshotPartitions (streamscore's 2; Delta's own default is 50)",
    )
    a = p.parse_args(argv)
    started = time.time()

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    import mlflow

    if a.tracking_uri:
        mlflow.set_tracking_uri(a.tracking_uri)
        os.environ["MLFLOW_TRACKING_URI"] = a.tracking_uri  # spark_udf's workers resolve the model too
    from pyspark.sql import SparkSession
    from pyspark.sql import functions as F
    from pyspark.sql.types import DoubleType, FloatType, IntegerType, LongType, StringType, StructField, StructType

    builder = (
        SparkSession.builder.master("local[*]")
        .appName("handwritten-spark-udf")
        .config("spark.sql.extensions", "io.delta.sql.DeltaSparkSessionExtension")
        .config("spark.sql.catalog.spark_catalog", "org.apache.spark.sql.delta.catalog.DeltaCatalog")
        .config("spark.sql.shuffle.partitions", str(a.shuffle_partitions))
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        # Delta's log state in a few partitions, not its default 50 (the setting streamscore uses)
        .config("spark.databricks.delta.snapshotPartitions", str(a.snapshot_partitions))
    )
    if a.jars:
        builder = builder.config("spark.jars", a.jars)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")

    # the event's schema written from the model's signature, as a user reading it would
    signature = mlflow.models.get_model_info(a.model_uri).signature
    types = {"double": DoubleType(), "float": FloatType(), "long": LongType(), "integer": IntegerType()}
    features = [(c.name, types[c.type.name]) for c in signature.inputs.inputs]
    schema = StructType(
        [StructField("event_id", StringType()), StructField("event_time", StringType())]
        + [StructField(n, t) for n, t in features]
    )
    predict = mlflow.pyfunc.spark_udf(spark, a.model_uri, env_manager="local", result_type="string")

    events = (
        spark.readStream.format("kafka")
        .option("kafka.bootstrap.servers", a.bootstrap)
        .option("subscribe", a.topic)
        .option("startingOffsets", "earliest")
        .option("maxOffsetsPerTrigger", str(a.max_offsets))
        .load()
        .select(F.from_json(F.col("value").cast("string"), schema).alias("e"), "timestamp")
        .select("e.*", "timestamp")
    )
    scored = events.withColumn("prediction", predict(F.struct(*[F.col(n) for n, _ in features])))
    query = (
        scored.writeStream.format("delta")
        .option("checkpointLocation", os.path.join(a.out, "checkpoint"))
        .trigger(availableNow=True)
        .start(os.path.join(a.out, "scored"))
    )
    query.awaitTermination()
    rows = spark.read.format("delta").load(os.path.join(a.out, "scored")).count()
    batches = len([p for p in query.recentProgress if p.get("numInputRows")])
    spark.stop()
    summary = {"job": "handwritten", "status": "FINISHED", "rows": rows, "batches": batches}
    print(json.dumps(summary | {"duration_s": round(time.time() - started, 3)}))


if __name__ == "__main__":
    main()
