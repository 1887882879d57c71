"""``streamscore demo``: the whole product on this machine, end to end.

Starts the local Kafka broker and MLflow server, trains and registers the iris demo model as
version N with alias ``champion``, streams demo events (some malformed) through the scoring job,
and while the stream runs registers a second version and moves ``champion`` to it: the running
query swaps models between micro-batches without a restart. Prints where the results are."""

from __future__ import annotations

import argparse
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from streamscore.jobs.common import ArgumentParser, Summary, add_settings_args, prepare, run_command

if TYPE_CHECKING:
    from streamscore.conf.settings import Settings
    from streamscore.streaming import StreamHandle

log = logging.getLogger("streamscore.jobs.demo")


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or ArgumentParser(prog="streamscore demo", description=__doc__)
    add_settings_args(p)
    p.add_argument("--events", type=int, default=6000, help="events per run, half before the swap (default 6000)")
    p.add_argument("--rate", type=float, default=1500, help="events per second (default 1500)")
    p.add_argument("--malformed-every", type=int, default=40, help="every Nth event is malformed (default 40)")
    p.add_argument("--timeout", type=float, default=600, help="give up after this many seconds (default 600)")
    p.add_argument("--no-swap", action="store_true", help="do not register a second version mid-stream")
    return p


class Scenario:
    """Send half the events, register and promote a second version once the first one has scored
    rows, wait until the watcher has seen it, send the other half. Runs beside the stream."""

    def __init__(self, settings: Settings, args: argparse.Namespace, tag: str, v1: str):
        self.settings, self.args, self.tag, self.v1 = settings, args, tag, v1
        self.sent = self.valid = self.malformed = 0
        self.v2: str | None = None
        self.error: str | None = None
        self.done = False
        self.deadline = time.time() + args.timeout
        self.stream: StreamHandle | None = None

    def start(self, stream: StreamHandle) -> None:
        self.stream = stream
        threading.Thread(target=self._run, name="demo-scenario", daemon=True).start()

    def _send(self, count: int, start: int) -> None:
        from streamscore.demo import produce_events

        k = self.settings.source.kafka
        r = produce_events(
            k.bootstrap_servers,
            k.topic,
            count,
            self.args.malformed_every,
            self.args.rate,
            prefix=f"demo-{self.tag}",
            start=start,
        )
        self.sent += r.sent
        self.valid += r.valid
        self.malformed += r.malformed

    def _wait(self, cond: Callable[[], bool]) -> None:
        while not cond():
            if time.time() > self.deadline:
                raise TimeoutError("demo scenario timed out")
            time.sleep(0.2)

    def _swap(self) -> None:
        from streamscore.demo import promote, train_and_register

        assert self.stream is not None
        processor, watcher = self.stream.processor, self.stream.watcher
        self._wait(lambda: processor.rows_by_version.get(self.v1, 0) > 0)
        log.info("demo: registering a second model version while the stream runs")
        self.v2 = train_and_register(self.settings.model.name, "v2", alias=None)
        promote(self.settings.model.name, self.v2, "champion")
        log.info("demo: champion -> version %s", self.v2)
        self._wait(lambda: watcher.swap_pending or bool(watcher.swaps) or bool(watcher.refusals))

    def _run(self) -> None:
        first = self.args.events // 2
        try:
            self._send(first, 0)
            if not self.args.no_swap:
                self._swap()
            self._send(self.args.events - first, first)
        except Exception as e:
            log.exception("demo scenario failed")
            self.error = f"{type(e).__name__}: {e}"
        self.done = True

    def should_stop(self) -> bool:
        if self.error or time.time() > self.deadline:
            return True
        p = self.stream.processor if self.stream else None
        return bool(p and self.done and p.totals["rows_in"] >= self.sent)

    def verdict(self, summary: Summary) -> Summary:
        accounted = (
            summary.get("rows_in") == self.sent
            and summary.get("rows_scored") == self.valid
            and summary.get("rows_dead_lettered") == self.malformed
        )
        summary.update(
            events_sent=self.sent, events_valid=self.valid, events_malformed=self.malformed, all_accounted_for=accounted
        )
        problem = self.error
        if problem is None and not accounted:
            problem = "timed out" if time.time() > self.deadline else "events unaccounted for"
        if problem is None and not self.args.no_swap and not summary.get("swaps"):
            problem = "no swap happened"
        if problem is not None:
            summary.update(status="FAILED", error=problem)
        return summary


def _run(args: argparse.Namespace) -> Summary:
    from streamscore.demo import ensure_topic, train_and_register
    from streamscore.jobs.services import start_all
    from streamscore.streaming import run_stream
    from streamscore.tracking import configure_mlflow

    tag = time.strftime("%Y%m%d-%H%M%S")
    settings = prepare(
        args,
        "demo",
        [
            f"source.kafka.topic=streamscore-demo-{tag}",
            f"sink.checkpoint_path=checkpoints/demo-{tag}",
            "trigger.processing_time=2 seconds",
            "watch.poll_interval_s=1",
        ],
    )
    log.info("starting local services under %s", settings.home)
    start_all(settings)
    configure_mlflow(settings)
    v1 = train_and_register(settings.model.name, "v1", alias="champion")
    ensure_topic(settings.source.kafka.bootstrap_servers, settings.source.kafka.topic)
    scenario = Scenario(settings, args, tag, v1)
    summary = scenario.verdict(
        run_stream(settings, should_stop=scenario.should_stop, on_ready=scenario.start, job="demo")
    )
    log.info(
        "results: scored rows in %s, dead letters in %s, metrics at %s (experiment %r, run %s)",
        summary.get("output_table"),
        summary.get("dead_letter_table"),
        summary.get("tracking_uri"),
        summary.get("experiment"),
        summary.get("run_id"),
    )
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("demo", build_parser, _run, argv)
