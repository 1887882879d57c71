"""Spark's Python daemon, with the scoring imports done once before it forks its workers.

Spark starts one daemon per executor (``spark.python.daemon.module``) and forks every Python
worker from it. With the stock daemon each worker imports MLflow on its first task (about 3 s of
CPU here, with the tracking plugins' entry points), so a job on two cores pays it twice before its
first batch, and again whenever a worker is replaced. Imported here, the forked workers find the
modules loaded: the import is paid once per executor, by the daemon.

Before that the daemon trims the archives Spark put on its ``PYTHONPATH`` (see
:func:`prefer_installed_copies`): what the workers would otherwise pay on every task.

Used where streamscore launches the driver JVM itself (``spark.master`` set: local mode,
``local-cluster``, a standalone master, whose executors run this package too; see
:func:`streamscore.spark.spark_conf`); a Databricks cluster keeps its own daemon. An import that fails here is left to
the worker, which raises it where the task can report it.
"""

from __future__ import annotations

import gc
import importlib
import importlib.machinery
import os
import sys
import zipfile

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


def prefer_installed_copies(path: list[str]) -> list[str]:
    """``path`` without the archives whose Python is installed anyway.

    Spark puts three archives first on its Python workers' path: ``pyspark.zip`` and the py4j zip
    of its home, and the ``spark-core`` jar (a Spark 1 assembly carried Python in it; Spark 4's
    holds none). Measured here, with pyspark installed from PyPI (the same files, unzipped):

    * every task starts with ``importlib.invalidate_caches()``, which makes each zip importer on
      the path read its archive's directory again: the ``spark-core`` jar's 5,359 entries cost
      0.11-0.12 s of CPU per task and worker; on a small batch, a seventh of its time;
    * modules imported from a zip are compiled from source by every process that imports them (no
      bytecode is written into an archive): importing pyspark's worker modules from the zip took
      0.58 s, from the installed package 0.14 s.

    The jar is dropped when it holds no Python; a zip when each package in it is importable from
    the rest of the path with the same ``version.py`` (the same release). Anything else stays as
    Spark set it (a cluster whose Spark home differs from the installed pyspark keeps its zip)."""
    rest = [p for p in path if not _is_archive(p)]
    return [p for p in path if not _is_archive(p) or not _redundant(p, rest)]


def _is_archive(entry: str) -> bool:
    return entry.endswith((".zip", ".jar")) and os.path.isfile(entry)


def _redundant(archive: str, rest: list[str]) -> bool:
    try:
        with zipfile.ZipFile(archive) as z:
            names = z.namelist()
            if archive.endswith(".jar"):
                return not any(n.endswith(".py") for n in names)
            packages = {n.split("/", 1)[0] for n in names if "/" in n}
            for package in packages:
                spec = importlib.machinery.PathFinder.find_spec(package, rest)
                if spec is None or not spec.submodule_search_locations:
                    return False
                installed = os.path.join(next(iter(spec.submodule_search_locations)), "version.py")
                if not os.path.isfile(installed):
                    return False
                with open(installed, "rb") as f:
                    if f.read() != z.read(f"{package}/version.py"):
                        return False
            return bool(packages)
    except (OSError, KeyError, zipfile.BadZipFile):
        return False


if __name__ == "__main__":
    trimmed = prefer_installed_copies(sys.path)
    for dropped in set(sys.path) - set(trimmed):
        sys.path_importer_cache.pop(dropped, None)
    sys.path[:] = trimmed
    preload()
    # Spark's daemon runs gc.collect() in a reused worker after every task: a full collection,
    # which walks every object the imports above made (about 258,000 here, 0.13 s). Frozen, they
    # are left out of every collection in the daemon and the workers it forks (gc.freeze is meant
    # for a process that forks: the collector no longer writes to the pages the children share)
    gc.freeze()
    from pyspark.daemon import manager

    manager()
