"""``streamscore backfill``: score a bounded input with the stream's pipeline, idempotently.

Input: ``--delta PATH`` or ``--table NAME`` (optionally ``--as-of-version``/``--as-of-timestamp``, ``--where SQL``) or
``--kafka`` (the configured topic; ``--starting-offsets``/``--ending-offsets`` as Spark offset
specs: ``earliest``, ``latest`` or JSON like ``{"topic":{"0":10,"1":12}}``; or
``--starting-timestamp``/``--ending-timestamp`` in epoch milliseconds). The model reference
(``--model-ref``, default ``model.ref``) is resolved once. A rerun with the same input, range and
version replaces its own slice of the output (``--output`` PATH or ``--output-table`` NAME);
``--compare-with REF`` also scores the input with a second version and reports agreement and the
prediction distribution shift to MLflow."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from streamscore.conf.settings import BackfillRequest
from streamscore.jobs.common import ArgumentParser, Summary, add_settings_args, prepare, run_command


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or ArgumentParser(prog="streamscore backfill", description=__doc__)
    add_settings_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--delta", metavar="PATH", help="Delta table to score, by path")
    src.add_argument("--table", metavar="NAME", help="Delta table to score, by catalog name (schema.table)")
    src.add_argument("--kafka", action="store_true", help="score a range of the configured Kafka topic")
    p.add_argument("--as-of-version", type=int, help="Delta time travel: table version")
    p.add_argument("--as-of-timestamp", help="Delta time travel: timestamp")
    p.add_argument("--where", help="Delta: SQL filter on the table's columns (e.g. an event-time range)")
    p.add_argument("--starting-offsets", default="earliest", help="Kafka: start offsets (inclusive)")
    p.add_argument("--ending-offsets", default="latest", help="Kafka: end offsets (exclusive)")
    p.add_argument("--starting-timestamp", type=int, help="Kafka: start at this epoch-ms timestamp")
    p.add_argument("--ending-timestamp", type=int, help="Kafka: end at this epoch-ms timestamp")
    p.add_argument("--model-ref", help="@alias, stage:<Stage>, latest or a version (default: model.ref)")
    p.add_argument("--backfill-id", help="name of this run's output slice (letters, digits, . _ -; default: derived)")
    p.add_argument("--compare-with", metavar="REF", help="second version/alias to compare predictions with")
    p.add_argument("--chunks", type=int, default=1, help="score in N parts, each written when done (default 1)")
    p.add_argument("--output", help="output Delta table (default <home>/tables/backfill)")
    p.add_argument("--dead-letter", help="dead-letter Delta table (default <home>/tables/backfill_dead_letter)")
    p.add_argument("--output-table", metavar="NAME", help="output table by catalog name, instead of --output")
    p.add_argument("--dead-letter-table", metavar="NAME", help="dead-letter table by catalog name")
    p.add_argument(
        "--kafka-topic",
        metavar="TOPIC",
        help="also send the scored rows to this Kafka topic (sink.kafka's broker and login, header "
        "streamscore.backfill)",
    )
    return p


def request_from_args(args: argparse.Namespace) -> BackfillRequest:
    inp: dict[str, Any]
    if args.delta or args.table:
        inp = {
            "kind": "delta",
            "path": args.delta,
            "table": args.table,
            "version": args.as_of_version,
            "timestamp": args.as_of_timestamp,
            "where": args.where,
        }
    else:
        inp = {
            "kind": "kafka",
            "starting": args.starting_offsets,
            "ending": args.ending_offsets,
            "starting_timestamp": args.starting_timestamp,
            "ending_timestamp": args.ending_timestamp,
        }
    return BackfillRequest.of(
        input=inp,
        model_ref=args.model_ref,
        backfill_id=args.backfill_id,
        compare_with=args.compare_with,
        chunks=args.chunks,
        output_path=args.output,
        dead_letter_path=args.dead_letter,
        output_table=args.output_table,
        dead_letter_table=args.dead_letter_table,
        kafka_topic=args.kafka_topic,
    )


def _run(args: argparse.Namespace) -> Summary:
    from streamscore.backfill import run_backfill

    request = request_from_args(args)  # a bad option stops here, before Spark starts
    return run_backfill(prepare(args, "backfill"), request)


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("backfill", build_parser, _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
