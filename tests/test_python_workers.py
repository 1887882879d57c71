"""One Python daemon per Spark session: every kind of Python job the project runs (the early start
of the workers, a frame from a local list, the scoring pandas UDF, an empty Delta table created)
forks its workers from the same daemon, which has imported MLflow once (scoring/daemon.py).

Spark keys a daemon by its workers' environment; a job whose environment differs (the RDD API's
lacks ``SPARK_SIMPLIFIED_TRACEBACK``) gets a daemon of its own that imports everything again: about
2 s of a job's start-up here (see README "Performance")."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from pyspark.sql.functions import pandas_udf

from streamscore.scoring import io as sio
from streamscore.scoring.schema import DEAD_LETTER
from streamscore.scoring.tables import TableRef

pytestmark = pytest.mark.integration


def _daemons(jvm_pid: int) -> list[int]:
    """The Python daemons the JVM ``jvm_pid`` started (its children running the daemon module)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == jvm_pid and "streamscore.scoring.daemon" in cmdline:
            found.append(int(entry.name))
    return found


def test_every_kind_of_python_job_forks_from_one_daemon(spark, tmp_path):
    @pandas_udf("long")  # type: ignore[call-overload]
    def plus_one(s: pd.Series) -> pd.Series:
        return s + 1

    jvm_pid = int(spark.sparkContext._jvm.java.lang.ProcessHandle.current().pid())
    assert spark.sparkContext.parallelize(range(4), 2).map(lambda x: x * 2).collect() == [0, 2, 4, 6]
    assert [r.v for r in spark.createDataFrame([("a",), ("b",)], "v string").collect()] == ["a", "b"]
    assert sorted(r.x for r in spark.range(3).repartition(2).select(plus_one("id").alias("x")).collect()) == [1, 2, 3]

    empty = sio.empty_frame(spark, DEAD_LETTER)
    assert empty.rdd.getNumPartitions() == 0 and empty.schema == DEAD_LETTER  # no task, exactly the schema
    table = TableRef.at(str(tmp_path / "dead"))
    sio.ensure_delta_table(spark, table, DEAD_LETTER, "the test")
    assert sio.read_table(spark, table).schema == DEAD_LETTER

    daemons = _daemons(jvm_pid)
    assert len(daemons) == 1, f"{len(daemons)} Python daemons under the session's JVM: {_differences(daemons)}"


def _differences(pids: list[int]) -> list[str]:
    """The names (not the values: one is a secret) of the variables the daemons' environments differ in."""
    envs = []
    for p in pids:
        try:
            raw = Path(f"/proc/{p}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        envs.append(dict(kv.decode(errors="replace").partition("=")[::2] for kv in raw if kv))
    names = set().union(*envs) if envs else set()
    return sorted(n for n in names if len({e.get(n) for e in envs}) > 1)
