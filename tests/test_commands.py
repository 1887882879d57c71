"""Smoke runs of the utility commands and the demo, each in a subprocess exactly as a user types
it: exit code 0 and a JSON summary whose figures can be checked against the services."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest
from mlflow import MlflowClient

from streamscore.infra.services import free_ports

pytestmark = pytest.mark.integration


def _run(*args: str, timeout: float = 600) -> dict:
    proc = subprocess.run([sys.executable, "-m", "streamscore", *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_produce_and_model_commands(services, tracking, tmp_path):
    common = [
        "--set",
        f"app.home={tmp_path}",
        "--set",
        f"tracking.uri={tracking}",
        "--set",
        f"source.kafka.bootstrap_servers={services['kafka']}",
    ]
    name = f"cli-model-{uuid.uuid4().hex[:8]}"
    produced = _run(
        "produce", "--count", "50", "--malformed-every", "10", "--set", "source.kafka.topic=cli-topic", *common
    )
    assert (produced["sent"], produced["valid"], produced["malformed"]) == (50, 45, 5)

    registered = _run("model", "register-demo", "--alias", "", "--set", f"model.name={name}", *common)
    promoted = _run(
        "model",
        "promote",
        "--version",
        registered["model_version"],
        "--alias",
        "champion",
        "--set",
        f"model.name={name}",
        *common,
    )
    client = MlflowClient(tracking)
    assert client.get_model_version_by_alias(name, "champion").version == registered["model_version"]
    assert float(client.get_registered_model(name).tags["streamscore.alias_set_at.champion"]) == pytest.approx(
        promoted["alias_set_at"]
    )


@pytest.mark.heavy
def test_bench_smoke_runs_every_scenario_on_the_real_services(services, tracking, tmp_path):
    """``bench --quick``: every scenario end to end at tiny sizes (its figures are not checked
    against targets here: timing belongs to the benchmark, not the tests), its accounting is."""
    out = tmp_path / "bench"
    summary = _run(
        "bench",
        "--quick",
        "--out",
        str(out),
        "--set",
        f"app.home={tmp_path}",
        "--set",
        f"tracking.uri={tracking}",
        "--set",
        f"source.kafka.bootstrap_servers={services['kafka']}",
        "--set",
        f"model.name=bench-{uuid.uuid4().hex[:8]}",
        timeout=1200,
    )
    results = json.loads((out / "results.json").read_text())
    assert summary["status"] == "OK" and set(results) >= {"throughput", "latency", "swap", "backfill", "memory"}
    t = results["throughput"]
    assert t["backlog_events"] == 3000 and t["streamscore"]["rows_per_s"] > 0 and t["plain_consumer"]["rows_per_s"] > 0
    assert set(t["streamscore"]["startup_phases_s"]) >= {"preflight", "spark", "model", "run", "query_start"}
    assert results["swap"]["moves"] == 2 and results["swap"]["files_mixing_versions"] == 0
    assert results["swap"]["restart_s"]["runs"] == 1 and results["swap"]["hot_swap_with_shadow_s"]["moves"] == 2
    assert results["latency"]["small_batch"]["batches"] >= 1
    assert results["latency"]["freshness"]["200_events_per_s"]["rows"] == 800
    assert results["backfill"]["rows"] == 3000
    assert "| figure | measured | note |" in (out / "results.md").read_text()


@pytest.mark.heavy
def test_demo_end_to_end_on_its_own_services(tmp_path):
    kafka_port, mlflow_port = free_ports(2)
    ports = [
        "--set",
        f"source.kafka.bootstrap_servers=127.0.0.1:{kafka_port}",
        "--set",
        f"tracking.uri=http://127.0.0.1:{mlflow_port}",
        "--set",
        f"app.home={tmp_path}",
    ]
    try:
        summary = _run("demo", "--events", "1200", "--rate", "600", *ports, timeout=900)
        assert summary["status"] == "FINISHED" and summary["all_accounted_for"] is True
        assert summary["rows_in"] == 1200 and len(summary["swaps"]) == 1
        assert set(summary["rows_by_version"]) == {
            summary["swaps"][0]["from_version"],
            summary["swaps"][0]["to_version"],
        }
        status = _run("services", "status", *ports)
        assert [(s["service"], s["healthy"]) for s in status["services"]] == [("kafka", True), ("mlflow", True)]
    finally:
        stop = subprocess.run(
            [sys.executable, "-m", "streamscore", "services", "stop", *ports],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert {s["action"] for s in json.loads(stop.stdout.strip().splitlines()[-1])["services"]} == {"stopped"}
