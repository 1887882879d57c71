"""The command line contract on wrong input: a clear message on stderr naming what is wrong,
exit code 2, and still one JSON summary as the last stdout line. Nothing here needs a service."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import silent_port


def _cli(*args: str, sets: dict | None = None) -> tuple[int, str, dict]:
    options = [x for key, value in (sets or {}).items() for x in ("--set", f"{key}={value}")]
    proc = subprocess.run(
        [sys.executable, "-m", "streamscore", *args, *options], capture_output=True, text=True, timeout=120
    )
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    return proc.returncode, proc.stderr, last


@pytest.mark.parametrize(
    "args, named",
    [
        (["nonsense"], "unknown command 'nonsense'"),
        ([], "a command is required"),
        (["stream", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["backfill"], "one of the arguments --delta --table --kafka is required"),
        (["backfill", "--kafka", "--chunks", "0"], "chunks"),
        (["backfill", "--kafka", "--backfill-id", "x' OR '1'='1"], "backfill_id"),
        (["backfill", "--delta", "/tmp/t", "--as-of-version", "1", "--as-of-timestamp", "2026-01-01"], "not both"),
        (["backfill", "--kafka", "--model-ref", "champion"], "model.ref"),
        (["model", "promote"], "--version is required"),
        (["stream", "--set", "trigger.max_batches=zero"], "trigger.max_batches"),
        (["stream", "--set", "sink.app_id=x' OR 1=1"], "sink.app_id"),
        (
            ["model", "register-demo", "--profile", "azure"]
            + [f"--set=tracking.azure.{k}=x" for k in ("subscription_id", "resource_group", "workspace", "region")],
            "logged-models API",
        ),
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


def test_an_unreachable_broker_stops_the_stream_at_start_naming_the_setting(tmp_path):
    import time

    t0 = time.time()
    with silent_port() as port:
        code, stderr, last = _cli(
            "stream",
            sets={
                "app.home": tmp_path,
                "app.preflight_timeout_s": 3,
                "source.kafka.bootstrap_servers": f"127.0.0.1:{port}",
            },
        )
    assert code == 1 and last["status"] == "FAILED"
    assert "did not answer within 3s" in last["error"] and "source.kafka.bootstrap_servers" in last["error"]
    assert "source.kafka.bootstrap_servers" in stderr
    assert time.time() - t0 < 60


def test_an_unreachable_tracking_server_stops_the_stream_at_start_naming_the_setting(tmp_path):
    with silent_port() as port:
        code, _, last = _cli(
            "stream",
            sets={
                "app.home": tmp_path,
                "app.preflight_timeout_s": 3,
                "source.kind": "delta",
                "source.delta.path": tmp_path / "events",
                "tracking.uri": f"http://127.0.0.1:{port}",
            },
        )
    assert code == 1 and "MLflow tracking server" in last["error"] and "tracking.uri" in last["error"]
