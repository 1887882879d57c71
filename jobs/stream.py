"""``streamscore stream``: continuous scoring of a Kafka topic (or Delta table) into Delta."""

from __future__ import annotations

import argparse

from jobs.common import add_settings_args, run_job, settings_from, setup_logging


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="streamscore stream", description=__doc__)
    add_settings_args(p)
    p.add_argument("--available-now", action="store_true", help="score what is there, then stop")
    p.add_argument("--max-batches", type=int, help="stop after N micro-batches")
    return p


def _run(args) -> dict:
    from streamscore.app import run_stream

    extra = []
    if args.available_now:
        extra.append("trigger.available_now=true")
    if args.max_batches:
        extra.append(f"trigger.max_batches={args.max_batches}")
    settings = settings_from(args, extra)
    setup_logging(settings.app.log_level)
    return run_stream(settings)


def main(argv=None) -> int:
    setup_logging()
    return run_job(_run, build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
