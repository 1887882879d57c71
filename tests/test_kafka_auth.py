"""SASL/PLAIN against a real broker with a SASL_PLAINTEXT listener. The password holds a quote, a
backslash and a semicolon: the broker's JAAS line is written out by hand here (so a quoting bug in
the job cannot be mirrored on the broker side), and the job must log in with it, in pre-flight
(librdkafka) and in Spark's Kafka source (the Java client, through the JAAS string it builds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streamscore.demo import ensure_topic, produce_events, train_and_register
from streamscore.streaming import run_stream
from tests.helpers import read_topic, unique

pytestmark = pytest.mark.integration

PASSWORD = 'p"a\\ss;word'  # p " a \ s s ; w o r d
# in server.properties a backslash is itself escaped: the JAAS text is  user_alice="p\"a\\ss;word"
BROKER_JAAS = (
    "org.apache.kafka.common.security.plain.PlainLoginModule required "
    'username="broker" password="broker-pw" user_broker="broker-pw" user_alice="p\\\\"a\\\\\\\\ss;word";'
)


@pytest.fixture
def sasl_broker(home):
    from streamscore.infra.services import KafkaService, start_on_free_ports

    broker = start_on_free_ports(
        lambda p: KafkaService(home / "sasl-broker", p[0], p[1], sasl_port=p[2], sasl_jaas=BROKER_JAAS), 3
    )
    yield broker
    broker.stop()


def test_the_stream_logs_in_with_a_password_that_needs_quoting(spark, make_settings, sasl_broker):
    from streamscore.errors import JobFailed

    sasl = {
        "bootstrap_servers": sasl_broker.sasl_address,
        "sasl_username": "alice",
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "PLAIN",
    }
    out_topic = unique("scored-sasl")
    s = make_settings(
        trigger={"available_now": True},
        app={"preflight_timeout_s": 10},
        source={"kafka": {**sasl, "sasl_password": PASSWORD}},
        # the scored events back to the same broker with a login of the sink's own (sink.kafka)
        sink={"kafka": {**sasl, "sasl_password": PASSWORD, "topic": out_topic}},
    )
    train_and_register(s.model.name, "v1", alias="champion")
    topic = s.source.kafka.topic
    for t in (topic, out_topic):
        ensure_topic(sasl_broker.address, t)  # set up through the plain listener
    sent = produce_events(sasl_broker.address, topic, 120, malformed_every=30, prefix="sasl")

    summary = run_stream(s)
    assert (summary["rows_in"], summary["rows_scored"]) == (120, sent.valid)
    assert PASSWORD not in str(summary)
    scored = [json.loads(m.value())["event_id"] for m in read_topic(sasl_broker.address, out_topic)]
    assert sorted(scored) == sorted(sent.valid_ids)

    wrong = make_settings(
        s.model.name,
        trigger={"available_now": True},
        app={"preflight_timeout_s": 10},
        source={"kafka": {**sasl, "sasl_password": PASSWORD + "x", "topic": topic}},
    )
    with pytest.raises(JobFailed) as info:
        run_stream(wrong)
    assert PASSWORD not in info.value.summary["error"]


@pytest.mark.heavy
def test_no_secret_appears_in_anything_a_run_leaves(make_settings, sasl_broker, tmp_path):
    """A real job (the command, in its own process) with every kind of secret configured, from the
    environment and from files: the console, the log files, the tables and checkpoint, and both
    tracking runs (params, tags, artifacts) are searched for each of them."""
    import os
    import subprocess

    from mlflow import MlflowClient

    from tests.faultproxy import FaultProxy
    from tests.helpers import stream_command

    secrets = {
        "kafka password": PASSWORD,
        "kafka option": "opt-truststore-pw-5519",
        "tracking token": "trk-token-8812",
        "mirror token": "mirror-token-4471",
        "webhook secret": "hook-secret-3390",
        "azure client secret": "az-client-secret-2264",
    }
    s = make_settings()
    train_and_register(s.model.name, "v1", alias="champion")
    ensure_topic(sasl_broker.address, s.source.kafka.topic)
    sent = produce_events(sasl_broker.address, s.source.kafka.topic, 90, malformed_every=30, prefix="leak")
    (tmp_path / "token").write_text(secrets["tracking token"] + "\n")
    env = {
        **os.environ,
        "STREAMSCORE_SOURCE__KAFKA__SASL_PASSWORD": PASSWORD,
        "STREAMSCORE_SOURCE__KAFKA__OPTIONS": json.dumps({"kafka.ssl.truststore.password": secrets["kafka option"]}),
        "STREAMSCORE_TRACKING__TOKEN_FILE": str(tmp_path / "token"),
        "STREAMSCORE_TRACKING__MIRROR_TOKEN": secrets["mirror token"],
        "STREAMSCORE_WATCH__WEBHOOK__SECRET": secrets["webhook secret"],
        "AZURE_CLIENT_SECRET": secrets["azure client secret"],
    }
    home = tmp_path / "home"
    mirror = FaultProxy(s.tracking.uri).start()  # a second target: the same server, its own run
    try:
        proc = subprocess.run(
            stream_command(
                s,
                home,
                "--available-now",
                source__kafka__bootstrap_servers=sasl_broker.sasl_address,
                source__kafka__sasl_username="alice",
                source__kafka__security_protocol="SASL_PLAINTEXT",
                source__kafka__sasl_mechanism="PLAIN",
                tracking__mirror_uri=mirror.address,
                watch__webhook__enabled="true",
            ),
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )
    finally:
        mirror.stop()
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["rows_scored"] == sent.valid and summary["mirror_run_id"]

    left: dict[str, str] = {"stdout": proc.stdout, "stderr": proc.stderr}
    for root in (home, tmp_path):  # log files, tables, checkpoint
        for f in root.rglob("*"):
            if f.is_file() and f.name != "token":
                left[str(f)] = f.read_bytes().decode("utf-8", errors="replace")
    client = MlflowClient(s.tracking.uri)
    for run_id in (summary["run_id"], summary["mirror_run_id"]):
        run = client.get_run(run_id)
        left[f"{run_id} params"] = json.dumps(run.data.params)
        left[f"{run_id} tags"] = json.dumps(run.data.tags)
        for f in Path(client.download_artifacts(run_id, "", str(tmp_path.parent / f"art-{run_id}"))).rglob("*"):
            if f.is_file():
                left[f"{run_id} artifact {f.name}"] = f.read_text(errors="replace")
        assert run.data.params["source.kafka.options.kafka.ssl.truststore.password"] == "**********"
    assert any(name.endswith(".log") for name in left), "the run's log file was searched"
    found = [(what, where) for what, secret in secrets.items() for where, text in left.items() if secret in text]
    assert found == []
    assert {auth for _, _, auth in mirror.seen} == {f"Bearer {secrets['mirror token']}"}
