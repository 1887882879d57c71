"""The Spark driver's class archive (streamscore/infra/cds.py): which JVM options a start gets, and
that the tests' own session JVM maps the archive ``make test`` has written."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from streamscore.conf.settings import load_settings
from streamscore.infra import cds
from streamscore.spark import class_path_jars, spark_conf


@pytest.fixture
def archive_home(tmp_path, monkeypatch):
    """An empty jar cache of the test's own (the archive folder sits beside it)."""
    monkeypatch.setenv("STREAMSCORE_JARS_DIR", str(tmp_path / "jars"))
    monkeypatch.delenv("STREAMSCORE_DRIVER_JAVA_OPTIONS", raising=False)
    return tmp_path


def _jar(tmp_path, name: str, size: int) -> str:
    path = tmp_path / name
    path.write_bytes(b"x" * size)
    return str(path)


def test_the_archive_is_keyed_by_the_jvm_and_the_jar_set(archive_home):
    jars = [_jar(archive_home, "a.jar", 10), _jar(archive_home, "b.jar", 20)]
    key = cds.archive_key(jars)
    assert key is not None and key == cds.archive_key(list(jars))
    assert cds.archive_key(jars[:1]) != key  # a jar less
    _jar(archive_home, "b.jar", 21)
    assert cds.archive_key(jars) != key  # a jar replaced by another build
    key = cds.archive_key(jars)
    os.utime(jars[1], ns=(1, 10**18))
    assert cds.archive_key(jars) != key  # the same jar written again (a reinstall): the JVM would reject the archive


def test_a_start_maps_the_archive_only_when_there_is_one_and_the_options_leave_sharing_alone(archive_home):
    jars = [_jar(archive_home, "a.jar", 10)]
    assert cds.java_options(jars, "-Dx=1") == "-Dx=1"  # none written yet: as before
    path = cds.archive_path(cds.archive_key(jars))
    path.parent.mkdir(parents=True)
    path.write_bytes(b"archive")
    assert cds.java_options(jars, "-Dx=1") == f"-Dx=1 -XX:SharedArchiveFile={path}"
    for own in ("-Xshare:off", "-XX:SharedArchiveFile=/elsewhere.jsa", "-XX:ArchiveClassesAtExit=/new.jsa"):
        assert cds.java_options(jars, own) == own  # the user's choice stands
    assert cds.java_options(jars + [_jar(archive_home, "c.jar", 5)], "") == ""  # another jar set


def test_the_settings_and_the_infrastructure_variable_decide_the_driver_options(archive_home, monkeypatch):
    def options(**spark) -> str:
        settings = load_settings("local", overrides={"spark": {"use_local_jars": False, **spark}})
        return spark_conf(settings)["spark.driver.extraJavaOptions"]

    # keyed by the driver's class path: no spark.jars here, the local file system classes' jar
    launched = spark_conf(load_settings("local", overrides={"spark": {"use_local_jars": False}}))
    path = cds.archive_path(cds.archive_key(class_path_jars(launched)))
    path.parent.mkdir(parents=True)
    path.write_bytes(b"archive")
    assert options(driver_jit="tiered") == f"-Dlog4j2.level=WARN -XX:SharedArchiveFile={path}"
    assert options() == f"-Dlog4j2.level=WARN -XX:TieredStopAtLevel=1 -XX:SharedArchiveFile={path}"
    assert options(class_archive=False, driver_jit="tiered") == "-Dlog4j2.level=WARN"
    assert options(master=None) == "-Dlog4j2.level=WARN"  # no JVM started here (Databricks)
    own = {"spark.driver.extraJavaOptions": "-XX:TieredStopAtLevel=4"}
    assert options(class_archive=False, conf=own) == "-XX:TieredStopAtLevel=4"  # the user's own level stands
    monkeypatch.setenv("STREAMSCORE_DRIVER_JAVA_OPTIONS", "-Dextra=1")
    assert options(class_archive=False) == "-Dlog4j2.level=WARN -XX:TieredStopAtLevel=1 -Dextra=1"


@pytest.mark.integration
def test_the_tests_session_jvm_maps_the_archive_make_test_wrote(spark):
    """``make test`` waits for the archive (``services jars --wait``); the session's driver JVM was
    started with it and mapped it (a JVM that rejects a top archive maps only the JDK's own, about
    12 MB, and says nothing on the console: its ``VM.info`` tells)."""
    options = spark.sparkContext.getConf().get("spark.driver.extraJavaOptions") or ""
    assert "-XX:SharedArchiveFile=" in options, (
        f"no class archive for this JVM and jar set ({options!r}): `streamscore services jars --wait` writes it"
    )
    archive = Path(options.split("-XX:SharedArchiveFile=")[1].split()[0])
    jvm = spark.sparkContext._jvm
    assert jvm is not None
    pid = jvm.java.lang.ProcessHandle.current().pid()
    info = subprocess.run(["jcmd", str(pid), "VM.info"], capture_output=True, text=True, timeout=60).stdout
    mapped = re.search(r"CDS archive\(s\) mapped at: .*?size (\d+)", info)
    assert mapped is not None, info[:2000]
    jdk_own = Path(jvm.java.lang.System.getProperty("java.home")) / "lib" / "server" / "classes.jsa"
    base = jdk_own.stat().st_size if jdk_own.exists() else 0
    assert int(mapped.group(1)) > base + archive.stat().st_size / 2, (mapped.group(0), archive.stat().st_size)
