"""Start-up checks of the services a stream needs, each within ``app.preflight_timeout_s``, so that
a wrong address or a missing topic stops the job at once with an error naming the service and the
setting to change (instead of a query that waits forever for a broker).

* Kafka source: the broker answers and the topic exists;
* tracking: the MLflow tracking server answers (skipped for ``databricks`` / ``azureml`` targets,
  whose clients authenticate and retry on their own).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from streamscore.errors import SourceError, StreamscoreError

if TYPE_CHECKING:
    from streamscore.conf.settings import Settings

log = logging.getLogger(__name__)

# the Kafka client's own log lines are library output (the log file), not the project's
_client_log = logging.getLogger("kafka.client")


class TrackingUnreachable(StreamscoreError):
    """The tracking server does not answer."""


def check_stream_services(settings: Settings) -> None:
    if settings.source.kind == "kafka":
        check_kafka(settings)
    check_tracking(settings)


def _librdkafka_config(settings: Settings) -> dict[str, Any] | None:
    """The source's client settings for librdkafka, or None when they cannot be translated (Java-only
    options such as a JAAS config: the broker check is then left to Spark)."""
    k = settings.source.kafka
    conf: dict[str, Any] = {"bootstrap.servers": k.bootstrap_servers, "logger": _client_log}
    for key, value in k.options.items():
        if not key.startswith("kafka."):
            continue
        name = key[len("kafka.") :]
        if name in ("security.protocol", "sasl.mechanism", "ssl.ca.location", "client.id"):
            conf[name] = value
        else:
            return None
    if k.sasl_password is not None:
        conf.update(
            {
                "sasl.mechanism": conf.get("sasl.mechanism", "PLAIN"),
                "sasl.username": k.sasl_username or "",
                "sasl.password": k.sasl_password.get_secret_value(),
            }
        )
        conf.setdefault("security.protocol", "SASL_SSL")
    return conf


def check_kafka(settings: Settings) -> None:
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    k, timeout = settings.source.kafka, settings.app.preflight_timeout_s
    conf = _librdkafka_config(settings)
    if conf is None:
        log.info("pre-flight: Kafka options need the Java client; broker check left to Spark")
        return
    try:
        topics = AdminClient(conf).list_topics(timeout=timeout).topics
    except KafkaException as e:
        raise SourceError(
            f"Kafka broker at {k.bootstrap_servers} did not answer within {timeout:g}s ({e.args[0].str()}); "
            "check source.kafka.bootstrap_servers (and that the broker runs: streamscore services start kafka)"
        ) from None
    if k.topic not in topics:
        raise SourceError(
            f"Kafka topic {k.topic!r} does not exist on {k.bootstrap_servers}; create it (e.g. kafka-topics.sh "
            "--create, or streamscore produce for the demo topic) or fix source.kafka.topic"
        )
    log.info("pre-flight: Kafka broker %s answers, topic %s exists", k.bootstrap_servers, k.topic)


def check_tracking(settings: Settings) -> None:
    import urllib.error
    import urllib.request

    uri, timeout = settings.tracking.effective_uri(), settings.app.preflight_timeout_s
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            pass
    except urllib.error.HTTPError:
        pass  # it answers (a server without /health, or behind auth): the client will say more
    except (OSError, ValueError) as e:
        raise TrackingUnreachable(
            f"MLflow tracking server at {uri} did not answer within {timeout:g}s ({e}); check tracking.uri "
            "(and that the server runs: streamscore services start mlflow)"
        ) from None
    log.info("pre-flight: tracking server %s answers", uri)
