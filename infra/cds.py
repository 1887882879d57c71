"""A class-data-sharing archive for the Spark driver JVM (local mode).

Starting Spark loads and verifies some 20,000 classes (Spark, Scala, Hadoop, Delta). The JVM can
instead map them from an archive written by an earlier run (JDK 13+ dynamic CDS:
``-XX:ArchiveClassesAtExit`` to write it, ``-XX:SharedArchiveFile`` to use it). Measured here,
a session start plus a first Delta write went from 10.3 s to 6.3 s wall and 18 to 11 CPU seconds.

The archive is only valid for the JVM and the class path that wrote it, so its file name is a hash
of those (the ``java`` binary, pyspark's jar folder, the ``spark.jars`` list): a changed JDK,
pyspark or jar set finds no archive, and the JVM starts as before. A JVM that still rejects an
archive (``-Xshare:auto``, its default) ignores it and starts normally: the archive can make a
start faster, never make it fail.

``streamscore services jars`` (``make setup``) has it written once, in a background process at
the lowest CPU priority: a short representative job (Delta writes, a pandas UDF, a streaming
query) in a JVM that dumps its classes at exit. Jobs started before it is there run as before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

from streamscore.infra.jars import jars_root, jdk_tool

log = logging.getLogger(__name__)

KEEP = 3  # archives kept in the folder (one per JVM + jar set in use), newest first


def _file_id(path: Path) -> list[str | int]:
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def archive_key(spark_jars: list[str]) -> str | None:
    """What the archive depends on, hashed; None when there is no ``java`` to key it by."""
    import pyspark

    java = jdk_tool("java")
    if java is None:
        return None
    pyspark_jars = Path(pyspark.__file__).parent / "jars"
    # the JVM checks each class path jar's size and modification time against the archive's record
    # (a reinstalled pyspark at the same path has new times: the archive would be rejected)
    parts = {
        "java": _file_id(java),
        "pyspark": [pyspark.__version__, str(pyspark_jars), sorted(_file_id(p) for p in pyspark_jars.glob("*.jar"))],
        "jars": [_file_id(Path(j)) for j in spark_jars if Path(j).exists()],
        "python": sys.version_info[:2],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def archive_dir() -> Path:
    return jars_root().parent / "cds"


def archive_path(key: str) -> Path:
    return archive_dir() / f"spark-driver-{key}.jsa"


def archive_for(spark_jars: list[str]) -> Path | None:
    """The archive for this JVM and jar set, when one was written."""
    key = archive_key(spark_jars)
    if key is None:
        return None
    path = archive_path(key)
    return path if path.is_file() else None


def java_options(spark_jars: list[str], options: str) -> str:
    """``options`` (the driver's extra Java options) with the archive, when there is one and the
    options do not choose class sharing themselves."""
    if "SharedArchiveFile" in options or "ArchiveClassesAtExit" in options or "-Xshare" in options:
        return options
    path = archive_for(spark_jars)
    if path is None:
        log.debug("no class archive for this JVM and jar set (streamscore services jars writes one)")
        return options
    return f"{options} -XX:SharedArchiveFile={path}".strip()


def ensure_archive(spark_jars: list[str], wait: bool = False, timeout_s: float = 600.0) -> str:
    """Write the archive unless it is there or being written; by default in a background process
    at the lowest CPU priority (it takes about 40 s of a JVM's time; jobs started meanwhile run as
    before). Returns what happened: ``present``, ``written``, ``writing`` or ``unavailable``."""
    key = archive_key(spark_jars)
    if key is None:
        log.warning("no java found: no class archive written")
        return "unavailable"
    folder = archive_dir()
    if archive_path(key).is_file():
        return "present"
    folder.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMSCORE_") or k == "STREAMSCORE_JARS_DIR"}
    env.pop("PYSPARK_SUBMIT_ARGS", None)
    log_file = folder / f"spark-driver-{key}.log"
    with open(log_file, "a") as out:  # a writer already at work keeps its lines
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamscore.infra.cds", key],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # not stopped by the caller's Ctrl-C, not waited for by it
        )
    if not wait:
        log.info("writing the Spark driver's class archive in the background (pid %d, log %s)", proc.pid, log_file)
        return "writing"
    try:
        code = proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = -1
    return "written" if code == 0 and archive_path(key).is_file() else "unavailable"


def _write(key: str) -> int:
    """The background writer: one per key at a time (a lock file), the archive renamed into place
    only once complete."""
    import fcntl

    os.nice(19)
    folder = archive_dir()
    lock = open(folder / f".spark-driver-{key}.lock", "w")  # noqa: SIM115 - held until the process exits
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        print("another process is writing this archive: waiting for it")
        fcntl.flock(lock, fcntl.LOCK_EX)
    final = archive_path(key)
    if final.is_file():
        return 0
    partial = folder / f".spark-driver-{key}-{os.getpid()}.jsa"
    t0 = time.time()
    try:
        _train(str(partial))
        if not partial.is_file() or partial.stat().st_size == 0:
            print("this JVM wrote no class archive: Spark starts without one")
            return 1
        os.replace(partial, final)
    finally:
        partial.unlink(missing_ok=True)
    _prune(folder)
    print(f"class archive written in {time.time() - t0:.1f}s: {final}")
    return 0


def _prune(folder: Path) -> None:
    archives = sorted(folder.glob("spark-driver-*.jsa"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in archives[KEEP:]:
        old.unlink(missing_ok=True)


def _train(out: str) -> None:
    """The representative run, in a JVM that writes its loaded classes to ``out`` at exit."""
    import tempfile

    from pyspark import SparkContext
    from pyspark.sql import functions as F
    from pyspark.sql.functions import pandas_udf

    from streamscore.conf.settings import load_settings
    from streamscore.spark import build_spark

    settings = load_settings("local", overrides={"spark": {"master": "local[2]"}})
    options = f"-Dlog4j2.level=WARN -XX:ArchiveClassesAtExit={out} -Xlog:cds=error"
    spark = build_spark(settings, driver_java_options=options)

    @pandas_udf("double")  # type: ignore[call-overload]
    def plus_one(v: pd.Series) -> pd.Series:
        return v + 1.0

    with tempfile.TemporaryDirectory(prefix="streamscore-cds-") as tmp:
        table = f"{tmp}/t"
        frame = spark.createDataFrame([(f"e{i}", float(i)) for i in range(100)], "event_id string, x double")
        frame.select("event_id", plus_one("x").alias("y")).write.format("delta").save(table)
        for version in (1, 2):  # idempotent appends, as the stream's sinks write
            frame.select("event_id", F.col("x").alias("y")).write.format("delta").mode("append").option(
                "txnAppId", "cds"
            ).option("txnVersion", version).save(table)
        spark.sql(f"DESCRIBE DETAIL delta.`{table}`").collect()
        spark.read.format("delta").load(table).groupBy("event_id").count().collect()

        def each(batch: Any, batch_id: int) -> None:
            scored = batch.select(plus_one(F.col("value").cast("double")).alias("y"))
            scored.write.format("delta").mode("append").save(f"{tmp}/s")

        query = (
            spark.readStream.format("rate")
            .option("rowsPerSecond", 50)
            .load()
            .writeStream.foreachBatch(each)
            .option("checkpointLocation", f"{tmp}/cp")
            .trigger(processingTime="200 milliseconds")
            .start()
        )
        deadline = time.time() + 60
        while time.time() < deadline and len(query.recentProgress) < 3:
            time.sleep(0.2)
        query.stop()
    gateway = SparkContext._gateway
    spark.stop()
    # the JVM writes the archive as it exits: close its stdin (it exits then) and wait for it
    proc = getattr(gateway, "proc", None) if gateway is not None else None
    if proc is not None:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(timeout=240)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    raise SystemExit(_write(sys.argv[1]))
