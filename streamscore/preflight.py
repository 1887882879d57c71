"""Start-up checks of the services a stream needs, each within ``app.preflight_timeout_s``, so that
a wrong address or a missing topic stops the job at once with an error naming the service and the
setting to change (instead of a query that waits forever for a broker).

* Kafka source: the broker answers and the topic exists;
* tracking: the MLflow tracking server answers (skipped for ``databricks`` / ``azureml`` targets,
  whose clients authenticate and retry on their own);
* registry: ``model.ref`` resolves to a version of ``model.name``;
* catalog: the metastore answers, when tables are named;
* output: the tables' and the checkpoint's local folders can be written (paths on a URI are left
  to the job, which fails on its first write with the storage's own error).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from streamscore.errors import SinkError, SourceError, StreamscoreError

if TYPE_CHECKING:
    from streamscore.conf.settings import Settings

log = logging.getLogger(__name__)

# the Kafka client's own log lines are library output (the log file), not the project's
_client_log = logging.getLogger("kafka.client")


class TrackingUnreachable(StreamscoreError):
    """The tracking server does not answer."""


class ModelUnavailable(StreamscoreError):
    """The model registry does not answer, or ``model.ref`` does not resolve there."""


def check_stream_services(settings: Settings) -> None:
    if settings.source.kind == "kafka":
        check_kafka(settings)
    check_kafka_sink(settings)
    check_tracking(settings)
    check_model(settings)
    check_catalog(settings)
    paths = [t.path for t in (settings.output_table, settings.dead_letter_table) if t.path is not None]
    check_writable(settings, [*paths, settings.checkpoint_path])


def check_catalog(settings: Settings) -> None:
    """The configured metastore answers, when the job names tables (a Hive client would retry and
    then fail at the first table with an error that does not say which setting to change)."""
    import socket

    from streamscore.errors import SinkError

    cat = settings.catalog
    if not settings.uses_catalog:
        return
    host, port = cat.metastore.removeprefix("thrift://").rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=settings.app.preflight_timeout_s).close()
    except OSError as e:
        hint = "start it with `streamscore services start metastore`" if cat.local else "check catalog.metastore"
        raise SinkError(
            f"the catalog's metastore at {cat.metastore} does not answer ({e}); the tables "
            f"{', '.join(settings.table_names) or '(names)'} are looked up there: {hint}"
        ) from None


def librdkafka_config(settings: Settings) -> dict[str, Any] | None:
    """The source's client settings for librdkafka, or None when they cannot be translated (Java-only
    options such as a JAAS config: the broker check is then left to Spark)."""
    k = settings.source.kafka
    return _librdkafka(k.bootstrap_servers, k.options, k)


def _librdkafka(bootstrap: str, options: dict[str, str], k: Any) -> dict[str, Any] | None:
    """librdkafka settings for ``bootstrap`` with the ``kafka.*`` ``options`` and the SASL login
    of ``k`` (a source's or sink's settings); None when an option has no librdkafka twin."""
    conf: dict[str, Any] = {"bootstrap.servers": bootstrap, "logger": _client_log}
    for key, value in options.items():
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
                "sasl.mechanism": conf.get("sasl.mechanism", k.sasl_mechanism),
                "sasl.username": k.sasl_username or "",
                "sasl.password": k.sasl_password.get_secret_value(),
            }
        )
        conf.setdefault("security.protocol", k.security_protocol)
    return conf


def _sink_client(settings: Settings) -> tuple[str, dict[str, Any] | None]:
    """The Kafka sink's broker and its librdkafka settings (None: options only the Java client has),
    by the writer's own rule (:func:`streamscore.scoring.io.kafka_sink_connection`)."""
    from streamscore.scoring.io import kafka_sink_connection

    bootstrap, login, options = kafka_sink_connection(settings)
    return bootstrap, _librdkafka(bootstrap, options, login)


def topic_message_limit(settings: Settings, topics: list[str]) -> int | None:
    """The smallest ``max.message.bytes`` of ``topics`` (the broker's default where a topic sets
    none), or None when it cannot be read (a Java-only option, no answer, no permission)."""
    from confluent_kafka.admin import AdminClient, ConfigResource

    _, conf = _sink_client(settings)
    if conf is None:
        return None
    try:
        admin = AdminClient(conf)
        resources = [ConfigResource(ConfigResource.Type.TOPIC, t) for t in topics]
        limits = []
        for future in admin.describe_configs(resources).values():
            entry = future.result(timeout=settings.app.preflight_timeout_s).get("max.message.bytes")
            if entry is None or entry.value is None:
                return None
            limits.append(int(entry.value))
        return min(limits) if limits else None
    except Exception as e:  # noqa: BLE001 - without it the producer's own limit applies
        log.info("Kafka sink: the topics' max.message.bytes could not be read (%s: %s)", type(e).__name__, e)
        return None


def check_kafka_sink(settings: Settings) -> None:
    """With ``sink.kafka.topic``: the output broker answers and the topics exist (Spark's writer would
    otherwise wait for a missing topic's metadata for a minute, in the first batch)."""
    sink = settings.sink.kafka
    if sink.topic is None:
        return
    bootstrap, conf = _sink_client(settings)
    if conf is None:
        log.info("pre-flight: Kafka sink options need the Java client; broker check left to Spark")
        return
    topics = _topics_on(
        conf, settings, SinkError, f"{bootstrap} (sink.kafka)", "check sink.kafka.bootstrap_servers and its login"
    )
    for key, topic in (("topic", sink.topic), ("dead_letter_topic", sink.dead_letter_topic)):
        if topic is not None and topic not in topics:
            raise SinkError(
                f"Kafka topic {topic!r} (sink.kafka.{key}) does not exist on {bootstrap}; create it "
                f"(kafka-topics.sh --create) or fix sink.kafka.{key}"
            )
    log.info("pre-flight: Kafka sink broker %s answers, topic %s exists", bootstrap, sink.topic)


def _topics_on(conf: dict[str, Any], settings: Settings, error: type[Exception], broker: str, hint: str) -> Any:
    """The topics of the broker ``conf`` reaches, or ``error`` saying it did not answer in time."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    timeout = settings.app.preflight_timeout_s
    try:
        return AdminClient(conf).list_topics(timeout=timeout).topics
    except KafkaException as e:
        raise error(
            f"Kafka broker at {broker} did not answer within {timeout:g}s ({e.args[0].str()}); {hint}"
        ) from None


def check_kafka(settings: Settings) -> None:
    k = settings.source.kafka
    conf = librdkafka_config(settings)
    if conf is None:
        log.info("pre-flight: Kafka options need the Java client; broker check left to Spark")
        return
    hint = "check source.kafka.bootstrap_servers (and that the broker runs: streamscore services start kafka)"
    topics = _topics_on(conf, settings, SourceError, k.bootstrap_servers, hint)
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
        from streamscore.credentials import token_for

        url = uri.rstrip("/") + "/health"
        token = token_for(url)  # the target's own token, as for its other requests
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout):
            pass
    except urllib.error.HTTPError:
        pass  # it answers (a server without /health, or behind auth): the client will say more
    except (OSError, ValueError) as e:
        raise TrackingUnreachable(
            f"MLflow tracking server at {uri} did not answer within {timeout:g}s ({e}); check tracking.uri "
            "(and that the server runs: streamscore services start mlflow)"
        ) from None
    log.info("pre-flight: tracking server %s answers", uri)


def check_model(settings: Settings) -> None:
    """``model.ref`` resolves, within the pre-flight limit (the client's own retries included)."""
    from mlflow import MlflowClient

    from streamscore.deadline import run_within
    from streamscore.registry_watch.resolve import ModelRef, resolve_version

    m, timeout = settings.model, settings.app.preflight_timeout_s
    registry = settings.tracking.effective_registry_uri()
    ref = ModelRef.parse(m.ref)
    outcome = run_within(
        lambda: resolve_version(MlflowClient(registry_uri=registry), m.name, ref).version,
        timeout,
        "streamscore-preflight-registry",
    )
    if not outcome.finished:
        raise ModelUnavailable(
            f"model registry at {registry} did not resolve {m.name!r} {ref} within {timeout:g}s; "
            "check tracking.registry_uri / tracking.uri (or raise app.preflight_timeout_s)"
        )
    if outcome.error is not None:
        raise ModelUnavailable(
            f"model {m.name!r} {ref} does not resolve at {registry}: {outcome.error}; register a version (and "
            "set the alias), or fix model.name / model.ref"
        ) from None
    log.info("pre-flight: %s %s is version %s", m.name, ref, outcome.value)


def check_writable(settings: Settings, paths: list[str]) -> None:
    import os
    from pathlib import Path

    from streamscore.errors import SinkError

    for raw in paths:
        if "://" in raw or raw.startswith("dbfs:"):
            continue
        path = Path(raw)
        existing = next((p for p in (path, *path.parents) if p.exists()), None)
        if existing is None or not os.access(existing, os.W_OK | os.X_OK) or not existing.is_dir():
            raise SinkError(
                f"cannot write {raw} ({existing} is not a writable folder); check sink.output_path, "
                "sink.dead_letter_path, sink.checkpoint_path and app.home"
            )
