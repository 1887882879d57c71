"""What a session that streamscore launches in local mode gets: Hadoop's local file systems
without a process per file operation (infra/localfs.py), written through with the permissions
Hadoop's own classes give, and Python workers forked from a daemon that has imported MLflow
(scoring/daemon.py)."""

from __future__ import annotations

import os
import stat

import pytest

from streamscore.infra import localfs

pytestmark = pytest.mark.integration


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_local_session_writes_through_the_java_local_file_systems(spark, tmp_path):
    jvm = spark.sparkContext._jvm
    conf = spark.sparkContext._jsc.hadoopConfiguration()
    Path = jvm.org.apache.hadoop.fs.Path
    root = Path(f"file://{tmp_path}")
    fs = root.getFileSystem(conf)
    fc = jvm.org.apache.hadoop.fs.FileContext.getFileContext(root.toUri(), conf)
    assert fs.getClass().getName() == localfs.FILE_SYSTEM
    assert fc.getDefaultFileSystem().getClass().getName() == localfs.ABSTRACT_FILE_SYSTEM

    # what the stream writes: a Delta table (files, a log) and a checkpoint (FileContext renames)
    spark.range(10).write.format("delta").save(str(tmp_path / "t"))
    query = (
        spark.readStream.format("rate")
        .option("rowsPerSecond", 10)
        .load()
        .writeStream.format("delta")
        .option("checkpointLocation", str(tmp_path / "cp"))
        .trigger(availableNow=True)
        .start(str(tmp_path / "s"))
    )
    query.awaitTermination(120)
    assert spark.read.format("delta").load(str(tmp_path / "t")).count() == 10
    umask = int(conf.get("fs.permissions.umask-mode", "022"), 8)
    files = [p for p in (tmp_path / "t").glob("*.parquet")] + list((tmp_path / "cp" / "offsets").glob("[0-9]*"))
    assert files and {_mode(p) for p in files} == {0o666 & ~umask}
    assert {_mode(p) for p in (tmp_path / "t" / "_delta_log", tmp_path / "cp" / "offsets")} == {0o777 & ~umask}

    # an explicit permission, a status, a missing path: as Hadoop's own classes answer
    target = tmp_path / "plain"
    target.write_text("x")
    perm = jvm.org.apache.hadoop.fs.permission.FsPermission
    fs.setPermission(Path(f"file://{target}"), perm(0o640))
    assert _mode(target) == 0o640
    fs.setPermission(Path(f"file://{target}"), perm(0o1750))  # the sticky bit: Hadoop's chmod path
    assert os.stat(target).st_mode & 0o7777 == 0o1750
    status = fs.getFileLinkStatus(Path(f"file://{target}"))
    assert not status.isSymlink() and status.getLen() == 1 and not status.isDirectory()
    with pytest.raises(Exception, match="FileNotFoundException"):
        fs.getFileLinkStatus(Path(f"file://{tmp_path / 'missing'}"))
    # a rename through FileContext (the checkpoint's and Delta log's way) refuses to overwrite
    none = spark.sparkContext._gateway.new_array(jvm.org.apache.hadoop.fs.Options.Rename, 0)
    other = tmp_path / "other"
    other.write_text("yy")
    with pytest.raises(Exception, match="FileAlreadyExistsException|already exists"):
        fc.rename(Path(f"file://{other}"), Path(f"file://{target}"), none)
    fc.rename(Path(f"file://{other}"), Path(f"file://{tmp_path / 'moved'}"), none)
    assert (tmp_path / "moved").read_text() == "yy" and not other.exists()


def test_python_workers_are_forked_from_the_daemon_that_preloads_mlflow(spark):
    """scoring/daemon.py: a local session's workers come from the streamscore daemon, which has
    imported MLflow before forking (a worker finds it loaded on its first task)."""

    def where(_):
        import sys

        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            parent = f.read().replace(b"\0", b" ").decode()
        yield parent, "mlflow.pyfunc" in sys.modules

    parent, loaded = spark.sparkContext.parallelize([0], 1).mapPartitions(where).collect()[0]
    assert "-m streamscore.scoring.daemon" in parent and loaded, parent


def test_python_workers_import_the_installed_pyspark_not_sparks_archives(spark):
    """scoring/daemon.py trims the archives Spark puts first on the workers' path: pyspark and py4j
    come from the installed packages (compiled once, not from a zip's source in every process) and
    no archive is left for ``importlib.invalidate_caches`` (run before every task) to read again."""

    def where(_):
        import sys

        import py4j
        import pyspark

        yield (
            pyspark.__file__,
            py4j.__file__,
            [p for p in sys.path if p.endswith((".zip", ".jar")) and os.path.isfile(p)],
        )

    pyspark_file, py4j_file, archives = spark.sparkContext.parallelize([0], 1).mapPartitions(where).collect()[0]
    import py4j
    import pyspark

    assert (pyspark_file, py4j_file) == (pyspark.__file__, py4j.__file__)
    assert archives == [], archives
