"""Hadoop's local file system without a process per file operation (local mode).

Without Hadoop's native library (which no PyPI or Maven Central artifact ships), Hadoop's local
file system starts a ``chmod`` process for every file and folder it creates and two ``readlink``
processes for every rename. A streaming query that commits to Delta renames and creates files in
its checkpoint and in each table's log on every micro-batch: about 50 processes per batch here,
measured with the JVM's own process events (15 batches of a rate source into Delta: 769
processes; 16 with the classes below, all from Spark itself). Each one costs a few milliseconds
of a batch's wall time and of CPU.

``infra/java/streamscore/hadoop`` holds two small subclasses of Hadoop's own local file systems
(the ``FileSystem`` one and the ``FileContext`` one, through which Spark's checkpoint and Delta's
log write) that set permissions and read a path's status in Java instead. They are compiled once
(``javac`` of the JDK that runs Spark) into the jar folder, and a JVM that streamscore launches in
local mode gets them on its class path. Without ``javac`` nothing changes: Hadoop's classes
serve, as before.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from streamscore.infra.jars import jars_root, jdk_tool

log = logging.getLogger(__name__)

SOURCES = Path(__file__).resolve().parent / "java"
FILE_SYSTEM = "streamscore.hadoop.LocalFileSystemNio"
ABSTRACT_FILE_SYSTEM = "streamscore.hadoop.LocalFsNio"


def _hadoop_api() -> Path | None:
    import pyspark

    found = sorted((Path(pyspark.__file__).parent / "jars").glob("hadoop-client-api-*.jar"))
    return found[-1] if found else None


def _jar_for(api: Path, sources: list[Path]) -> Path:
    """Where the jar of ``sources`` compiled against Hadoop's ``api`` jar goes."""
    digest = hashlib.sha256(api.name.encode())
    for src in sources:
        digest.update(src.relative_to(SOURCES).as_posix().encode() + b"\0" + src.read_bytes())
    return jars_root() / "streamscore" / f"streamscore-hadoop-{digest.hexdigest()[:16]}.jar"


def ensure_jar() -> Path | None:
    """The compiled jar (built now if missing), or None when it cannot be built here."""
    api, sources = _hadoop_api(), sorted(SOURCES.rglob("*.java"))
    if api is None or not sources:
        log.debug("no Hadoop jar in pyspark (or no sources): Hadoop's own local file system serves")
        return None
    target = _jar_for(api, sources)
    if target.is_file():
        return target
    javac = jdk_tool("javac")
    if javac is None:
        log.debug("no javac: Hadoop's own local file system serves")
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="streamscore-hadoop-", dir=target.parent) as tmp:
        classes = Path(tmp) / "classes"
        cmd = [str(javac), "-nowarn", "--release", "17", "-cp", str(api), "-d", str(classes), *map(str, sources)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            log.warning(
                "could not compile the local file system classes (Hadoop's own serve):\n%s", proc.stderr[-2000:]
            )
            return None
        partial = Path(tmp) / target.name
        shutil.make_archive(str(partial.with_suffix("")), "zip", classes)
        os.replace(partial.with_suffix(".zip"), target)  # complete or absent: concurrent builders agree
    for old in target.parent.glob("streamscore-hadoop-*.jar"):
        if old != target:
            old.unlink(missing_ok=True)
    return target


def spark_conf(master: str) -> dict[str, str]:
    """The driver options for a JVM streamscore launches with ``master``: only plain local mode
    (driver and executor one JVM); ``local-cluster`` and real clusters keep Hadoop's classes."""
    if not (master == "local" or master.startswith("local[")):
        return {}
    jar = ensure_jar()
    if jar is None:
        return {}
    return {
        "spark.driver.extraClassPath": str(jar),
        "spark.hadoop.fs.file.impl": FILE_SYSTEM,
        "spark.hadoop.fs.AbstractFileSystem.file.impl": ABSTRACT_FILE_SYSTEM,
    }
