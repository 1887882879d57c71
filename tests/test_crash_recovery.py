"""Nothing lost, nothing twice: the stream job (its Python driver and its JVM) is killed with
SIGKILL at random moments while it works through a backlog, and restarted on the same checkpoint
each time. Counted by event id in the output table, read back independently."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from streamscore.demo import ensure_topic, produce_events, train_and_register
from tests.helpers import stream_command, wait_for

pytestmark = pytest.mark.integration

KILLS = 5


def _command(s, home, *flags: str) -> list[str]:
    return stream_command(
        s, home, *flags, source__kafka__max_offsets_per_trigger="150", trigger__processing_time="0.5 seconds"
    )


def test_sigkill_at_random_moments_loses_and_duplicates_nothing(spark, make_settings, tmp_path):
    s = make_settings()
    train_and_register(s.model.name, "v1", alias="champion")
    k = s.source.kafka
    ensure_topic(k.bootstrap_servers, k.topic)
    sent = produce_events(k.bootstrap_servers, k.topic, 3000, malformed_every=25, prefix="crash")
    rnd = random.Random(int(os.environ.get("STREAMSCORE_CRASH_SEED", "11")))
    home = tmp_path / "home"
    kills = []
    for attempt in range(KILLS):
        log = tmp_path / f"run{attempt}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(_command(s, home), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            # let it get into its batches, then kill driver and JVM at a random moment
            started = lambda log=log, proc=proc: "batch " in log.read_text() or proc.poll() is not None  # noqa: E731
            wait_for(started, timeout=240, what="a first batch")
            delay = rnd.uniform(0.0, 3.0)
            time.sleep(delay)
            kills.append(round(delay, 2))
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(60)
    final = subprocess.run(_command(s, home, "--available-now"), capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]
    summary = json.loads(final.stdout.strip().splitlines()[-1])
    assert summary["status"] == "FINISHED"

    out = spark.read.format("delta").load(s.output_path).select("event_id", "source_offset").toPandas()
    dead = spark.read.format("delta").load(s.dead_letter_path).select("source_partition", "source_offset").toPandas()
    assert len(out) == len(set(out["event_id"])), f"duplicates after kills at {kills}"
    assert set(out["event_id"]) == set(sent.valid_ids), f"missing rows after kills at {kills}"
    assert len(dead) == sent.malformed and not dead.duplicated().any()


def test_kills_inside_the_windows_of_a_batch_are_replayed_exactly_once_by_the_ledgers_version(
    spark, make_settings, tmp_path
):
    """Three runs, each killed with SIGKILL at a chosen point of its second batch (see
    :mod:`streamscore.faults`): after the ledger write, between the two Delta writes, after both.
    The alias moves to a new version after the first kill. Each killed batch is replayed by the next
    run with the version its ledger line names (the MLflow ``model_version`` metric of its step says
    so too), and in the end every event is in its table exactly once."""
    from mlflow import MlflowClient

    s = make_settings()
    v1 = train_and_register(s.model.name, "v1", alias="champion")
    k = s.source.kafka
    ensure_topic(k.bootstrap_servers, k.topic)
    sent = produce_events(k.bootstrap_servers, k.topic, 1050, malformed_every=20, prefix="window")
    home = tmp_path / "home"
    ledger_file = Path(s.checkpoint_path) / "streamscore" / "batch_versions.jsonl"

    def batches(path) -> set[int]:
        return set(spark.read.format("delta").load(path).select("batch_id").toPandas()["batch_id"])

    killed: dict[int, str] = {}  # batch id -> the version its ledger line names
    v2 = None
    runs = []
    for point in ("after-ledger-write", "between-writes", "after-writes"):
        log = tmp_path / f"{point}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(
                _command(s, home),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "STREAMSCORE_FAILPOINT": f"{point}@2"},
            )
        try:
            proc.wait(300)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]
        runs.append(log.read_text())
        last = json.loads(ledger_file.read_text().splitlines()[-1])
        batch = int(last["batch_id"])
        killed[batch] = str(last["version"])
        # the kill happened inside the window it names
        assert (batch in batches(s.output_path)) == (point != "after-ledger-write"), point
        assert (batch in batches(s.dead_letter_path)) == (point == "after-writes"), point
        if v2 is None:
            v2 = train_and_register(s.model.name, "v2", alias="champion")

    final = subprocess.run(_command(s, home, "--available-now"), capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]
    summary = json.loads(final.stdout.strip().splitlines()[-1])

    out = spark.read.format("delta").load(s.output_path).select("event_id", "batch_id", "model_version").toPandas()
    dead = spark.read.format("delta").load(s.dead_letter_path).select("source_partition", "source_offset").toPandas()
    assert len(out) == len(set(out["event_id"])) and set(out["event_id"]) == set(sent.valid_ids)
    assert len(dead) == sent.malformed and not dead.duplicated().any()
    first_kill, *later_kills = sorted(killed)
    assert killed[first_kill] == v1 and all(killed[b] == v2 for b in later_kills)
    for batch, version in killed.items():
        assert set(out[out["batch_id"] == batch]["model_version"]) == {version}, batch
    assert set(out[out["batch_id"] > max(killed)]["model_version"]) == {v2}
    # the last killed batch was replayed by the final run, which logged its version as that step's
    steps = MlflowClient(s.tracking.uri).get_metric_history(summary["run_id"], "model_version")
    assert {int(m.value) for m in steps if m.step == max(killed)} == {int(killed[max(killed)])}
