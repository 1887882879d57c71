"""Tracking targets: a mirror on a second real MLflow server, and the Azure ML target offline."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from streamscore.conf.settings import ConfigError, load_settings
from streamscore.demo import ensure_topic, produce_events, train_and_register
from streamscore.streaming import run_stream
from tests.helpers import unique

AZURE = [
    "tracking.azure.subscription_id=00000000-0000-0000-0000-000000000000",
    "tracking.azure.resource_group=rg",
    "tracking.azure.workspace=ws",
    "tracking.azure.region=westeurope",
]


@pytest.fixture(scope="module")
def second_mlflow(home):
    from streamscore.infra.services import MlflowService, start_on_free_ports

    svc = start_on_free_ports(lambda p: MlflowService(home / "mirror", p[0]), 1)
    yield svc.address
    svc.stop()


@pytest.mark.integration
@pytest.mark.xdist_group("second-mlflow")  # one mirror server for both
def test_mirror_gets_the_same_params_and_metrics(spark, make_settings, second_mlflow):
    s = make_settings(
        trigger={"available_now": True},
        tracking={"mirror_uri": second_mlflow},
        source={"kafka": {"max_offsets_per_trigger": 150}},
    )
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


def _stream_through(ws, make_settings, s0, tracking: dict, events: int, malformed_every: int, name=None):
    """A model registered on the real server (``s0``'s), ``events`` sent (every
    ``malformed_every``-th malformed), one stream run tracking to ``tracking``; then the emulator
    ``ws`` stops. Returns (summary, settings)."""
    try:
        s = make_settings(
            name or s0.model.name,
            trigger={"available_now": True},
            tracking={"registry_uri": s0.tracking.uri, **tracking},
        )
        train_and_register(s.model.name, "v1", alias="champion")  # the uploader's side, on the real registry
        k = s.source.kafka
        ensure_topic(k.bootstrap_servers, k.topic)
        produce_events(k.bootstrap_servers, k.topic, events, malformed_every=malformed_every, prefix="cloud")
        return run_stream(s), s
    finally:
        ws.stop()


def _read_back(s0, summary: dict, experiment: str, tmp_path):
    """The run as the real server behind an emulator holds it, checked against the job's summary."""
    client = MlflowClient(s0.tracking.uri)
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED" and client.get_experiment(run.info.experiment_id).name == experiment
    for metric in ("rows_scored", "rows_dead_lettered"):
        history = client.get_metric_history(summary["run_id"], metric)
        assert sum(m.value for m in history) == summary[metric] and len(history) == summary["batches"]
    with open(client.download_artifacts(summary["run_id"], "summary.json", str(tmp_path / "dl"))) as f:
        assert json.load(f)["rows_scored"] == summary["rows_scored"]
    return run


@pytest.mark.integration
def test_an_azure_ml_workspace_gets_the_job_run_through_the_azureml_plugin(
    spark, make_settings, tmp_path, monkeypatch, capfd
):
    """The stream's tracking target is an Azure ML workspace (``azureml://``), reached through the
    real azureml-mlflow plugin: its store, its Azure AD credential chain (a managed identity
    endpoint here), its artifact client and blob upload, over TLS. The emulator in front of a real
    MLflow server answers as Azure ML does (no logged-models API); what the job logged is read back
    from that server with MLflow's own client. The model registry is the local server."""
    from tests.mlflow_workspaces import AzureMLWorkspace

    s0 = make_settings()
    ws = AzureMLWorkspace(s0.tracking.uri, tmp_path / "aml")
    for var in ("AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET", "AZURE_FEDERATED_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)  # the chain's first links stay out of the way
    for var, value in ws.env().items():
        monkeypatch.setenv(var, value)
    summary, s = _stream_through(ws, make_settings, s0, {"uri": ws.uri(), "experiment": "streamscore-aml"}, 80, 10)
    out, err = capfd.readouterr()
    assert summary["status"] == "FINISHED" and (summary["rows_scored"], summary["rows_dead_lettered"]) == (72, 8)
    assert summary["tracking_uri"] == ws.uri()

    # Azure AD: a token for Azure's management scope, from the managed identity endpoint
    assert ws.token_requests and {q["resource"][0] for q in ws.token_requests} == {"https://management.azure.com"}
    calls = ws.mlflow_calls()
    assert {c.authorization for c in calls} == {f"Bearer {ws.token}"}
    served = [
        c
        for c in ws.calls
        if "/api/2.0/mlflow/" in c.path or "/history/v1.0/" in c.path or c.path.startswith("/upload/")
    ]
    assert served == ws.calls, [c.path for c in ws.calls if c not in served]  # no call Azure ML would not answer
    assert not [c.path for c in ws.calls if "logged-models" in c.path]
    assert any(c.path.endswith("/runs/update") for c in calls)

    # what the job logged, read back from the server behind the workspace
    run = _read_back(s0, summary, "streamscore-aml", tmp_path)
    assert run.data.params["model.name"] == s.model.name and run.data.metrics["model_version"] == 1
    assert json.loads(ws.blobs["summary.json"])["run_id"] == summary["run_id"]  # uploaded as a blob

    # the bearer token is nowhere but in the Authorization header
    logged = json.dumps([run.data.params, run.data.tags]) + ws.blobs["summary.json"].decode() + out + err
    assert ws.token not in logged and ws.identity_header not in logged
    assert all(ws.token.encode() not in c.body for c in ws.calls)


def test_misconfigured_azure_target_stops_the_job_at_start_naming_the_key():
    with pytest.raises(ConfigError, match="tracking.azure.workspace"):
        load_settings("azure", overrides=AZURE[:2] + AZURE[3:]).tracking.effective_uri()
    proc = subprocess.run(
        [sys.executable, "-m", "streamscore", "stream", "--profile", "azure", "--set", AZURE[0]],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "tracking.azure.resource_group" in proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["status"] == "FAILED"


@pytest.mark.integration
def test_a_databricks_workspace_gets_the_job_run_through_the_real_client(
    spark, make_settings, tmp_path, monkeypatch, capfd
):
    """The stream tracks to ``databricks`` (MLflow's Databricks store, configured through
    ``databricks-sdk``) on a local emulator in front of a real MLflow server: bearer token,
    ``dbfs:/databricks/mlflow-tracking/`` artifact URIs, uploads through the Files API. The model
    is resolved in Unity Catalog (``databricks-uc``, a three-level name, by alias) and downloaded
    through the Files API, as the emulator answers from the real server's registry."""
    from tests.mlflow_workspaces import DatabricksWorkspace

    for var in ("DATABRICKS_HOST", "DATABRICKS_TOKEN", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.setenv(var, "")  # so that what configure_mlflow sets is undone after the test
    monkeypatch.delenv("DATABRICKS_CONFIG_PROFILE", raising=False)
    s0 = make_settings()
    ws = DatabricksWorkspace(s0.tracking.uri)
    target = {
        "uri": "databricks",
        "registry_uri": "databricks-uc",
        "databricks_host": ws.url,
        "token": ws.token,
        "experiment": "/Shared/streamscore",
    }
    uc_name = f"main.ml.{s0.model.name.replace('-', '_')}"
    summary, s = _stream_through(ws, make_settings, s0, target, 90, 9, name=uc_name)
    out, err = capfd.readouterr()
    assert summary["status"] == "FINISHED" and (summary["rows_scored"], summary["rows_dead_lettered"]) == (80, 10)
    assert summary["tracking_uri"] == "databricks"

    calls = ws.mlflow_calls()
    assert {c.authorization for c in calls} == {f"Bearer {ws.token}"}
    paths = [c.path for c in calls]
    assert any("/unity-catalog/registered-models/alias" in p and "champion" in p for p in paths), paths
    model_files = ("/api/2.0/fs/files/Models/main/ml/", "/signed/Models/main/ml/")
    assert any(c.path.startswith(model_files) for c in ws.calls)  # the model's files
    assert summary["model_name"] == uc_name and summary["model_version"] == "1"
    fs = (
        "/api/2.0/fs/files/",
        "/api/2.0/fs/directories/",
        "/api/2.0/fs/create-download-url",
        "/api/2.0/fs/endpoints",
        "/signed/Models/",
    )
    prefixes = ("/api/2.0/mlflow/", *fs, "/.well-known/")
    served = [c for c in ws.calls if c.path.startswith(prefixes)]
    assert served == ws.calls, [c.path for c in ws.calls if c not in served]
    assert all(ws.token.encode() not in c.body for c in ws.calls)  # the secret travels only in the header

    run = _read_back(s0, summary, "/Shared/streamscore", tmp_path)
    params = run.data.params
    assert params["model.ref"] == "@champion" and params["tracking.databricks_host"] == ws.url
    assert params["tracking.token"] == "**********"
    assert json.loads(ws.blobs["summary.json"])["run_id"] == summary["run_id"]
    assert ws.token not in json.dumps([params, run.data.tags]) + out + err


@pytest.mark.integration
def test_the_unity_catalog_emulator_answers_aliases_only(services, tracking, monkeypatch):
    """What the Databricks emulator's Unity Catalog registry answers, through MLflow's own UC
    client: a three-level name by alias, with the version's files; ``latest`` is a reserved alias;
    a two-level name is refused; and the job's own resolution refuses stages and ``latest`` for a
    UC registry before any call."""
    from mlflow.exceptions import MlflowException

    from streamscore.errors import ConfigError
    from streamscore.registry_watch.resolve import ModelRef, check_uc_ref
    from tests.mlflow_workspaces import DatabricksWorkspace

    name = unique("main.ml.uc", "_")
    train_and_register(name, "v1", alias="champion")
    ws = DatabricksWorkspace(services["mlflow"])
    monkeypatch.setenv("DATABRICKS_HOST", ws.url)
    monkeypatch.setenv("DATABRICKS_TOKEN", ws.token)
    monkeypatch.delenv("DATABRICKS_CONFIG_PROFILE", raising=False)
    try:
        uc = MlflowClient(tracking_uri="databricks", registry_uri="databricks-uc")
        mv = uc.get_model_version_by_alias(name, "champion")
        assert (mv.version, mv.status, mv.aliases) == ("1", "READY", ["champion"])
        assert uc.get_registered_model(name).aliases == {"champion": "1"}
        with pytest.raises(MlflowException, match="'latest' is a reserved alias"):
            uc.get_model_version_by_alias(name, "latest")
        with pytest.raises(MlflowException, match="not a three-level name"):
            uc.get_model_version_by_alias("ml.two_levels", "champion")
        with pytest.raises(MlflowException):  # no stages in Unity Catalog (MLflow's client says so)
            uc.get_latest_versions(name, stages=["Production"])
    finally:
        ws.stop()
    for ref in ("latest", "@latest", "stage:Production"):
        with pytest.raises(ConfigError):
            check_uc_ref(ModelRef.parse(ref), name)


@pytest.mark.integration
@pytest.mark.xdist_group("second-mlflow")  # one mirror server for both
def test_each_target_gets_its_own_token_and_nothing_process_wide_holds_either(spark, make_settings, second_mlflow):
    """Both targets are real MLflow servers behind recording proxies; the model is resolved and
    downloaded through the primary's proxy too."""
    import os

    from tests.faultproxy import FaultProxy

    primary_token, mirror_token = "primary-tok-7f3a", "mirror-tok-91c2"
    s0 = make_settings()
    primary, mirror = FaultProxy(s0.tracking.uri).start(), FaultProxy(second_mlflow).start()
    try:
        s = make_settings(
            s0.model.name,
            trigger={"available_now": True},
            tracking={
                "uri": primary.address,
                "token": primary_token,
                "mirror_uri": mirror.address,
                "mirror_token": mirror_token,
            },
        )
        train_and_register(s.model.name, "v1", alias="champion")
        k = s.source.kafka
        ensure_topic(k.bootstrap_servers, k.topic)
        produce_events(k.bootstrap_servers, k.topic, 100, prefix="tok")
        summary = run_stream(s)
        environment = "\n".join(f"{k}={v}" for k, v in os.environ.items())
    finally:
        primary.stop()
        mirror.stop()
    assert summary["status"] == "FINISHED" and summary["rows_scored"] == 100
    assert primary.seen and mirror.seen
    unsigned = [p for p in primary.seen if p[2] is None]
    assert {auth for _, _, auth in primary.seen} == {f"Bearer {primary_token}"}, unsigned
    assert {auth for _, _, auth in mirror.seen} == {f"Bearer {mirror_token}"}
    paths = " ".join(path for _, path, _ in primary.seen)
    assert "model-versions" in paths and "/artifacts/" in paths  # registry and download, with the token
    assert primary_token not in environment and mirror_token not in environment
    for run_id, client in ((summary["run_id"], s0.tracking.uri), (summary["mirror_run_id"], second_mlflow)):
        logged = MlflowClient(client).get_run(run_id).data.params
        assert logged["tracking.token"] == logged["tracking.mirror_token"] == "**********"


SPARK_CHILD_ENV = """
import json, os, sys
from streamscore.conf.settings import load_settings
from streamscore.spark import build_spark
spark = build_spark(load_settings("local", overrides=["spark.master=local[1]", "app.home=" + sys.argv[1]]))
seen = spark.sparkContext.parallelize([0], 1).map(
    lambda _: {k: os.environ.get(k) for k in ("DATABRICKS_TOKEN", "AZURE_CLIENT_SECRET", "PATH")}).collect()[0]
print(json.dumps({"worker": seen, "driver": os.environ.get("DATABRICKS_TOKEN")}))
"""


@pytest.mark.integration
def test_credential_variables_do_not_reach_the_spark_jvm_or_its_python_workers(home):
    import os

    env = {**os.environ, "DATABRICKS_TOKEN": "dapi-worker-probe", "AZURE_CLIENT_SECRET": "az-probe"}
    proc = subprocess.run(
        [sys.executable, "-c", SPARK_CHILD_ENV, str(home)], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["worker"]["PATH"]  # the probe reads the worker's real environment
    assert seen["worker"]["DATABRICKS_TOKEN"] is None and seen["worker"]["AZURE_CLIENT_SECRET"] is None
    assert seen["driver"] == "dapi-worker-probe"  # the driver's own clients still have it


@pytest.mark.integration
def test_a_tracking_server_without_the_logged_models_api_gets_everything_a_job_logs(spark, make_settings, tmp_path):
    """Azure ML's MLflow server answers 404 on MLflow 3's logged-models API; params, metrics, tags
    and artifacts work. A real MLflow server behind a proxy that answers like that: the stream logs
    all it logs, and never calls the missing API."""
    from tests.faultproxy import FaultProxy

    s0 = make_settings()
    proxy = FaultProxy(s0.tracking.uri).start()
    proxy.refuse["/logged-models"] = 404
    try:
        s = make_settings(s0.model.name, trigger={"available_now": True}, tracking={"uri": proxy.address})
        train_and_register(s.model.name, "v1", alias="champion")  # the uploader's side, not the job's
        proxy.seen.clear()
        k = s.source.kafka
        ensure_topic(k.bootstrap_servers, k.topic)
        produce_events(k.bootstrap_servers, k.topic, 60, malformed_every=20, prefix="aml")
        summary = run_stream(s)
    finally:
        proxy.stop()
    assert summary["status"] == "FINISHED" and summary["rows_scored"] == 57
    assert [p for _, p, _ in proxy.seen if "logged-models" in p] == []
    client = MlflowClient(s0.tracking.uri)
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["model.name"] == s.model.name
    assert run.data.metrics["rows_scored"] == 57
    with open(client.download_artifacts(summary["run_id"], "summary.json", str(tmp_path))) as f:
        assert json.load(f)["rows_scored"] == 57
