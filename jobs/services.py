"""``streamscore services start|stop|status|jars``: the local Kafka broker, MLflow server and the
catalog's metastore (table names).

Ports follow the settings (``source.kafka.bootstrap_servers`` and ``tracking.uri``), state and logs
live under ``<app.home>/services/``. ``jars`` resolves the JVM jars (Spark's Kafka connector, Delta,
the Kafka broker) from Maven Central once into the local jar folder, and has the Spark driver's
class archive written (:mod:`streamscore.infra.cds`; in the background unless ``--wait``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from streamscore.jobs.common import ArgumentParser, Summary, add_settings_args, prepare, run_command

if TYPE_CHECKING:
    from streamscore.conf.settings import Settings
    from streamscore.infra.services import Service


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or ArgumentParser(prog="streamscore services", description=__doc__)
    p.add_argument("action", choices=["start", "stop", "status", "jars"])
    p.add_argument(
        "which",
        nargs="*",
        choices=["kafka", "mlflow", "metastore", []],
        default=[],
        help="services to act on (default: all)",
    )
    p.add_argument(
        "--wait", action="store_true", help="jars: wait for the class archive to be written (default: background)"
    )
    add_settings_args(p)
    return p


def services_for(settings: Settings) -> list[Service]:
    """The local services the settings point at: the broker, the tracking server on loopback, the
    local catalog's metastore (a loopback ``catalog.metastore``)."""
    from streamscore.infra.services import KafkaService, MetastoreService, MlflowService

    kafka_port = int(settings.source.kafka.bootstrap_servers.split(",")[0].rsplit(":", 1)[1])
    out: list[Service] = [KafkaService(settings.home, kafka_port)]
    uri = settings.tracking.uri or ""
    parsed = urlparse(uri)
    if parsed.scheme == "http" and parsed.hostname in ("127.0.0.1", "localhost"):
        out.append(MlflowService(settings.home, parsed.port or 80))
    if settings.catalog.local and settings.catalog.port:
        out.append(MetastoreService(settings.home, settings.catalog.port))
    return out


def _default(service: Service, settings: Settings) -> bool:
    """Acted on without naming it: the broker and the tracking server; the metastore when the
    settings name tables or it is running (else ``streamscore services start metastore``)."""
    return service.name != "metastore" or settings.uses_catalog or service.pid() is not None


def needed_services(settings: Settings) -> list[Service]:
    """The services a job with these settings needs (the metastore only when it names tables)."""
    return [s for s in services_for(settings) if _default(s, settings)]


def start_all(settings: Settings) -> list[dict[str, Any]]:
    """Start the needed services side by side (each its own process, port and folder): the wait
    is the slowest one's, not the sum. The first failure is raised once all have answered."""
    return _each(needed_services(settings), "start")


def _each(services: list[Service], action: str) -> list[dict[str, Any]]:
    from concurrent.futures import ThreadPoolExecutor

    if len(services) <= 1 or action != "start":
        return [getattr(s, action)() for s in services]
    with ThreadPoolExecutor(len(services), thread_name_prefix="streamscore-services") as pool:
        futures = [pool.submit(getattr(s, action)) for s in services]
    return [f.result() for f in futures]


def _run(args: argparse.Namespace) -> Summary:
    settings = prepare(args, "services")
    if args.action == "jars":
        from streamscore.infra import jars

        spark_jars = jars.ensure_spark_jars(settings.home)
        kafka_dir = jars.ensure_kafka_jars(settings.home)
        archive = "disabled"
        if settings.spark.class_archive:
            from streamscore.infra import cds
            from streamscore.spark import class_path_jars, spark_conf

            # keyed by the class path of a local driver JVM (the jars above, infra/localfs.py's)
            archive = cds.ensure_archive(class_path_jars(spark_conf(settings)), wait=args.wait)
        return {
            "job": "services",
            "action": "jars",
            "status": "OK",
            "spark_jars": len(spark_jars),
            "jar_folder": str(jars.jars_root()),
            "kafka_jars": len(list(kafka_dir.glob("*.jar"))),
            "class_archive": archive,
        }
    services = [s for s in services_for(settings) if s.name in args.which or (not args.which and _default(s, settings))]
    results = _each(services, args.action)
    ok = all(r.get("healthy", True) for r in results) if args.action != "stop" else True
    return {"job": "services", "action": args.action, "status": "OK" if ok else "FAILED", "services": results}


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("services", build_parser, _run, argv)
