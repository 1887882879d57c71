"""SparkSession for the jobs: Delta + Kafka connector from a local jar folder, Python workers on
this interpreter, UTC session time zone. When the command logs to a file (see
:mod:`streamscore.logs`), a JVM started here writes its output there, not on the console."""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING

from pyspark.sql import SparkSession

from streamscore.credentials import hidden_from_children
from streamscore.logs import redirect_fds_to_log

if TYPE_CHECKING:
    from streamscore.conf.settings import Settings

log = logging.getLogger(__name__)


def spark_conf(settings: Settings) -> dict[str, str]:
    sp = settings.spark
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
        "spark.executor.extraJavaOptions": "-Dlog4j2.level=WARN",
    }
    if sp.use_local_jars:
        from streamscore.infra.jars import ensure_spark_jars

        conf["spark.jars"] = ",".join(ensure_spark_jars(settings.home))
    conf.update(catalog_conf(settings))
    conf.update(sp.conf)
    return conf


def catalog_conf(settings: Settings) -> dict[str, str]:
    """Spark's session catalog on the configured Hive metastore, when the job uses table names
    (see ``catalog`` in the settings). Nothing for ``catalog.metastore=session``: the session's own
    catalog (Unity Catalog on Databricks) serves the names."""
    cat = settings.catalog
    if not settings.uses_catalog:
        return {}
    conf = {
        "spark.sql.catalogImplementation": "hive",
        "spark.hadoop.hive.metastore.uris": cat.metastore,
        # a metastore that stops answering fails the call after this, not after Hive's 600 s
        "spark.hadoop.hive.metastore.client.socket.timeout": "120s",
        "spark.hadoop.hive.metastore.connect.retries": "3",
    }
    if cat.local:  # new schemas' folders where the local metastore keeps its managed tables
        from streamscore.infra.services import warehouse_dir

        conf["spark.sql.warehouse.dir"] = str(warehouse_dir(settings.home))
    return conf


def build_spark(settings: Settings) -> SparkSession:
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    sp = settings.spark
    builder = SparkSession.builder.appName(sp.app_name)
    if sp.master:
        builder = builder.master(sp.master)
    for k, v in spark_conf(settings).items():
        builder = builder.config(k, v)
    with redirect_fds_to_log(), hidden_from_children():
        spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark
