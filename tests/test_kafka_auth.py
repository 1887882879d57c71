"""SASL/PLAIN against a real broker with a SASL_PLAINTEXT listener. The password holds a quote, a
backslash and a semicolon: the broker's JAAS line is written out by hand here (so a quoting bug in
the job cannot be mirrored on the broker side), and the job must log in with it, in pre-flight
(librdkafka) and in Spark's Kafka source (the Java client, through the JAAS string it builds)."""

from __future__ import annotations

import pytest

from streamscore.demo import ensure_topic, produce_events, train_and_register
from streamscore.streaming import run_stream

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
    s = make_settings(
        trigger={"available_now": True},
        app={"preflight_timeout_s": 10},
        source={"kafka": {**sasl, "sasl_password": PASSWORD}},
    )
    train_and_register(s.model.name, "v1", alias="champion")
    topic = s.source.kafka.topic
    ensure_topic(sasl_broker.address, topic)  # set up through the plain listener
    sent = produce_events(sasl_broker.address, topic, 120, malformed_every=30, prefix="sasl")

    summary = run_stream(s)
    assert (summary["rows_in"], summary["rows_scored"]) == (120, sent.valid)
    assert PASSWORD not in str(summary)

    wrong = make_settings(
        s.model.name,
        trigger={"available_now": True},
        app={"preflight_timeout_s": 10},
        source={"kafka": {**sasl, "sasl_password": PASSWORD + "x", "topic": topic}},
    )
    with pytest.raises(JobFailed) as info:
        run_stream(wrong)
    assert PASSWORD not in info.value.summary["error"]
