"""Spark's Python daemon, with the scoring imports done once before it forks its workers.

Spark starts one daemon per executor (``spark.python.daemon.module``) and forks every Python
worker from it. With the stock daemon each worker imports MLflow on its first task (about 3 s of
CPU here, with the tracking plugins' entry points), so a job on two cores pays it twice before its
first batch, and again whenever a worker is replaced. Imported here, the forked workers find the
modules loaded: the import is paid once per executor, by the daemon.

Used where streamscore launches the driver JVM itself (``spark.master`` set: local mode,
``local-cluster``, a standalone master, whose executors run this package too; see
:func:`streamscore.spark.spark_conf`); a Databricks cluster keeps its own daemon. An import that fails here is left to
the worker, which raises it where the task can report it.
"""

from __future__ import annotations

import importlib
import os

PRELOAD = ("pandas", "pyarrow", "mlflow.pyfunc", "streamscore.scoring.udf")
# extra modules for the daemon to import, comma-separated (e.g. a flavor's library: sklearn)
PRELOAD_VARIABLE = "STREAMSCORE_WORKER_PRELOAD"


def preload() -> None:
    extra = [m.strip() for m in os.environ.get(PRELOAD_VARIABLE, "").split(",") if m.strip()]
    for name in (*PRELOAD, *extra):
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the worker imports it again and reports the error
            pass


if __name__ == "__main__":
    preload()
    from pyspark.daemon import manager

    manager()
