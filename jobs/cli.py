"""``streamscore``: one console script, a subcommand per job. Every job's last stdout line is JSON."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from types import ModuleType

from streamscore.errors import UsageError
from streamscore.jobs import backfill, bench, bundle, demo, models, produce, services, stream, submit
from streamscore.jobs.common import ArgumentParser, emit

COMMANDS: dict[str, tuple[ModuleType, str]] = {
    "stream": (stream, "continuous scoring of a Kafka topic or Delta table into Delta"),
    "backfill": (backfill, "score a bounded Delta table or Kafka range with the same pipeline, idempotently"),
    "submit": (submit, "run stream or backfill on Databricks with the project's wheel (databricks-sdk)"),
    "bundle": (bundle, "write the Databricks Asset Bundle's job resources from the same definition as submit"),
    "demo": (demo, "local services + demo model + stream with a live model swap"),
    "services": (services, "start/stop/status of the local Kafka broker and MLflow server; resolve the jars"),
    "produce": (produce, "send demo events to Kafka"),
    "model": (models, "register the demo model, or move an alias"),
    "bench": (bench, "throughput vs mlflow spark_udf, and memory across model swaps"),
}


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="streamscore", description=__doc__)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (mod, help_) in COMMANDS.items():
        mod.build_parser(sub.add_parser(name, help=help_, description=mod.__doc__))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in COMMANDS:
        return int(COMMANDS[args[0]][0].main(args[1:]))
    if args and args[0] in ("-h", "--help"):
        parser().print_help()
        return 0
    problem = f"unknown command {args[0]!r}" if args else "a command is required"
    error = UsageError(f"streamscore: {problem} (one of: {', '.join(COMMANDS)}; see streamscore --help)")
    print(error, file=sys.stderr)
    emit({"job": None, "status": "FAILED", "error": str(error)})
    return error.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
