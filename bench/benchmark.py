"""End-to-end benchmark: the real jobs, on the local broker and MLflow server, measured in one run.

Every streamscore figure comes from the command a user runs (``streamscore stream`` / ``backfill``
in its own process, project defaults unless a scenario says otherwise) and is read back from what
the job left: the Delta log of its output table (commit files: when each became visible, the
rows and the model version of each added file, from the log's own statistics) and the Parquet
files themselves (read with pyarrow, not Spark). Beside them, on the same broker, backlog and
machine: a plain single-process consumer (confluent-kafka, orjson, pandas, the same registered
model's ``predict``, Parquet out), and the model's in-process ``predict`` times the cores (the
compute ceiling). The machine is shared and noisy: compare ratios within one run.

Scenarios (``--only`` picks some):

* ``throughput`` — a backlog of ``--backlog`` events: streamscore with the demo model, with an
  identity model (the pipeline's own ceiling) and with a Spark ML pipeline of the same classifier
  kind (scored natively), with the Kafka sink too, with a shadow version too (``watch.shadow_ref``),
  the plain consumer, the compute ceiling; start-up to the first committed row and its phases.
* ``latency`` — one stream with a 0.5 s trigger: batches of 3 events (the small-batch floor and
  its phases, from the run's MLflow metrics), then events at fixed rates (freshness: Kafka
  timestamp -> commit of the row, p50/p99).
* ``swap`` — ``--swaps`` alias moves to freshly registered versions during a loaded stream
  (alias set -> first row committed by the new version), against stopping the stream and
  restarting it on the same checkpoint with the new version (``--restarts`` times), and half as
  many moves in a stream with a shadow version on (``--quick``: the one stream has the shadow on);
  every added file must hold one version.
* ``backfill`` — ``streamscore backfill`` over a ``--backfill-rows`` Delta table.
* ``memory`` — driver and Python-worker RSS across ``--memory-swaps`` consecutive versions.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from streamscore.conf.settings import Settings

log = logging.getLogger("streamscore.bench")

SCENARIOS = ("throughput", "latency", "swap", "backfill", "memory")
SHADOW_ALIAS = "bench-shadow"  # the version the shadow runs score beside the served one


@dataclass
class Sizes:
    backlog: int = 500_000
    swaps: int = 20
    restarts: int = 3
    backfill_rows: int = 1_000_000
    memory_swaps: int = 50
    rates: tuple[int, ...] = (1000, 5000)
    rate_seconds: float = 20.0
    floor_batches: int = 8
    batch_events: int | None = None  # the throughput stream's max_offsets_per_trigger (None: the default)
    peers: bool = True  # the throughput's reference jobs (identity model, Spark ML) beside streamscore's own

    @classmethod
    def quick(cls) -> Sizes:
        """Tiny sizes: every scenario runs, in a few minutes (the test suite's smoke run); the
        backlog is split into a few batches so that a rate between commits exists. The reference
        jobs are left to full runs: they are the same stream job on other models, and their
        figures mean nothing at this size."""
        return cls(3000, 2, 1, 3000, 3, (200,), 4.0, 2, 1000, peers=False)


# -- what a job left: the Delta log ----------------------------------------------------------------


@dataclass
class Commit:
    version: int
    visible_at: float  # mtime of the commit file: when readers could see it
    rows: int
    files: list[dict[str, Any]] = field(default_factory=list)  # path, rows, model_version (min, max)

    @property
    def model_versions(self) -> set[str]:
        return {v for f in self.files for v in f["model_version"] if v is not None}


def delta_commits(table: str | Path) -> list[Commit]:
    """Every commit of a Delta table that added rows, from its log files (no Spark)."""
    out: list[Commit] = []
    log_dir = Path(table) / "_delta_log"
    if not log_dir.is_dir():
        return out
    for f in sorted(log_dir.glob("*.json")):
        files = []
        for line in f.read_text().splitlines():
            action = json.loads(line)
            add = action.get("add")
            if not add or not add.get("stats"):
                continue
            stats = json.loads(add["stats"])
            versions = (
                stats.get("minValues", {}).get("model_version"),
                stats.get("maxValues", {}).get("model_version"),
            )
            files.append({"path": add["path"], "rows": int(stats.get("numRecords", 0)), "model_version": versions})
        rows = sum(x["rows"] for x in files)
        if rows:
            out.append(Commit(int(f.stem), f.stat().st_mtime, rows, files))
    return out


def committed_rate(commits: list[Commit]) -> float | None:
    """Rows committed after the first data commit over the time from it to the last one."""
    if len(commits) < 2:
        return None
    span = commits[-1].visible_at - commits[0].visible_at
    return sum(c.rows for c in commits[1:]) / span if span > 0 else None


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


def _r(x: float | None, nd: int = 2) -> float | None:
    return None if x is None else round(x, nd)


# -- running the real commands -----------------------------------------------------------------------


class Job:
    """A ``streamscore`` command in its own process; its last stdout line is its JSON summary."""

    def __init__(
        self, bench: Bench, name: str, argv: list[str], overrides: list[str], command: list[str] | None = None
    ):
        """``command``: another program than ``python -m streamscore`` (then ``overrides`` are not passed)."""
        self.name = name
        self.log_path = bench.out / f"{name}.log"
        sets = bench.base_args + [a for kv in [*bench.forwarded, *overrides] for a in ("--set", kv)]
        env = {**os.environ, "STREAMSCORE_HOME": str(bench.settings.home)}
        self.started_at = time.time()
        self.proc = subprocess.Popen(
            command or [sys.executable, "-m", "streamscore", *argv, *sets],
            stdout=subprocess.PIPE,
            stderr=open(self.log_path, "w"),  # noqa: SIM115 - closed with the process
            env=env,
            text=True,
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def summary(self, timeout: float = 900) -> dict[str, Any]:
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        lines = [x for x in out.splitlines() if x.startswith("{")]
        if not lines:
            raise RuntimeError(
                f"bench job {self.name} printed no summary (exit {self.proc.returncode}): {self.log_path}"
            )
        summary = json.loads(lines[-1])
        if summary.get("status") not in ("FINISHED", "KILLED", "OK"):
            raise RuntimeError(f"bench job {self.name} ended {summary.get('status')}: {summary.get('error')}")
        return summary


def wait_for(cond: Callable[[], Any], timeout: float, what: str, job: Job | None = None) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = cond()
        if got:
            return got
        if job is not None and job.proc.poll() is not None:
            raise RuntimeError(
                f"{job.name} ended (exit {job.proc.returncode}) while waiting for {what}: {job.log_path}"
            )
        time.sleep(0.1)
    raise TimeoutError(f"bench: timed out after {timeout:g}s waiting for {what}")


class Producer(threading.Thread):
    """Sends events at a steady rate until stopped (a loaded stream)."""

    def __init__(self, bootstrap: str, topic: str, rate: float):
        super().__init__(name="bench-producer", daemon=True)
        self.bootstrap, self.topic, self.rate = bootstrap, topic, rate
        self.halt = threading.Event()
        self.sent = 0

    def run(self) -> None:
        from streamscore.demo import produce_events

        while not self.halt.is_set():
            r = produce_events(self.bootstrap, self.topic, max(1, int(self.rate)), rate=self.rate, start=self.sent)
            self.sent += r.sent


# -- the benchmark ---------------------------------------------------------------------------------------


class Bench:
    def __init__(
        self,
        settings: Settings,
        forwarded: list[str],
        sizes: Sizes,
        out: Path,
        base_args: list[str],
        only: tuple[str, ...] | list[str] = SCENARIOS,
    ):
        self.settings, self.forwarded, self.sizes, self.out, self.only = settings, forwarded, sizes, out, only
        self.base_args = base_args  # --profile / --config of the bench, passed on to its jobs
        self.tag = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:4]
        self.results: dict[str, Any] = {}
        self.kafka = settings.source.kafka.bootstrap_servers
        self.model = settings.model.name
        self.identity = f"{settings.model.name}-bench-identity"
        self.sparkml = f"{settings.model.name}-bench-sparkml"
        self._spark: SparkSession | None = None

    # helpers
    def topic(self, name: str) -> str:
        from streamscore.demo import ensure_topic

        topic = f"streamscore-bench-{self.tag}-{name}"
        ensure_topic(self.kafka, topic)
        return topic

    def shadow_overrides(self, name: str) -> list[str]:
        return [f"watch.shadow_ref=@{SHADOW_ALIAS}", f"sink.shadow_path={self.out / 'tables' / name / 'shadow'}"]

    def stream_overrides(self, name: str, topic: str, model: str | None = None) -> tuple[list[str], Path]:
        d = self.out / "tables" / name
        return [
            f"source.kafka.topic={topic}",
            f"sink.output_path={d}/scored",
            f"sink.dead_letter_path={d}/dead_letter",
            f"sink.checkpoint_path={d}/checkpoint",
            f"model.name={model or self.model}",
            "tracking.metrics_interval_s=0",  # per-batch steps: the figures are read from them
            "app.run_name=bench-" + name,
        ], d / "scored"

    def setup(self) -> None:
        from sklearn.dummy import DummyClassifier

        from streamscore.demo import train_and_register
        from streamscore.infra.services import port_open
        from streamscore.jobs.services import needed_services
        from streamscore.tracking import configure_mlflow

        for svc in needed_services(self.settings):  # the services its jobs need, started unless they answer
            if not port_open(svc.port):
                svc.start()
        configure_mlflow(self.settings)
        self.v1 = train_and_register(self.model, "v1", alias="champion")
        if "throughput" in self.only or "swap" in self.only:  # the shadow version (watch.shadow_ref)
            train_and_register(self.model, "v2", alias=SHADOW_ALIAS)
        if "throughput" in self.only and self.sizes.peers:
            train_and_register(
                self.identity, "v1", alias="champion", estimator=DummyClassifier(strategy="most_frequent")
            )
            from streamscore.demo import register_spark_pipeline

            # the same data and classifier kind as the demo model, as a Spark ML pipeline
            register_spark_pipeline(self.spark(), self.sparkml, "lr", alias="champion")

    def spark(self) -> SparkSession:
        """The bench's own session (set-up, backfill input, memory): one driver JVM for all of them."""
        if self._spark is None:
            from streamscore.spark import build_spark

            self._spark = build_spark(self.settings)
        return self._spark

    def close(self) -> None:
        if self._spark is not None:
            self._spark.stop()
            self._spark = None

    # scenarios
    def throughput(self) -> dict[str, Any]:
        from streamscore.demo import produce_events

        n = self.sizes.backlog
        topic = self.topic("backlog")
        produced = produce_events(self.kafka, topic, n, prefix="bench")
        res: dict[str, Any] = {"backlog_events": n, "produce_events_per_s": _r(produced.sent / produced.seconds, 0)}
        runs = [("streamscore", self.model)]
        if self.sizes.peers:
            runs += [("streamscore_identity_model", self.identity), ("streamscore_spark_ml", self.sparkml)]
            runs += [("streamscore_kafka_out", self.model)]  # the same job with the Kafka sink too
            runs += [("streamscore_shadow", self.model)]  # the same job with a shadow version too
        for label, model in runs:
            overrides, table = self.stream_overrides(label, topic, model)
            out_topic = self.topic("scores") if label == "streamscore_kafka_out" else None
            if out_topic is not None:
                overrides.append(f"sink.kafka.topic={out_topic}")
            if label == "streamscore_shadow":
                overrides += self.shadow_overrides(label)
            if self.sizes.batch_events:
                overrides.append(f"source.kafka.max_offsets_per_trigger={self.sizes.batch_events}")
            job = Job(self, label, ["stream", "--available-now"], overrides)
            summary = job.summary()
            commits = delta_commits(table)
            assert sum(c.rows for c in commits) == summary["rows_scored"] == n, (label, summary)
            if out_topic is not None:  # every scored row is a message (no crash here: exactly once)
                assert _messages_on(self.kafka, out_topic) == n, label
            res[label] = {
                "rows_per_s": _r(committed_rate(commits), 0),
                "batches": summary["batches"],
                "start_to_first_commit_s": _r(commits[0].visible_at - job.started_at),
                "startup_phases_s": summary.get("startup_s"),
                "first_batch_s": summary.get("first_batch_s"),
            }
        if self.sizes.peers:
            res["spark_udf_by_hand"] = self.handwritten(topic, n)
        res["plain_consumer"] = {"rows_per_s": _r(self.plain_consumer(topic, n), 0)}
        res["compute_ceiling"] = self.compute_ceiling()
        ours = res["streamscore"]["rows_per_s"] or 0
        res["ratio_vs_plain_consumer"] = _r(ours / res["plain_consumer"]["rows_per_s"])
        if self.sizes.peers:
            res["ratio_vs_identity_model"] = _r(ours / (res["streamscore_identity_model"]["rows_per_s"] or 1))
            res["ratio_vs_spark_udf_by_hand"] = _r(ours / (res["spark_udf_by_hand"]["rows_per_s"] or 1))
            res["ratio_spark_ml_vs_pyfunc"] = _r((res["streamscore_spark_ml"]["rows_per_s"] or 0) / (ours or 1))
            res["ratio_kafka_out_vs_delta_only"] = _r((res["streamscore_kafka_out"]["rows_per_s"] or 0) / (ours or 1))
            res["ratio_shadow_vs_none"] = _r((res["streamscore_shadow"]["rows_per_s"] or 0) / (ours or 1))
        return res

    def handwritten(self, topic: str, n: int) -> dict[str, Any]:
        """The job a user writes by hand (``bench/handwritten.py``: ``from_json``, ``spark_udf``, the
        Delta sink) on the same backlog, with the same events per micro-batch as streamscore's."""
        import mlflow

        from streamscore.infra.jars import ensure_spark_jars

        d = self.out / "tables" / "spark_udf_by_hand"
        command = [
            sys.executable,
            str(Path(__file__).with_name("handwritten.py")),
            "--bootstrap",
            self.kafka,
            "--topic",
            topic,
            "--model-uri",
            f"models:/{self.model}/{self.v1}",
            "--tracking-uri",
            mlflow.get_tracking_uri(),
            "--out",
            str(d),
            "--max-offsets",
            str(self.sizes.batch_events or self.settings.source.kafka.max_offsets_per_trigger),
            "--jars",
            ",".join(ensure_spark_jars(self.settings.home)),
            "--shuffle-partitions",
            str(self.settings.spark.shuffle_partitions),
        ]
        job = Job(self, "spark_udf_by_hand", [], [], command=command)
        summary = job.summary()
        commits = delta_commits(d / "scored")
        assert sum(c.rows for c in commits) == summary["rows"] == n, summary
        return {
            "rows_per_s": _r(committed_rate(commits), 0),
            "batches": summary["batches"],
            "start_to_first_commit_s": _r(commits[0].visible_at - job.started_at),
        }

    def plain_consumer(self, topic: str, n: int) -> float:
        """A fair hand-written consumer: batched consume, orjson, pandas, the registered model, Parquet."""
        import mlflow.pyfunc
        import orjson
        import pandas as pd
        import pyarrow as pa
        import pyarrow.parquet as pq
        from confluent_kafka import Consumer

        from streamscore.demo import FEATURES

        model = mlflow.pyfunc.load_model(f"models:/{self.model}/{self.v1}")
        out = self.out / "tables" / "plain_consumer"
        out.mkdir(parents=True, exist_ok=True)
        consumer = Consumer(
            {"bootstrap.servers": self.kafka, "group.id": f"bench-{uuid.uuid4().hex}", "auto.offset.reset": "earliest"}
        )
        consumer.subscribe([topic])
        got, part, t0 = 0, 0, None
        try:
            deadline = time.time() + 600
            while got < n and time.time() < deadline:
                msgs = [m for m in consumer.consume(num_messages=50_000, timeout=1.0) if m.error() is None]
                if not msgs:
                    continue
                t0 = t0 or time.perf_counter()
                frame = pd.DataFrame.from_records([orjson.loads(m.value() or b"null") for m in msgs])
                frame["prediction"] = model.predict(frame[FEATURES])
                pq.write_table(pa.Table.from_pandas(frame), out / f"part-{part:05d}.parquet")
                got, part = got + len(msgs), part + 1
        finally:
            consumer.close()
        if got < n or t0 is None:
            raise RuntimeError(f"plain consumer read {got} of {n} events")
        return got / (time.perf_counter() - t0)

    def compute_ceiling(self) -> dict[str, Any]:
        import mlflow.pyfunc

        from streamscore.demo import FEATURES, iris_frame

        model = mlflow.pyfunc.load_model(f"models:/{self.model}/{self.v1}")
        X, _ = iris_frame()
        frame = X.sample(100_000, replace=True, random_state=0)[FEATURES].reset_index(drop=True)
        best = min(_timed(lambda: model.predict(frame)) for _ in range(3))
        cores = os.cpu_count() or 1
        return {
            "predict_rows_per_s_one_core": _r(len(frame) / best, 0),
            "cores": cores,
            "rows_per_s": _r(cores * len(frame) / best, 0),
        }

    def latency(self) -> dict[str, Any]:
        from streamscore.demo import produce_events

        topic = self.topic("latency")
        overrides, table = self.stream_overrides("latency", topic)
        job = Job(self, "latency", ["stream"], [*overrides, "trigger.processing_time=500 milliseconds"])
        try:
            produce_events(self.kafka, topic, 1, prefix="warm")
            wait_for(lambda: delta_commits(table), 300, "the first commit", job)
            for i in range(self.sizes.floor_batches):  # small batches, one at a time
                before = len(delta_commits(table))
                produce_events(self.kafka, topic, 3, prefix=f"floor{i}")
                wait_for(partial(_more_commits, table, before), 60, "a small batch", job)
                time.sleep(1.0)
            windows = []
            expected = 1 + 3 * self.sizes.floor_batches
            for rate in self.sizes.rates:
                t0 = time.time()
                count = int(rate * self.sizes.rate_seconds)
                produce_events(self.kafka, topic, count, rate=rate, prefix=f"r{rate}")
                windows.append((rate, t0, time.time()))
                expected += count
                wait_for(partial(_rows_committed, table, expected), 300, f"{expected} rows committed", job)
        finally:
            job.stop()
        summary = job.summary()
        freshness = self._freshness(table, windows)
        floor = self._floor_phases(summary["run_id"])
        return {"small_batch": floor, "freshness": freshness, "trigger": "500 milliseconds"}

    def _freshness(self, table: Path, windows: list[tuple[int, float, float]]) -> dict[str, Any]:
        import pyarrow.parquet as pq

        lat: dict[int, list[float]] = {rate: [] for rate, _, _ in windows}
        for c in delta_commits(table):
            for f in c.files:
                ts = pq.read_table(table / f["path"], columns=["source_timestamp"]).column(0).to_pylist()
                for t in ts:
                    sent = (t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)).timestamp()
                    for rate, a, b in windows:
                        if a <= sent <= b:
                            lat[rate].append(c.visible_at - sent)
        return {
            f"{rate}_events_per_s": {
                "rows": len(v),
                "p50_s": _r(pct(v, 50)),
                "p99_s": _r(pct(v, 99)),
                "max_s": _r(max(v) if v else None),
            }
            for rate, v in lat.items()
        }

    def _floor_phases(self, run_id: str) -> dict[str, Any]:
        from mlflow import MlflowClient

        client = MlflowClient()
        hist = {
            k: {m.step: m.value for m in client.get_metric_history(run_id, k)}
            for k in ("rows_in", "batch_duration_s", "score_s", "write_s", "pick_model_s")
        }
        small = [s for s, rows in hist["rows_in"].items() if 0 < rows <= 10]
        small = small[1:] if len(small) > 1 else small  # the first one also loads the model in the workers
        return {"batches": len(small)} | {
            f"{k}_p50": _r(statistics.median([hist[k][s] for s in small if s in hist[k]]) if small else None, 3)
            for k in ("batch_duration_s", "score_s", "write_s", "pick_model_s")
        }

    def swap(self) -> dict[str, Any]:
        from streamscore.demo import train_and_register

        n = self.sizes.swaps
        if self.sizes.peers:  # a stream of its own with a shadow on, half as many moves
            shadowed = max(1, n // 2)
            variants = ["v2" if i % 2 == 0 else "v1" for i in range(n + self.sizes.restarts + shadowed)]
            versions = [train_and_register(self.model, v, alias=None) for v in variants]
            hot, restarts, mixed = self.hot_swaps("swap", versions[:n], versions[n : n + self.sizes.restarts])
            with_shadow, _, more = self.hot_swaps("swap_shadow", versions[n + self.sizes.restarts :], [], True)
            mixed += more
        else:  # a smoke run: the one stream runs with the shadow on (one job less)
            variants = ["v2" if i % 2 == 0 else "v1" for i in range(n + self.sizes.restarts)]
            versions = [train_and_register(self.model, v, alias=None) for v in variants]
            hot, restarts, mixed = self.hot_swaps("swap", versions[:n], versions[n:], True)
            with_shadow = hot
        return {
            "moves": n,
            "hot_swap_s": {"p50": _r(pct(hot, 50)), "p95": _r(pct(hot, 95)), "max": _r(max(hot) if hot else None)},
            "restart_s": {
                "runs": len(restarts),
                "p50": _r(pct(restarts, 50)),
                "max": _r(max(restarts) if restarts else None),
            },
            "restart_over_hot_swap_p50": _r((pct(restarts, 50) or 0) / (pct(hot, 50) or 1)),
            "hot_swap_with_shadow_s": {
                "moves": len(with_shadow),
                "p50": _r(pct(with_shadow, 50)),
                "max": _r(max(with_shadow) if with_shadow else None),
            },
            "files_mixing_versions": mixed,
            "poll_interval_s": self.settings.watch.poll_interval_s,
        }

    def hot_swaps(
        self, name: str, hot_versions: list[str], restart_versions: list[str], shadow: bool = False
    ) -> tuple[list[float], list[float], int]:
        """A loaded stream (1,000 events/s) whose alias moves to each of ``hot_versions``, then is
        stopped and restarted on each of ``restart_versions``: seconds from each move to the first
        commit of a row by the version, and the data files that mix versions."""
        from streamscore.demo import promote

        topic = self.topic(name)
        overrides, table = self.stream_overrides(name, topic)
        if shadow:
            overrides += self.shadow_overrides(name)
        producer = Producer(self.kafka, topic, 1000)
        producer.start()
        job = Job(self, name, ["stream"], overrides)
        hot: list[float] = []
        restarts: list[float] = []
        try:
            wait_for(lambda: delta_commits(table), 300, "the first commit", job)
            for v in hot_versions:  # the running stream swaps
                at = promote(self.model, v)
                seen = wait_for(partial(_first_commit_with, table, v, at), 300, f"version {v}", job)
                hot.append(seen - at)
            for i, v in enumerate(restart_versions):  # stop, then restart on the checkpoint with the version
                at = time.time()
                job.stop()
                job.summary()
                promote(self.model, v)
                job = Job(self, f"{name}-restart-{i}", ["stream"], [*overrides, f"model.ref={v}"])
                seen = wait_for(partial(_first_commit_with, table, v, at), 300, f"version {v}", job)
                restarts.append(seen - at)
        finally:
            producer.halt.set()
            job.stop()
            job.summary()
        mixed = [f["path"] for c in delta_commits(table) for f in c.files if len(set(f["model_version"])) != 1]
        if shadow:  # the shadow wrote beside the stream
            assert sum(c.rows for c in delta_commits(table.parent / "shadow")) > 0, f"{name}: no shadow rows"
        return hot, restarts, len(mixed)

    def backfill(self, spark: SparkSession) -> dict[str, Any]:
        from pyspark.sql import functions as F

        from streamscore.demo import iris_frame

        n = self.sizes.backfill_rows
        src = self.out / "tables" / "backfill_input"
        X, _ = iris_frame()
        iris = spark.createDataFrame(X.reset_index().rename(columns={"index": "k"}))
        rows = spark.range(n).select(
            F.concat(F.lit("bf-"), F.col("id").cast("string")).alias("event_id"),
            F.date_format(F.current_timestamp(), "yyyy-MM-dd'T'HH:mm:ss'Z'").alias("event_time"),
            (F.col("id") % F.lit(len(X))).alias("k"),
        )
        rows.join(F.broadcast(iris), "k").drop("k").write.format("delta").mode("overwrite").save(str(src))
        d = self.out / "tables" / "backfill"
        job = Job(
            self,
            "backfill",
            ["backfill", "--delta", str(src), "--output", f"{d}/scored", "--dead-letter", f"{d}/dead_letter"],
            [],
        )
        s = job.summary()
        assert s["rows_scored"] == n, s
        wall = time.time() - job.started_at
        startup = sum((s.get("startup_s") or {}).values())
        return {
            "rows": n,
            "rows_per_s_end_to_end": _r(n / wall, 0),
            "rows_per_s_after_startup": _r(n / max(1e-9, s["duration_s"] - startup), 0),
            "chunks": s.get("chunks"),
        }

    def memory(self, spark: SparkSession) -> dict[str, Any]:
        import mlflow.sklearn
        from mlflow.models import infer_signature
        from sklearn.linear_model import LogisticRegression

        from streamscore.demo import SKLEARN_REQUIREMENTS, iris_frame, make_event, pinned_requirements
        from streamscore.scoring.spec import spec_from_signature
        from streamscore.scoring.transform import as_events, score
        from streamscore.scoring.udf import ModelHandle

        X, y = iris_frame()
        model = LogisticRegression(max_iter=500).fit(X, y)
        signature = infer_signature(X, model.predict(X))
        path = self.out / "memory-model"
        if not path.exists():
            mlflow.sklearn.save_model(
                model, str(path), signature=signature, pip_requirements=pinned_requirements(*SKLEARN_REQUIREMENTS)
            )
        spec = spec_from_signature(signature, "event_id", "event_time", "bench model")
        now = dt.datetime.now(dt.timezone.utc)
        recs = X.to_dict(orient="records")
        events = as_events(
            spark.createDataFrame(
                [(make_event(i, "m", recs[i % 150], now).decode(),) for i in range(2000)], "value string"
            ),
            "bench",
        ).cache()
        events.count()

        def swap_to(v: int) -> None:
            h = ModelHandle("bench", str(v), "", str(path), "bench-model")
            assert score(events, h, spec, v).where("ok").count() == 2000

        warm_up = max(1, min(5, self.sizes.memory_swaps // 5))  # every worker started, the cache full
        for v in range(warm_up):
            swap_to(v)
        before = (_rss_mb(os.getpid()), _python_workers_rss_mb())
        for v in range(warm_up, warm_up + self.sizes.memory_swaps):
            swap_to(v)
        after = (_rss_mb(os.getpid()), _python_workers_rss_mb())
        return {
            "swaps": self.sizes.memory_swaps,
            "warm_up_swaps": warm_up,
            "driver_rss_mb": [round(before[0]), round(after[0])],
            "python_workers_rss_mb": [round(before[1]), round(after[1])],
            "python_workers_growth": _r((after[1] - before[1]) / before[1] if before[1] else None, 3),
        }


def _messages_on(bootstrap: str, topic: str) -> int:
    """How many messages ``topic`` holds (the sum of its partitions' high watermarks)."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-count-{time.time_ns()}"})
    try:
        parts = c.list_topics(topic, timeout=30).topics[topic].partitions
        return sum(c.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1] for p in parts)
    finally:
        c.close()


def _rows_committed(table: Path, rows: int) -> bool:
    return sum(c.rows for c in delta_commits(table)) >= rows


def _more_commits(table: Path, than: int) -> bool:
    return len(delta_commits(table)) > than


def _first_commit_with(table: Path, version: str, after: float) -> float | None:
    for c in delta_commits(table):
        if c.visible_at >= after and version in c.model_versions:
            return c.visible_at
    return None


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _python_workers_rss_mb() -> float:
    total = 0.0
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes()
            except OSError:
                continue
            if b"pyspark.daemon" in cmd or b"pyspark.worker" in cmd:
                total += _rss_mb(int(d.name))
    return total


# -- the report -------------------------------------------------------------------------------------------


def _n(x: Any, unit: str = "") -> str:
    if x is None:
        return "n/a"
    return (f"{x:,.0f}" if isinstance(x, (int, float)) and abs(x) >= 1000 else f"{x}") + unit


def markdown(results: dict[str, Any], machine: str) -> str:
    """The results as the README's table: absolute figures beside the ratios that are the targets."""
    rows: list[tuple[str, str, str]] = []
    t = results.get("throughput")
    if t:
        identity = f"; {t['ratio_vs_identity_model']}x identity model" if "streamscore_identity_model" in t else ""
        if "spark_udf_by_hand" in t:
            identity += f"; {t['ratio_vs_spark_udf_by_hand']}x spark_udf by hand"
        rows.append(
            (
                "Kafka -> Delta, streamscore (defaults, demo model)",
                _n(t["streamscore"]["rows_per_s"], " rows/s"),
                f"{t['ratio_vs_plain_consumer']}x plain consumer{identity}",
            )
        )
        if "streamscore_identity_model" in t:
            rows += [
                (
                    "Kafka -> Delta, identity model (pipeline ceiling)",
                    _n(t["streamscore_identity_model"]["rows_per_s"], " rows/s"),
                    "",
                ),
                (
                    "Kafka -> Delta, by hand: from_json + mlflow spark_udf + Delta sink (bench/handwritten.py)",
                    _n(t["spark_udf_by_hand"]["rows_per_s"], " rows/s"),
                    "no validation, dead letters, lineage or swap",
                ),
                (
                    "Kafka -> Delta, Spark ML pipeline of the same classifier (scored natively)",
                    _n(t["streamscore_spark_ml"]["rows_per_s"], " rows/s"),
                    f"{t['ratio_spark_ml_vs_pyfunc']}x the pyfunc demo model",
                ),
                (
                    "Kafka -> Delta and Kafka (sink.kafka.topic), demo model",
                    _n(t["streamscore_kafka_out"]["rows_per_s"], " rows/s"),
                    f"{t['ratio_kafka_out_vs_delta_only']}x Kafka -> Delta alone",
                ),
                (
                    "Kafka -> Delta with a shadow version (watch.shadow_ref), demo model",
                    _n(t["streamscore_shadow"]["rows_per_s"], " rows/s"),
                    f"{t['ratio_shadow_vs_none']}x without a shadow",
                ),
            ]
        rows += [
            ("plain single-process consumer", _n(t["plain_consumer"]["rows_per_s"], " rows/s"), ""),
            ("model predict x cores (compute ceiling)", _n(t["compute_ceiling"]["rows_per_s"], " rows/s"), ""),
            (
                "process start -> first row committed",
                f"{t['streamscore']['start_to_first_commit_s']} s",
                "phases: "
                + ", ".join(f"{k} {v}" for k, v in (t["streamscore"]["startup_phases_s"] or {}).items())
                + f", first batch {t['streamscore']['first_batch_s']}",
            ),
        ]
    lat = results.get("latency")
    if lat:
        fl = lat["small_batch"]
        rows.append(
            (
                "small batch (3 events), p50",
                f"{fl['batch_duration_s_p50']} s",
                f"score+write {fl['score_s_p50']} s, dead letters+sample {fl['write_s_p50']} s",
            )
        )
        for k, v in lat["freshness"].items():
            rows.append(
                (
                    f"freshness at {k.replace('_', ' ')}, trigger 0.5 s",
                    f"p50 {v['p50_s']} s, p99 {v['p99_s']} s",
                    f"{v['rows']} rows",
                )
            )
    sw = results.get("swap")
    if sw:
        rows.append(
            (
                f"alias moved -> first row by the new version ({sw['moves']} moves)",
                f"p50 {sw['hot_swap_s']['p50']} s, p95 {sw['hot_swap_s']['p95']} s, max {sw['hot_swap_s']['max']} s",
                f"stop + restart: p50 {sw['restart_s']['p50']} s ({sw['restart_over_hot_swap_p50']}x); "
                f"files mixing versions: {sw['files_mixing_versions']}",
            )
        )
        ws = sw["hot_swap_with_shadow_s"]
        rows.append(
            (
                f"the same with a shadow version on ({ws['moves']} moves)",
                f"p50 {ws['p50']} s, max {ws['max']} s",
                "",
            )
        )
    bf = results.get("backfill")
    if bf:
        ratio = ""
        if t and t["streamscore"]["rows_per_s"]:
            ratio = (
                f"{bf['rows_per_s_after_startup'] / t['streamscore']['rows_per_s']:.2f}x the stream's saturated rate"
            )
        rows.append(
            (
                f"backfill, {bf['rows']:,} rows",
                f"{_n(bf['rows_per_s_after_startup'])} rows/s after start-up "
                f"({_n(bf['rows_per_s_end_to_end'])} end to end)",
                ratio,
            )
        )
    mem = results.get("memory")
    if mem:
        rows.append(
            (
                f"Python workers' RSS across {mem['swaps']} swaps (after {mem['warm_up_swaps']} to warm up)",
                f"{mem['python_workers_rss_mb'][0]} -> {mem['python_workers_rss_mb'][1]} MB",
                f"driver {mem['driver_rss_mb'][0]} -> {mem['driver_rss_mb'][1]} MB",
            )
        )
    lines = [f"Measured {results.get('date', '')} on {machine}.", "", "| figure | measured | note |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines) + "\n"


def machine_description() -> str:
    cores = os.cpu_count()
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return f"{cores} cores{mem}, Python {sys.version.split()[0]}, Spark local[*]"


def run(
    settings: Settings, forwarded: list[str], sizes: Sizes, only: list[str], out: Path, base_args: list[str]
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    bench = Bench(settings, forwarded, sizes, out, base_args, only)
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine_description(),
        "sizes": sizes.__dict__ | {"rates": list(sizes.rates)},
    }
    try:
        bench.setup()
        for name in ("throughput", "latency", "swap"):
            if name in only:
                log.info("bench: %s", name)
                results[name] = getattr(bench, name)()
        for name in ("backfill", "memory"):
            if name in only:
                log.info("bench: %s", name)
                results[name] = getattr(bench, name)(bench.spark())
    finally:
        bench.close()
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown(results, results["machine"]))
    return results
