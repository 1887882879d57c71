"""``streamscore bench``: scoring throughput and memory, measured in one run (ratios, not absolutes).

1. Throughput over the same N raw JSON events (cached in Spark first), each path forced to a full
   pass with a ``count`` of non-null predictions:
   * ``streamscore``: one pandas UDF that parses (orjson), validates and predicts, model cached
     per Python worker;
   * ``spark_udf``: ``from_json`` + ``mlflow.pyfunc.spark_udf`` (the usual recipe; no validation).
2. Memory across swaps: the UDF is rebuilt for ``--swaps`` consecutive versions and run each time;
   driver and Python-worker RSS are read from /proc before and after.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from streamscore.jobs.common import ArgumentParser, Summary, add_settings_args, prepare, run_command


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or ArgumentParser(prog="streamscore bench", description=__doc__)
    add_settings_args(p)
    p.add_argument("--rows", type=int, default=300_000, help="events per throughput pass (default 300000)")
    p.add_argument("--repeat", type=int, default=2, help="passes per path; the best is reported (default 2)")
    p.add_argument("--swaps", type=int, default=50, help="consecutive model versions for the memory check")
    p.add_argument("--master", default="local[2]", help="Spark master (default local[2])")
    return p


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _python_workers_rss_mb() -> float:
    total = 0.0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"pyspark.daemon" in cmd or b"pyspark.worker" in cmd:
            total += _rss_mb(int(d.name))
    return total


def _time(fn: Callable[[], None], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _run(args: argparse.Namespace) -> Summary:
    import mlflow
    import mlflow.sklearn
    from mlflow.models import infer_signature
    from pyspark.sql import functions as F
    from sklearn.linear_model import LogisticRegression

    from streamscore.demo import FEATURES, iris_frame, make_event
    from streamscore.scoring.spec import spec_from_signature
    from streamscore.scoring.transform import as_events, score
    from streamscore.scoring.udf import ModelHandle
    from streamscore.spark import build_spark

    settings = prepare(args, "bench", [f"spark.master={args.master}"])
    spark = build_spark(settings)
    X, y = iris_frame()
    model = LogisticRegression(max_iter=500).fit(X, y)
    signature = infer_signature(X, model.predict(X))
    tmp = Path(tempfile.mkdtemp(prefix="streamscore-bench-"))
    path = tmp / "model"
    mlflow.sklearn.save_model(model, str(path), signature=signature)
    spec = spec_from_signature(signature, "event_id", "event_time", "bench model")

    import datetime as dt

    now = dt.datetime.now(dt.timezone.utc)
    rows = X.to_dict(orient="records")
    payloads = [(make_event(i, "b", rows[i % 150], now).decode(),) for i in range(min(args.rows, 20_000))]
    base = spark.createDataFrame(payloads, "value string")
    reps = max(1, args.rows // len(payloads))
    events = (
        base.crossJoin(spark.range(reps).withColumnRenamed("id", "rep"))
        .select("value")
        .repartition(spark.sparkContext.defaultParallelism)
        .cache()
    )
    n = events.count()
    events = as_events(events, "bench")

    handle = ModelHandle("bench", "1", "", str(path), "bench-model")

    def ours() -> None:
        assert score(events, handle, spec, 0).where("ok").count() == n

    schema = "struct<event_id:string,event_time:string," + ",".join(f"{f}:double" for f in FEATURES) + ">"
    mlflow_udf = mlflow.pyfunc.spark_udf(spark, str(path), result_type="long", env_manager="local")

    def theirs() -> None:
        parsed = events.select(F.from_json("value", schema).alias("e")).select("e.*")
        out = parsed.select(mlflow_udf(*[F.col(f) for f in FEATURES]).alias("prediction"))
        assert out.where("prediction IS NOT NULL").count() == n

    ours()  # warm both paths once (JIT, worker start, model load)
    theirs()
    t_ours = _time(ours, args.repeat)
    t_theirs = _time(theirs, args.repeat)

    # memory across consecutive versions
    small = events.limit(2000).cache()
    small.count()
    score(small, handle, spec, 0).count()
    driver_before, workers_before = _rss_mb(os.getpid()), _python_workers_rss_mb()
    for v in range(2, args.swaps + 2):
        h = ModelHandle("bench", str(v), "", str(path), "bench-model")
        assert score(small, h, spec, v).where("ok").count() == small.count()
    driver_after, workers_after = _rss_mb(os.getpid()), _python_workers_rss_mb()
    spark.stop()
    return {
        "job": "bench",
        "status": "OK",
        "rows": n,
        "master": args.master,
        "streamscore_rows_per_s": round(n / t_ours),
        "spark_udf_rows_per_s": round(n / t_theirs),
        "speedup_vs_spark_udf": round(t_theirs / t_ours, 2),
        "note": "streamscore also validates every field and routes bad rows; spark_udf does not",
        "swaps": args.swaps,
        "driver_rss_mb": [round(driver_before), round(driver_after)],
        "python_workers_rss_mb": [round(workers_before), round(workers_after)],
    }


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("bench", build_parser, _run, argv)
