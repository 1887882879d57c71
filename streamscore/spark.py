"""SparkSession for the jobs: Delta + Kafka connector from a local jar folder, Python workers on
this interpreter, UTC session time zone. When the command logs to a file (see
:mod:`streamscore.logs`), a JVM started here writes its output there, not on the console."""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import TYPE_CHECKING

from pyspark.sql import SparkSession

from streamscore.credentials import hidden_from_children
from streamscore.logs import redirect_fds_to_log

if TYPE_CHECKING:
    from streamscore.conf.settings import Settings

log = logging.getLogger(__name__)

# options added to those of a driver JVM started here (infrastructure, not a setting)
DRIVER_JAVA_OPTIONS = "STREAMSCORE_DRIVER_JAVA_OPTIONS"
# spark.driver_jit=c1: the JIT's first tier only. Measured here (2 cores, a stream job from launch
# to its first batch, and 200k events at saturation): about a third less CPU at start-up, and the
# same or a higher rate, since the scoring runs in Python and C2's compiler threads competed with it
C1_ONLY = "-XX:TieredStopAtLevel=1"


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
    launched: dict[str, str] = {}  # for a driver JVM this process launches
    if sp.master:
        from streamscore.infra import localfs

        # Python workers forked from a daemon that has imported MLflow once (scoring/daemon.py)
        launched["spark.python.daemon.module"] = "streamscore.scoring.daemon"
        launched.update(localfs.spark_conf(sp.master))  # no process per file operation (infra/localfs.py)
    conf.update(launched)
    conf.update(sp.conf)
    cp = "spark.driver.extraClassPath"
    if cp in launched and conf[cp] != launched[cp]:  # the settings' class path, and the classes named above
        conf[cp] = f"{conf[cp]}{os.pathsep}{launched[cp]}"
    key = "spark.driver.extraJavaOptions"
    if sp.master and sp.driver_jit == "c1" and "TieredStopAtLevel" not in conf.get(key, ""):
        conf[key] = f"{conf.get(key, '')} {C1_ONLY}".strip()
    if sp.master and os.environ.get(DRIVER_JAVA_OPTIONS):  # a driver JVM this process launches
        conf[key] = f"{conf.get(key, '')} {os.environ[DRIVER_JAVA_OPTIONS]}".strip()
    if sp.class_archive and sp.master:
        from streamscore.infra import cds

        conf[key] = cds.java_options(class_path_jars(conf), conf.get(key, ""))
    return conf


def class_path_jars(conf: dict[str, str]) -> list[str]:
    """The jars a driver JVM launched with ``conf`` has on its class path besides pyspark's own
    (what its class archive is keyed by)."""
    jars = [j for j in conf.get("spark.jars", "").split(",") if j]
    return jars + [j for j in conf.get("spark.driver.extraClassPath", "").split(os.pathsep) if j]


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


def build_spark(settings: Settings, driver_java_options: str | None = None) -> SparkSession:
    """``driver_java_options`` replaces the driver JVM's options (the class archive's writer)."""
    return SparkStart(settings, driver_java_options).session()


class SparkStart:
    """A SparkSession on its way: construction launches the driver JVM (here, at once: its output
    goes to the log file and it inherits no credential variable, both of which concern this whole
    process for that moment), then the JVM-side start (the SparkContext: about 2 s here) runs in a
    thread, so the caller can do work of its own meanwhile (the stream downloads and loads its
    model). :meth:`session` waits for it. A process whose JVM already runs (a second session after
    a stop, the tests' session) gets its session at once, in the caller's thread."""

    def __init__(self, settings: Settings, driver_java_options: str | None = None):
        from pyspark import SparkConf, SparkContext
        from pyspark.java_gateway import launch_gateway

        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
        sp = settings.spark
        builder = SparkSession.builder.appName(sp.app_name)
        if sp.master:
            builder = builder.master(sp.master)
        conf = spark_conf(settings)
        if driver_java_options is not None:
            conf["spark.driver.extraJavaOptions"] = driver_java_options
        for k, v in conf.items():
            builder = builder.config(k, v)
        self._builder = builder
        self._session: SparkSession | None = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if SparkContext._gateway is not None:
            self._session = self._create()
            return
        self._launch_conf = SparkConf(loadDefaults=False)
        for k, v in builder._options.items():  # what SparkContext would launch the JVM with
            self._launch_conf.set(k, v)
        with redirect_fds_to_log(), hidden_from_children():
            SparkContext._ensure_initialized(gateway=launch_gateway(self._launch_conf))
        self._thread = threading.Thread(target=self._run, name="streamscore-spark-start", daemon=True)
        self._thread.start()

    def _create(self) -> SparkSession:
        spark = self._builder.getOrCreate()
        spark.sparkContext.setLogLevel("WARN")
        return spark

    def _run(self) -> None:
        try:
            self._start_python_workers()
            self._session = self._create()
        except BaseException as e:  # noqa: BLE001 - raised in the caller's thread by session()
            self._error = e

    def _start_python_workers(self) -> None:
        """The SparkContext first, then, while the session on it is built and the caller loads its
        model, a one-task-per-core Python job: Spark starts the Python daemon (which imports
        MLflow once, scoring/daemon.py) and forks the workers the first scoring job will use.

        Spark keys a daemon by its workers' environment, and its SQL runners (the pandas UDFs) add
        ``SPARK_SIMPLIFIED_TRACEBACK=1`` where the RDD API does not: without it in the context's
        environment, this job's daemon would be a second one that no scoring job uses."""
        from pyspark import SparkContext

        conf = self._launch_conf
        if not conf.get("spark.python.daemon.module"):  # a JVM not launched here: its own set-up
            return
        sc = SparkContext.getOrCreate(conf)
        if (conf.get("spark.sql.execution.pyspark.udf.simplifiedTraceback.enabled") or "true").lower() != "false":
            sc.environment["SPARK_SIMPLIFIED_TRACEBACK"] = "1"
        n = sc.defaultParallelism

        def start() -> None:
            try:
                sc.parallelize(range(n), n).foreach(_nothing)
            except Exception as e:  # noqa: BLE001 - the scoring job starts them anyway
                log.debug("Python workers' early start: %s: %s", type(e).__name__, str(e)[:300])

        threading.Thread(target=start, name="streamscore-python-workers", daemon=True).start()

    def session(self) -> SparkSession:
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._session is not None
        return self._session


def _nothing(_: object) -> None:
    """The early start's task (see :meth:`SparkStart._start_python_workers`)."""
