"""``streamscore stream``: continuous scoring of a Kafka topic (or Delta table) into Delta."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from streamscore.jobs.common import ArgumentParser, Summary, add_settings_args, prepare, run_command


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or ArgumentParser(prog="streamscore stream", description=__doc__)
    add_settings_args(p)
    p.add_argument("--available-now", action="store_true", help="score what is there, then stop")
    p.add_argument("--max-batches", type=int, help="stop after N micro-batches")
    return p


def _run(args: argparse.Namespace) -> Summary:
    from streamscore.streaming import run_stream

    extra = []
    if args.available_now:
        extra.append("trigger.available_now=true")
    if args.max_batches is not None:
        extra.append(f"trigger.max_batches={args.max_batches}")
    return run_stream(prepare(args, "stream", extra))


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("stream", build_parser, _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
