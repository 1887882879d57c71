"""Tracking targets: a mirror on a second real MLflow server, and the Azure ML target offline."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from conf.settings import ConfigError, load_settings
from streamscore.app import run_stream
from streamscore.demo import ensure_topic, produce_events, train_and_register

AZURE = ["tracking.azure.subscription_id=00000000-0000-0000-0000-000000000000",
         "tracking.azure.resource_group=rg", "tracking.azure.workspace=ws", "tracking.azure.region=westeurope"]


@pytest.fixture(scope="module")
def second_mlflow(home):
    from infra.services import MlflowService, free_port

    svc = MlflowService(home / "mirror", free_port())
    svc.start(timeout=180)
    yield svc.address
    svc.stop()


@pytest.mark.integration
def test_mirror_gets_the_same_params_and_metrics(spark, make_settings, second_mlflow):
    s = make_settings(trigger={"available_now": True}, tracking={"mirror_uri": second_mlflow},
                      source={"kafka": {"max_offsets_per_trigger": 150}})
    train_and_register(s.model.name, "v1", alias="champion")
    k = s.source.kafka
    ensure_topic(k.bootstrap_servers, k.topic)
    produce_events(k.bootstrap_servers, k.topic, 400, malformed_every=8, prefix="m")
    summary = run_stream(s)
    assert summary["mirror_tracking_uri"] == second_mlflow and summary["mirror_run_id"]

    primary, mirror = MlflowClient(s.tracking.uri), MlflowClient(second_mlflow)
    p_run, m_run = primary.get_run(summary["run_id"]), mirror.get_run(summary["mirror_run_id"])
    assert m_run.data.params == p_run.data.params
    assert m_run.data.tags["streamscore.primary_run_id"] == summary["run_id"]
    assert m_run.info.status == p_run.info.status == "FINISHED"
    for metric in ("rows_in", "rows_scored", "rows_dead_lettered"):
        p_hist = sorted((m.step, m.value) for m in primary.get_metric_history(summary["run_id"], metric))
        m_hist = sorted((m.step, m.value) for m in mirror.get_metric_history(summary["mirror_run_id"], metric))
        assert p_hist == m_hist and len(p_hist) == summary["batches"]
    assert sum(v for _, v in p_hist) == 50  # rows_dead_lettered: every 8th of 400


def test_azureml_uri_is_built_and_the_plugin_resolves_it_offline():
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    from streamscore.tracking import _check_azureml_plugin

    uri = load_settings("azure", overrides=AZURE).tracking.effective_uri()
    assert uri.startswith("azureml://westeurope.api.azureml.ms/mlflow/v2.0/subscriptions/")
    _check_azureml_plugin()  # the azureml-mlflow entry point is installed
    builder = _tracking_store_registry.get_store_builder(uri)  # loads the plugin, contacts nothing
    assert "azureml" in builder.__module__


def test_misconfigured_azure_target_stops_the_job_at_start_naming_the_key():
    with pytest.raises(ConfigError, match="tracking.azure.workspace"):
        load_settings("azure", overrides=AZURE[:2] + AZURE[3:]).tracking.effective_uri()
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "stream", "--profile", "azure",
                           "--set", AZURE[0]], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "tracking.azure.resource_group" in proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["status"] == "FAILED"
