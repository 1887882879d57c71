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

from jobs.common import add_settings_args, run_job, settings_from, setup_logging

log = logging.getLogger("jobs.demo")


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="streamscore demo", description=__doc__)
    add_settings_args(p)
    p.add_argument("--events", type=int, default=6000, help="events per run, half before the swap (default 6000)")
    p.add_argument("--rate", type=float, default=1500, help="events per second (default 1500)")
    p.add_argument("--malformed-every", type=int, default=40, help="every Nth event is malformed (default 40)")
    p.add_argument("--timeout", type=float, default=600, help="give up after this many seconds (default 600)")
    p.add_argument("--no-swap", action="store_true", help="do not register a second version mid-stream")
    return p


def _run(args) -> dict:
    from jobs.services import start_all
    from streamscore.app import run_stream
    from streamscore.demo import ensure_topic, produce_events, promote, train_and_register
    from streamscore.tracking import configure_mlflow

    tag = time.strftime("%Y%m%d-%H%M%S")
    settings = settings_from(args, [
        f"source.kafka.topic=streamscore-demo-{tag}",
        f"sink.checkpoint_path=checkpoints/demo-{tag}",
        "trigger.processing_time=2 seconds",
        "watch.poll_interval_s=1",
    ])
    setup_logging(settings.app.log_level)
    log.info("starting local services under %s", settings.home)
    start_all(settings)
    configure_mlflow(settings)
    v1 = train_and_register(settings.model.name, "v1", alias="champion")
    k = settings.source.kafka
    ensure_topic(k.bootstrap_servers, k.topic)

    first, second = args.events // 2, args.events - args.events // 2
    state = {"sent": 0, "valid": 0, "malformed": 0, "done_producing": False, "v2": None, "error": None}

    def send(count: int, start: int) -> None:
        r = produce_events(k.bootstrap_servers, k.topic, count, args.malformed_every, args.rate,
                           prefix=f"demo-{tag}", start=start)
        state["sent"] += r.sent
        state["valid"] += r.valid
        state["malformed"] += r.malformed

    def scenario(ready: dict) -> None:
        processor = ready["processor"]
        try:
            send(first, 0)
            if not args.no_swap:
                while processor.rows_by_version.get(v1, 0) == 0:
                    time.sleep(0.2)
                log.info("demo: registering a second model version while the stream runs")
                v2 = train_and_register(settings.model.name, "v2", alias=None)
                promote(settings.model.name, v2, "champion")
                state["v2"] = v2
                log.info("demo: champion -> version %s", v2)
                watcher = ready["watcher"]
                while not watcher.swap_pending and not watcher.swaps and not watcher.refusals:
                    time.sleep(0.2)
            send(second, first)
        except Exception as e:  # noqa: BLE001
            log.exception("demo scenario failed")
            state["error"] = f"{type(e).__name__}: {e}"
        state["done_producing"] = True

    deadline = time.time() + args.timeout
    box: dict = {}

    def on_ready(ready: dict) -> None:
        box.update(ready)
        threading.Thread(target=scenario, args=(ready,), name="demo-scenario", daemon=True).start()

    def should_stop() -> bool:
        p = box.get("processor")
        if state["error"] or time.time() > deadline:
            return True
        return bool(p and state["done_producing"] and p.totals["rows_in"] >= state["sent"])

    summary = run_stream(settings, should_stop=should_stop, on_ready=on_ready, job="demo")
    summary.update({
        "events_sent": state["sent"], "events_valid": state["valid"], "events_malformed": state["malformed"],
        "all_accounted_for": summary["rows_in"] == state["sent"]
        and summary["rows_scored"] == state["valid"] and summary["rows_dead_lettered"] == state["malformed"],
    })
    if state["error"] or not summary["all_accounted_for"] or (not args.no_swap and not summary["swaps"]):
        summary["status"] = "FAILED"
        summary["error"] = state["error"] or ("timed out" if time.time() > deadline else "events unaccounted for"
                                              if not summary["all_accounted_for"] else "no swap happened")
    log.info("results: scored rows in %s, dead letters in %s, metrics at %s (experiment %r, run %s)",
             summary["output_table"], summary["dead_letter_table"], summary["tracking_uri"],
             summary["experiment"], summary["run_id"])
    return summary


def main(argv=None) -> int:
    setup_logging()
    return run_job(_run, build_parser().parse_args(argv))
