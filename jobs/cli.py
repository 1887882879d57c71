"""``streamscore``: one console script, a subcommand per job. Every job's last stdout line is JSON."""

from __future__ import annotations

import argparse
import sys

from jobs import backfill, bench, demo, models, produce, services, stream

COMMANDS = {
    "stream": (stream, "continuous scoring of a Kafka topic or Delta table into Delta"),
    "backfill": (backfill, "score a bounded Delta table or Kafka range with the same pipeline, idempotently"),
    "demo": (demo, "local services + demo model + stream with a live model swap"),
    "services": (services, "start/stop/status of the local Kafka broker and MLflow server"),
    "produce": (produce, "send demo events to Kafka"),
    "model": (models, "register the demo model, or move an alias"),
    "bench": (bench, "throughput vs mlflow spark_udf, and memory across model swaps"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="streamscore", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (mod, help_) in COMMANDS.items():
        mod.build_parser(sub.add_parser(name, help=help_, description=mod.__doc__))
    if not argv or argv[0] not in COMMANDS:
        parser.print_help() if not argv or argv[0] in ("-h", "--help") else parser.parse_args(argv)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    mod = COMMANDS[argv[0]][0]
    return mod.main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
