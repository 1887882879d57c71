"""One running job per checkpoint (:mod:`streamscore.checkpoint`), without Spark: the claim names
its holder, and a holder killed with SIGKILL leaves no stale claim. A second stream on a running
stream's checkpoint: tests/test_stream_e2e.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from streamscore.checkpoint import CheckpointClaim
from streamscore.errors import CheckpointInUse, StreamFailed


def test_a_claimed_checkpoint_refuses_a_second_job_naming_the_first(tmp_path):
    cp = str(tmp_path / "cp")
    with CheckpointClaim(cp, "stream") as first:
        first.note(run_id="abc123")
        with pytest.raises(CheckpointInUse) as refused, CheckpointClaim(cp, "backfill"):
            pass
        message = str(refused.value)
        assert f"the checkpoint {cp} is in use by another job (streamscore stream, pid {os.getpid()} on " in message
        assert "MLflow run abc123" in message and "sink.checkpoint_path" in message and "\n" not in message
    with CheckpointClaim(cp, "stream"):  # released at the end of the first job
        pass


def test_a_job_killed_with_sigkill_leaves_no_stale_claim(tmp_path):
    cp = str(tmp_path / "cp")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
                import sys, time
                from streamscore.checkpoint import CheckpointClaim
                with CheckpointClaim({cp!r}, "stream"):
                    print("claimed", flush=True)
                    time.sleep(600)
            """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "claimed"
        with pytest.raises(CheckpointInUse, match=f"pid {holder.pid} "):
            CheckpointClaim(cp, "stream").__enter__()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    with CheckpointClaim(cp, "stream"):
        pass


def test_a_checkpoint_on_a_uri_is_not_claimed_locally(tmp_path):
    with CheckpointClaim("dbfs:/checkpoints/stream", "stream"), CheckpointClaim("dbfs:/checkpoints/stream", "stream"):
        pass  # no local lock there: a concurrent writer is reported when Delta refuses it (below)


def test_a_concurrent_writer_and_a_batch_error_read_as_one_line():
    spark_text = (
        "[STREAM_FAILED] Query [id = 1, runId = 2] terminated with exception: [FOREACH_BATCH_USER_FUNCTION_ERROR] "
        "An error occurred in the user provided function in foreach batch sink. Reason: An exception was raised by "
        "the Python Proxy. Return Message: Traceback (most recent call last):\n"
        '  File "/x/pipeline.py", line 90, in score_and_write\n    sinks.scored.write(df)\n'
        "py4j.protocol.Py4JJavaError: An error occurred while calling o1.save.\n"
        ": io.delta.exceptions.ConcurrentTransactionException: [DELTA_CONCURRENT_TRANSACTION] "
        "ConcurrentTransactionException:"
        " This error occurs when multiple streaming queries are using the same checkpoint to write into this table.\n"
        "\tat io.delta.exceptions.ConcurrentTransactionException.<init>(DeltaConcurrentExceptions.scala:1)\n"
    )
    concurrent = StreamFailed.from_query_error(spark_text, "/data/cp")
    assert str(concurrent).startswith("another job is running on the checkpoint /data/cp: ") and "\n" not in str(
        concurrent
    )
    assert concurrent.detail == spark_text
    batch_error = (
        spark_text.split("py4j")[0]
        + "ValueError: cannot score sepal_length 6.3\n\n=== Streaming Query ===\nIdentifier: q\n"
    )
    assert (
        str(StreamFailed.from_query_error(batch_error))
        == "streaming query failed: ValueError: cannot score sepal_length 6.3"
    )
