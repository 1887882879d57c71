"""``streamscore produce``: send demo events (iris rows as JSON) to the Kafka topic."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from streamscore.jobs.common import ArgumentParser, Summary, add_settings_args, prepare, run_command


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or ArgumentParser(prog="streamscore produce", description=__doc__)
    add_settings_args(p)
    p.add_argument("--count", type=int, default=1000, help="events to send (default 1000)")
    p.add_argument("--rate", type=float, default=0, help="events per second (default: as fast as possible)")
    p.add_argument(
        "--malformed-every",
        type=int,
        default=0,
        help="make every Nth event malformed (bad JSON, missing field, wrong type)",
    )
    p.add_argument("--prefix", help="event id prefix (default: evt<unix time>)")
    return p


def _run(args: argparse.Namespace) -> Summary:
    from streamscore.demo import ensure_topic, produce_events

    s = prepare(args, "produce")
    k = s.source.kafka
    ensure_topic(k.bootstrap_servers, k.topic)
    r = produce_events(k.bootstrap_servers, k.topic, args.count, args.malformed_every, args.rate, args.prefix)
    return {
        "job": "produce",
        "status": "OK",
        "topic": r.topic,
        "sent": r.sent,
        "valid": r.valid,
        "malformed": r.malformed,
        "seconds": round(r.seconds, 3),
        "events_per_s": round(r.sent / r.seconds, 1) if r.seconds else None,
    }


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("produce", build_parser, _run, argv)
