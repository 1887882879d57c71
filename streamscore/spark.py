"""SparkSession for the jobs: Delta + Kafka connector from a local jar folder, Python workers on
this interpreter, UTC session time zone."""

from __future__ import annotations

import logging
import os
import sys

from pyspark.sql import SparkSession

log = logging.getLogger(__name__)


def build_spark(settings) -> SparkSession:
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    sp = settings.spark
    builder = SparkSession.builder.appName(sp.app_name)
    if sp.master:
        builder = builder.master(sp.master)
    conf = {
        "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
        "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
        "spark.sql.shuffle.partitions": str(sp.shuffle_partitions),
        "spark.sql.session.timeZone": "UTC",
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.streaming.stopGracefullyOnShutdown": "true",
        "spark.databricks.delta.snapshotPartitions": "2",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.driver.extraJavaOptions": "-Dlog4j2.level=WARN",
    }
    if sp.use_local_jars:
        from infra.jars import ensure_spark_jars

        conf["spark.jars"] = ",".join(ensure_spark_jars(settings.home))
    conf.update(sp.conf)
    for k, v in conf.items():
        builder = builder.config(k, v)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark
