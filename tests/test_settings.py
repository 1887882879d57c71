from __future__ import annotations

import json
import subprocess
import sys

import pytest

from streamscore.conf.settings import ConfigError, load_settings


def test_defaults_load_and_relative_paths_go_under_home(tmp_path):
    s = load_settings(overrides={"app": {"home": str(tmp_path)}})
    assert s.source.kind == "kafka" and s.model.ref == "@champion"
    assert s.output_path == str(tmp_path / "tables" / "scored")
    assert s.app_id.startswith("streamscore-")


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"source\.kafka\.topicc: unknown key"):
        load_settings(overrides=["source.kafka.topicc=x"])


def test_invalid_value_is_named():
    with pytest.raises(ConfigError, match=r"trigger\.processing_time"):
        load_settings(overrides=["trigger.processing_time=soon"])
    with pytest.raises(ConfigError, match=r"source\.kafka\.max_offsets_per_trigger"):
        load_settings(overrides=["source.kafka.max_offsets_per_trigger=-1"])


def test_unknown_profile():
    with pytest.raises(ConfigError, match="unknown profile 'nope'"):
        load_settings("nope")


def test_environment_overrides_yaml_and_cli_overrides_environment(monkeypatch):
    monkeypatch.setenv("STREAMSCORE_SOURCE__KAFKA__TOPIC", "from-env")
    monkeypatch.setenv("STREAMSCORE_TRIGGER__MAX_BATCHES", "4")
    s = load_settings()
    assert s.source.kafka.topic == "from-env" and s.trigger.max_batches == 4
    assert load_settings(overrides=["source.kafka.topic=from-cli"]).source.kafka.topic == "from-cli"


def test_unknown_environment_key_is_named(monkeypatch):
    monkeypatch.setenv("STREAMSCORE_SINK__OUTPUT", "x")
    with pytest.raises(ConfigError, match=r"sink\.output: unknown key"):
        load_settings()


def test_secrets_are_masked(monkeypatch):
    monkeypatch.setenv("STREAMSCORE_TRACKING__TOKEN", "s3cr3t-token")
    monkeypatch.setenv("STREAMSCORE_SOURCE__KAFKA__SASL_PASSWORD", "kafka-pass")
    s = load_settings()
    dumped = json.dumps(s.masked())
    assert "s3cr3t-token" not in dumped and "kafka-pass" not in dumped and "**********" in dumped
    assert "s3cr3t-token" not in repr(s) and "s3cr3t-token" not in str(s)
    assert s.tracking.token.get_secret_value() == "s3cr3t-token"


def test_secrets_from_files_named_by_environment_variables(monkeypatch, tmp_path):
    (tmp_path / "token").write_text('from-"file"\\ \n')
    (tmp_path / "kafka").write_text("kafka-file-pass")
    monkeypatch.setenv("STREAMSCORE_TRACKING__TOKEN_FILE", str(tmp_path / "token"))
    monkeypatch.setenv("STREAMSCORE_SOURCE__KAFKA__SASL_PASSWORD_FILE", str(tmp_path / "kafka"))
    s = load_settings()
    assert s.tracking.token.get_secret_value() == 'from-"file"\\ '  # only the line end is dropped
    assert s.source.kafka.sasl_password.get_secret_value() == "kafka-file-pass"
    assert "kafka-file-pass" not in json.dumps(s.masked())
    monkeypatch.setenv("STREAMSCORE_TRACKING__TOKEN", "from-env")  # the plain variable wins
    assert load_settings().tracking.token.get_secret_value() == "from-env"
    monkeypatch.setenv("STREAMSCORE_TRACKING__MIRROR_TOKEN_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=r"tracking\.mirror_token: cannot read the file named by STREAMSCORE_"):
        load_settings()


def test_azure_uri_is_built_and_incomplete_target_is_named():
    s = load_settings(
        "azure",
        overrides=[
            "tracking.azure.subscription_id=sub",
            "tracking.azure.resource_group=rg",
            "tracking.azure.workspace=ws",
            "tracking.azure.region=westeurope",
        ],
    )
    assert s.tracking.effective_uri() == (
        "azureml://westeurope.api.azureml.ms/mlflow/v2.0/subscriptions/sub/resourceGroups/rg"
        "/providers/Microsoft.MachineLearningServices/workspaces/ws"
    )
    s = load_settings("azure", overrides=["tracking.azure.subscription_id=sub"])
    with pytest.raises(ConfigError, match="tracking.azure.resource_group"):
        s.tracking.effective_uri()


def test_cli_reports_config_error_with_key_and_json_last_line():
    proc = subprocess.run(
        [sys.executable, "-m", "streamscore", "stream", "--set", "sink.bogus=1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "sink.bogus: unknown key" in proc.stderr
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last["status"] == "FAILED" and "sink.bogus" in last["error"]


def test_credentials_in_free_form_options_are_masked():
    jaas = 'org.apache.kafka.common.security.scram.ScramLoginModule required username="u" password="p@ss-9";'
    s = load_settings(
        overrides={
            "source": {"kafka": {"options": {"kafka.sasl.jaas.config": jaas, "kafka.security.protocol": "SASL_SSL"}}},
            "spark": {"conf": {"spark.hadoop.fs.azure.account.key.acct": "azure-key-123"}},
        }
    )
    dumped = json.dumps(s.masked())
    assert "p@ss-9" not in dumped and "azure-key-123" not in dumped
    assert s.masked()["source"]["kafka"]["options"]["kafka.security.protocol"] == "SASL_SSL"
    assert s.source.kafka.options["kafka.sasl.jaas.config"] == jaas  # the job itself still gets the value


def test_a_version_number_given_as_a_number_is_a_model_reference():
    """``--set model.ref=3`` reads as YAML's number 3: it is version "3", as documented."""
    assert load_settings(overrides=["model.ref=3"]).model.ref == "3"
    with pytest.raises(ConfigError, match=r"model\.ref"):
        load_settings(overrides=["model.ref=true"])


def test_the_kafka_consumers_fetch_wait_is_the_setting_and_an_explicit_option_wins():
    """``source.kafka.fetch_max_wait_ms`` becomes the consumers' ``fetch.max.wait.ms`` (stream and
    backfill read through the same options); a ``kafka.fetch.max.wait.ms`` in ``options`` wins."""
    from streamscore.scoring.io import kafka_options

    assert kafka_options(load_settings().source.kafka)["kafka.fetch.max.wait.ms"] == "10"
    tuned = load_settings(overrides=["source.kafka.fetch_max_wait_ms=100"])
    assert kafka_options(tuned.source.kafka)["kafka.fetch.max.wait.ms"] == "100"
    explicit = load_settings(overrides={"source": {"kafka": {"options": {"kafka.fetch.max.wait.ms": "250"}}}})
    assert kafka_options(explicit.source.kafka)["kafka.fetch.max.wait.ms"] == "250"
    with pytest.raises(ConfigError, match="fetch_max_wait_ms"):
        load_settings(overrides=["source.kafka.fetch_max_wait_ms=-1"])
