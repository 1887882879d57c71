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
