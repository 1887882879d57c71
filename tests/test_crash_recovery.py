"""Nothing lost, nothing twice: the stream job (its Python driver and its JVM) is killed with
SIGKILL while it works through a backlog, and restarted on the same checkpoint each time: first at
random moments, then inside the windows of a batch that matter most (see
:mod:`streamscore.faults`). Counted by event id and by Kafka offset in the tables, read back
independently; the replayed batches' versions checked against the ledger and MLflow."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from streamscore.demo import ensure_topic, produce_events, train_and_register
from streamscore.streaming import run_stream
from tests.helpers import run_until_failpoint, stream_command, wait_for

pytestmark = pytest.mark.integration

RANDOM_KILLS = int(os.environ.get("STREAMSCORE_CRASH_KILLS", "2"))  # more for a deeper run
WINDOWS = ("after-ledger-write", "between-writes", "after-writes")


def _command(s, home, *flags: str) -> list[str]:
    return stream_command(
        s, home, *flags, source__kafka__max_offsets_per_trigger="150", trigger__processing_time="0.5 seconds"
    )


def _kill_at_random(s, home, log: Path, delay: float) -> None:
    with open(log, "w") as out:
        proc = subprocess.Popen(_command(s, home), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # let it get into its batches, then kill driver and JVM
        started = lambda: "batch " in log.read_text() or proc.poll() is not None  # noqa: E731
        wait_for(started, timeout=240, what="a first batch")
        time.sleep(delay)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(60)


def _kill_at(s, home, log: Path, point: str) -> None:
    """Run until the job kills itself at ``point`` of its second batch."""
    run_until_failpoint(_command(s, home), log, f"{point}@2")


@pytest.mark.heavy
def test_kills_at_random_moments_and_inside_a_batch_lose_and_duplicate_nothing(spark, make_settings, tmp_path):
    s = make_settings()
    v1 = train_and_register(s.model.name, "v1", alias="champion")
    k = s.source.kafka
    ensure_topic(k.bootstrap_servers, k.topic)
    # 18 batches of 150: the killed runs read at most about 12 of them (each random kill within 3 s
    # of a first batch, each failpoint at a run's second), so the last run always has batches
    # after the last killed one to show the new version serving
    sent = produce_events(k.bootstrap_servers, k.topic, 2700, malformed_every=25, prefix="crash")
    home = tmp_path / "home"
    ledger_file = Path(s.checkpoint_path) / "streamscore" / "batch_versions.jsonl"

    def batches(path) -> set[int]:
        return set(spark.read.format("delta").load(path).select("batch_id").toPandas()["batch_id"])

    rnd = random.Random(int(os.environ.get("STREAMSCORE_CRASH_SEED", "11")))
    delays = [round(rnd.uniform(0.0, 3.0), 2) for _ in range(RANDOM_KILLS)]
    for attempt, delay in enumerate(delays):
        _kill_at_random(s, home, tmp_path / f"random{attempt}.log", delay)

    # then inside the windows; the alias moves after the first of these kills
    killed: dict[int, str] = {}  # batch id -> the version its ledger line names
    v2 = None
    for point in WINDOWS:
        _kill_at(s, home, tmp_path / f"{point}.log", point)
        last = json.loads(ledger_file.read_text().splitlines()[-1])
        batch = int(last["batch_id"])
        killed[batch] = str(last["version"])
        assert (batch in batches(s.output_path)) == (point != "after-ledger-write"), point
        assert (batch in batches(s.dead_letter_path)) == (point == "after-writes"), point
        if v2 is None:
            v2 = train_and_register(s.model.name, "v2", alias="champion")

    # the last run needs no fresh process (nothing kills it): in this one, on the tests' Spark session
    drain = make_settings(  # the killed batch replayed (its offsets are in the checkpoint), then the rest at once
        s.model.name,
        source={"kafka": {"topic": k.topic, "max_offsets_per_trigger": 3000}},
        sink={
            "output_path": s.output_path,
            "dead_letter_path": s.dead_letter_path,
            "checkpoint_path": s.checkpoint_path,
        },
        trigger={"available_now": True, "processing_time": "0.5 seconds"},
    )
    summary = run_stream(drain)
    assert summary["status"] == "FINISHED"

    out = spark.read.format("delta").load(s.output_path).select("event_id", "batch_id", "model_version").toPandas()
    dead = spark.read.format("delta").load(s.dead_letter_path).select("source_partition", "source_offset").toPandas()
    assert len(out) == len(set(out["event_id"])), f"duplicates after random kills at {delays}"
    assert set(out["event_id"]) == set(sent.valid_ids), f"missing rows after random kills at {delays}"
    assert len(dead) == sent.malformed and not dead.duplicated().any()
    first, *later = sorted(killed)
    assert killed[first] == v1 and all(killed[b] == v2 for b in later)
    for batch, version in killed.items():  # each killed batch was replayed by its ledger's version
        assert set(out[out["batch_id"] == batch]["model_version"]) == {version}, batch
    assert set(out[out["batch_id"] > max(killed)]["model_version"]) == {v2}
    # the final run replayed the last killed batch and logged that step's version
    steps = MlflowClient(s.tracking.uri).get_metric_history(summary["run_id"], "model_version")
    assert {int(m.value) for m in steps if m.step == max(killed)} == {int(killed[max(killed)])}
