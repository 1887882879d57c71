"""``streamscore services start|stop|status``: the local Kafka broker and MLflow server.

Ports follow the settings (``source.kafka.bootstrap_servers`` and ``tracking.uri``), state and logs
live under ``<app.home>/services/``."""

from __future__ import annotations

import argparse
from urllib.parse import urlparse

from jobs.common import add_settings_args, run_job, settings_from, setup_logging


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="streamscore services", description=__doc__)
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument("which", nargs="*", choices=["kafka", "mlflow", []], default=[],
                   help="services to act on (default: all)")
    add_settings_args(p)
    return p


def services_for(settings):
    from infra.services import KafkaService, MlflowService

    kafka_port = int(settings.source.kafka.bootstrap_servers.split(",")[0].rsplit(":", 1)[1])
    out = [KafkaService(settings.home, kafka_port)]
    uri = settings.tracking.uri or ""
    parsed = urlparse(uri)
    if parsed.scheme == "http" and parsed.hostname in ("127.0.0.1", "localhost"):
        out.append(MlflowService(settings.home, parsed.port or 80))
    return out


def start_all(settings) -> list[dict]:
    return [s.start() for s in services_for(settings)]


def _run(args) -> dict:
    settings = settings_from(args)
    services = [s for s in services_for(settings) if not args.which or s.name in args.which]
    results = [getattr(s, args.action)() for s in services]
    ok = all(r.get("healthy", True) for r in results) if args.action != "stop" else True
    return {"job": "services", "action": args.action, "status": "OK" if ok else "FAILED", "services": results}


def main(argv=None) -> int:
    setup_logging()
    return run_job(_run, build_parser().parse_args(argv))
