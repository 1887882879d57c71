"""The command line contract on wrong input: a clear message on stderr naming what is wrong,
exit code 2, and still one JSON summary as the last stdout line. Nothing here needs a service."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _cli(*args: str) -> tuple[int, str, dict]:
    proc = subprocess.run([sys.executable, "-m", "streamscore", *args], capture_output=True, text=True, timeout=120)
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    return proc.returncode, proc.stderr, last


@pytest.mark.parametrize(
    "args, named",
    [
        (["nonsense"], "unknown command 'nonsense'"),
        ([], "a command is required"),
        (["stream", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["backfill"], "one of the arguments --delta --kafka is required"),
        (["backfill", "--kafka", "--chunks", "0"], "chunks"),
        (["backfill", "--kafka", "--backfill-id", "x' OR '1'='1"], "backfill_id"),
        (["backfill", "--delta", "/tmp/t", "--as-of-version", "1", "--as-of-timestamp", "2026-01-01"], "not both"),
        (["backfill", "--kafka", "--model-ref", "champion"], "model.ref"),
        (["model", "promote"], "--version is required"),
        (["stream", "--set", "trigger.max_batches=zero"], "trigger.max_batches"),
    ],
)
def test_usage_and_configuration_errors_exit_2_with_a_summary(tmp_path, args, named):
    code, stderr, last = _cli(*args, *(["--set", f"app.home={tmp_path}"] if args and args[0] != "nonsense" else []))
    assert code == 2, stderr
    assert named in stderr and named in last["error"]
    assert last["status"] == "FAILED"


def test_help_lists_every_command():
    proc = subprocess.run([sys.executable, "-m", "streamscore", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for command in ("stream", "backfill", "demo", "services", "produce", "model", "bench"):
        assert command in proc.stdout
