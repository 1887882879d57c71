"""Databricks job submission: the real ``databricks-sdk`` client against a local recorder that
answers like a workspace's Jobs and Files APIs; request bodies round-trip through the SDK's own
dataclasses; the bundle's job resources are a fresh render of the same definition."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import yaml
from databricks.sdk.service import catalog, jobs

from streamscore.jobs import submit
from streamscore.scoring import schema
from streamscore.scoring.spec import Field, InputSpec, Output
from tests.workspace_recorder import WorkspaceRecorder

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "dapi-recorder-token-5150"


@pytest.fixture
def workspace(monkeypatch, tmp_path):
    rec = WorkspaceRecorder()
    for var in ("DATABRICKS_CONFIG_PROFILE", "DATABRICKS_CONFIG_FILE", "DATABRICKS_CLIENT_ID", "ARM_CLIENT_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.databrickscfg of the machine's
    monkeypatch.setenv("DATABRICKS_HOST", rec.url)
    monkeypatch.setenv("DATABRICKS_TOKEN", TOKEN)
    yield rec
    rec.stop()


@pytest.fixture
def wheel(tmp_path) -> Path:
    w = tmp_path / "streamscore-0.1.0-py3-none-any.whl"
    w.write_bytes(b"PK\x03\x04 a stand-in wheel: the workspace only stores it")
    return w


SETS = ["--set", "model.name=fraud", "--set", "databricks.wheel_dir=/Volumes/ml/streamscore/wheels"]


def _iris_spec() -> InputSpec:
    features = tuple(Field(n, "double") for n in ("sepal_length", "sepal_width", "petal_length", "petal_width"))
    return InputSpec("event_id", "event_time", features, outputs=(Output("prediction", "string"),))


def _submit(capsys, *argv: str) -> tuple[int, dict, str]:
    code = submit.main(list(argv))
    out = capsys.readouterr().out
    return code, json.loads(out.strip().splitlines()[-1]), out


def _printed(out: str) -> dict:
    """What --dry-run printed before the summary line."""
    return json.loads(out[: out.rindex("\n{")])


def test_dry_run_prints_the_exact_requests_and_sends_nothing(workspace, capsys):
    code, summary, out = _submit(capsys, "backfill", "--once", "--dry-run", *SETS, "--", "--delta", "/Volumes/ml/ev")
    assert code == 0 and summary["dry_run"] and workspace.calls == []
    printed = _printed(out)
    wheel = Path(printed["upload"]["from"])
    assert wheel.name.startswith("streamscore-") and wheel.suffix == ".whl"  # built from this checkout
    assert (
        printed["upload"]["to"].startswith("/Volumes/ml/streamscore/wheels/")
        and summary["wheel"] == printed["upload"]["to"]
    )
    body = printed["requests"][0]["body"]
    (task,) = body["tasks"]
    assert jobs.SubmitTask.from_dict(task).as_dict() == task  # the SDK's own shape
    assert task["python_wheel_task"] == {
        "package_name": "streamscore",
        "entry_point": "streamscore",
        "parameters": ["backfill", "--profile", "databricks", *SETS[:2], "--delta", "/Volumes/ml/ev"],
    }
    assert task["libraries"] == [{"whl": summary["wheel"]}]
    assert task["new_cluster"]["spark_version"].startswith("18.")
    assert body["idempotency_token"] == summary["idempotency_token"]


def test_a_one_time_run_uploads_the_wheel_waits_and_a_retry_starts_no_second_run(workspace, capsys, wheel):
    argv = ["backfill", "--once", "--wait", "--wheel", str(wheel), *SETS, "--set", "databricks.poll_interval_s=0.05"]
    _, dry, out = _submit(capsys, *argv, "--dry-run", "--", "--kafka")
    expected = _printed(out)["requests"][0]["body"]
    code, summary, _ = _submit(capsys, *argv, "--", "--kafka")
    assert code == 0 and summary["status"] == "FINISHED" and summary["result_state"] == "SUCCESS"
    assert summary["run_page_url"].endswith(f"/#job/run/{summary['run_id']}")
    (upload,) = workspace.api_calls("/api/2.0/fs/files/")
    assert upload.method == "PUT" and upload.path == "/api/2.0/fs/files" + summary["wheel"]
    assert upload.body == wheel.read_bytes() and upload.query.get("overwrite") == ["true"]
    (sent,) = workspace.api_calls("/jobs/runs/submit")
    assert sent.json() == expected  # what --dry-run printed is what was sent
    assert all(c.headers.get("Authorization") == f"Bearer {TOKEN}" for c in workspace.api_calls("/api/"))
    assert len(workspace.api_calls("/jobs/runs/get")) == 3  # PENDING, RUNNING, TERMINATED

    again_code, again, _ = _submit(capsys, *argv, "--", "--kafka")  # a retried submit
    assert again_code == 0 and again["run_id"] == summary["run_id"] and len(workspace.runs) == 1
    assert len({c.json()["idempotency_token"] for c in workspace.api_calls("/jobs/runs/submit")}) == 1
    assert dry["idempotency_token"] == summary["idempotency_token"]


def test_a_failed_run_ends_the_command_failed_with_its_state(workspace, capsys, wheel):
    workspace.result_state = "FAILED"
    code, summary, _ = _submit(
        capsys,
        "backfill",
        "--once",
        "--wait",
        "--wheel",
        str(wheel),
        *SETS,
        "--set",
        "databricks.poll_interval_s=0.05",
        "--",
        "--kafka",
    )
    assert code == 1 and summary["status"] == "FAILED" and summary["result_state"] == "FAILED"
    assert f"run {summary['run_id']} ended FAILED" in summary["error"]


def test_named_jobs_are_created_then_updated_and_a_backfill_runs_now(workspace, capsys, wheel):
    code, first, _ = _submit(capsys, "backfill", "--wheel", str(wheel), *SETS, "--", "--kafka")
    assert code == 0 and first["job_action"] == "created" and first["run_id"]
    code, second, _ = _submit(
        capsys, "backfill", "--wheel", str(wheel), *SETS, "--set", "databricks.num_workers=4", "--", "--kafka"
    )
    assert code == 0 and second["job_action"] == "updated" and second["job_id"] == first["job_id"]
    (reset,) = workspace.api_calls("/jobs/reset")
    new = jobs.JobSettings.from_dict(reset.json()["new_settings"])
    assert new.name == "streamscore-backfill-fraud" and new.job_clusters[0].new_cluster.num_workers == 4
    assert len(workspace.api_calls("/jobs/run-now")) == 2

    code, stream, _ = _submit(capsys, "stream", "--wheel", str(wheel), *SETS)
    assert code == 0 and stream["job_action"] == "created" and "run_id" not in stream
    created = jobs.JobSettings.from_dict(workspace.jobs[stream["job_id"]])
    assert created.continuous.pause_status == jobs.PauseStatus.UNPAUSED and created.max_concurrent_runs == 1
    assert created.tasks[0].python_wheel_task.parameters[:3] == ["stream", "--profile", "databricks"]
    assert len(workspace.api_calls("/jobs/run-now")) == 2  # Databricks starts a continuous job itself


def test_serverless_backfill_and_azure_ml_tracking_get_their_environment(workspace, capsys, wheel):
    azure = [
        f"tracking.azure.{k}={v}"
        for k, v in (("subscription_id", "s"), ("resource_group", "rg"), ("workspace", "ws"), ("region", "westeurope"))
    ]
    sets = [x for a in azure for x in ("--set", a)] + [
        "--set",
        "tracking.uri=",
        "--set",
        "databricks.backfill_compute=serverless",
    ]
    code, summary, out = _submit(
        capsys, "backfill", "--once", "--dry-run", "--wheel", str(wheel), *SETS, *sets, "--", "--kafka"
    )
    assert code == 0
    body = _printed(out)["requests"][0]["body"]
    (env,) = body["environments"]
    assert env["spec"]["dependencies"][0] == summary["wheel"]
    assert any(d.startswith("azureml-mlflow==") for d in env["spec"]["dependencies"])
    assert body["tasks"][0]["environment_key"] == env["environment_key"] and "new_cluster" not in body["tasks"][0]
    # a stream never goes serverless (continuous triggers need a job cluster)
    _, _, out = _submit(capsys, "stream", "--once", "--dry-run", "--wheel", str(wheel), *SETS, *sets)
    assert "new_cluster" in _printed(out)["requests"][0]["body"]["tasks"][0]


@pytest.mark.parametrize(
    "status, code, message",
    [
        (400, "INVALID_PARAMETER_VALUE", "Node type Standard_Nope is not supported"),
        (400, "INVALID_PARAMETER_VALUE", "Cluster policy not found: 0123"),
        (401, "UNAUTHENTICATED", "Invalid access token"),
        (403, "PERMISSION_DENIED", "User cannot create jobs"),
        (500, "INTERNAL_ERROR", "Something broke on the workspace"),
    ],
)
def test_workspace_errors_end_the_command_with_the_workspace_message(workspace, capsys, wheel, status, code, message):
    workspace.fail("/jobs/runs/submit", status, code, message, times=10)
    exit_code, summary, _ = _submit(capsys, "backfill", "--once", "--wheel", str(wheel), *SETS, "--", "--kafka")
    assert exit_code == 1 and summary["status"] == "FAILED"
    assert message in summary["error"] and "submitting the run" in summary["error"]
    assert TOKEN not in json.dumps(summary)


def test_rate_limited_requests_are_retried_by_the_sdk(workspace, capsys, wheel):
    workspace.fail("/jobs/runs/submit", 429, "REQUEST_LIMIT_EXCEEDED", "slow down", times=1, retry_after=1)
    code, summary, _ = _submit(capsys, "backfill", "--once", "--wheel", str(wheel), *SETS, "--", "--kafka")
    assert code == 0 and summary["run_id"] and len(workspace.api_calls("/jobs/runs/submit")) == 2


def test_missing_credentials_and_literal_secrets_are_usage_errors(monkeypatch, capsys, wheel, tmp_path):
    for var in ("DATABRICKS_HOST", "DATABRICKS_TOKEN", "DATABRICKS_CONFIG_PROFILE", "DATABRICKS_CLIENT_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    code, summary, _ = _submit(capsys, "backfill", "--once", "--wheel", str(wheel), *SETS, "--", "--kafka")
    assert code == 2 and "Databricks credentials not found" in summary["error"]

    code, summary, _ = _submit(
        capsys, "stream", "--dry-run", "--wheel", str(wheel), "--set", "tracking.token=dapi-literal"
    )
    assert code == 2 and "secret reference" in summary["error"] and "dapi-literal" not in json.dumps(summary)
    code, summary, _ = _submit(
        capsys, "stream", "--dry-run", "--wheel", str(wheel), "--set", "databricks.env.AZURE_CLIENT_SECRET=plain"
    )
    assert code == 2 and "databricks.env" in summary["error"] and "plain" not in summary["error"]
    ref = "{{secrets/ml/sp-secret}}"
    code, summary, out = _submit(
        capsys, "stream", "--dry-run", "--wheel", str(wheel), "--set", f"databricks.env.AZURE_CLIENT_SECRET={ref}"
    )
    assert code == 0
    cluster = _printed(out)["requests"][0]["body"]["job_clusters"][0]["new_cluster"]
    assert cluster["spark_env_vars"] == {"AZURE_CLIENT_SECRET": ref}
    code, summary, _ = _submit(capsys, "backfill", "--dry-run", "--wheel", str(wheel), "--", "--chunks", "0", "--kafka")
    assert code == 2 and "chunks" in summary["error"]  # the job's own arguments are checked here


def test_the_bundle_resources_are_a_fresh_render_of_what_submit_builds():
    from streamscore import databricks as db
    from streamscore.conf.settings import load_settings
    from streamscore.jobs.bundle import (
        BACKFILL_DEFAULT_ARGS,
        MONITOR_FILE,
        RESOURCE_FILE,
        UC_VARIABLES,
        render,
        render_monitors,
    )

    settings = load_settings("databricks")
    committed = (ROOT / RESOURCE_FILE).read_text()
    assert committed == render("databricks", settings), "run `streamscore bundle` and commit the file"
    assert (ROOT / MONITOR_FILE).read_text() == render_monitors(settings), "run `streamscore bundle`"
    resources = yaml.safe_load(committed)["resources"]["jobs"]
    for command, job_args in (("stream", ()), ("backfill", BACKFILL_DEFAULT_ARGS)):
        built = db.job_settings(settings, db.JobSpec(command, "databricks", UC_VARIABLES, job_args), db.BUNDLE_WHEEL)
        assert jobs.JobSettings.from_dict(resources[f"streamscore_{command}"]).as_dict() == built.as_dict()
        params = built.tasks[0].python_wheel_task.parameters
        assert "databricks.catalog_name=${var.catalog_name}" in params  # the target's catalog reaches the job
    bundle = yaml.safe_load((ROOT / "databricks.yml").read_text())
    assert {"dev", "prod"} <= set(bundle["targets"]) and "resources/*.yml" in bundle["include"]
    assert {"catalog_name", "schema_name"} <= set(bundle["variables"])

    # the monitor: the fields of the SDK's create call, its profile on the columns the job writes
    monitor = yaml.safe_load((ROOT / MONITOR_FILE).read_text())["resources"]["quality_monitors"]["streamscore_scored"]
    inspect.signature(catalog.QualityMonitorsAPI.create).bind(None, **monitor)
    profile = catalog.MonitorInferenceLog.from_dict(monitor["inference_log"])
    assert profile.as_dict() == monitor["inference_log"]
    assert profile.problem_type == catalog.MonitorInferenceLogProblemType.PROBLEM_TYPE_CLASSIFICATION
    assert monitor["table_name"] == "${var.catalog_name}.${var.schema_name}.scored"
    assert catalog.MonitorCronSchedule.from_dict(monitor["schedule"]).timezone_id == "UTC"
    columns = {f.name: f.dataType.typeName() for f in schema.output_schema(_iris_spec()).fields}
    for key in ("timestamp_col", "model_id_col", "prediction_col"):
        assert monitor["inference_log"][key] in columns, key
    assert columns[monitor["inference_log"]["timestamp_col"]] == "timestamp"


def test_the_databricks_profile_uses_unity_catalog_names_and_a_volume(capsys, tmp_path):
    from streamscore.conf.settings import load_settings

    s = load_settings("databricks")
    assert (
        str(s.output_table) == "main.streamscore.scored" and str(s.dead_letter_table) == "main.streamscore.dead_letter"
    )
    assert s.checkpoint_path == "/Volumes/main/streamscore/streamscore/checkpoints/stream"
    assert s.wheel_dir == "/Volumes/main/streamscore/streamscore/wheels"
    assert s.catalog.metastore == "session" and not s.uses_catalog  # the cluster's catalog serves the names
    assert "dbfs:" not in json.dumps(s.masked())
    wheel = tmp_path / "streamscore-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"wheel")
    code, summary, out = _submit(
        capsys, "stream", "--dry-run", "--wheel", str(wheel), "--set", "databricks.schema_name=fraud_prod"
    )
    assert code == 0, summary
    assert summary["locations"] == {
        "output_table": "main.fraud_prod.scored",
        "dead_letter_table": "main.fraud_prod.dead_letter",
        "checkpoint": "/Volumes/main/fraud_prod/streamscore/checkpoints/stream",
    }
    params = _printed(out)["requests"][0]["body"]["tasks"][0]["python_wheel_task"]["parameters"]
    assert params[params.index("--set") + 1] == "databricks.schema_name=fraud_prod"  # the job writes there too
    _, shadowed, _ = _submit(  # a shadow's table is in the same schema, and said before anything is sent
        capsys, "stream", "--dry-run", "--wheel", str(wheel), "--set", "watch.shadow_ref=@challenger"
    )
    assert shadowed["locations"]["shadow_table"] == "main.streamscore.shadow"
    assert summary["wheel"].startswith("/Volumes/main/fraud_prod/streamscore/wheels/")
