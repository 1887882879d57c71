"""Wiring shared by the jobs: settings -> MLflow -> Spark -> watcher -> pipeline -> summary."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Optional

from registry_watch.gate import ValidationGate
from registry_watch.resolve import ModelRef
from registry_watch.watcher import BatchLedger, Refusal, RegistryWatcher, SwapEvent
from streamscore.runner import BatchProcessor, StopController
from streamscore.spark import build_spark
from streamscore.tracking import RunTracker, configure_mlflow, make_tracker

log = logging.getLogger(__name__)


def ledger_path(settings) -> Path:
    cp = settings.checkpoint_path
    if "://" in cp or cp.startswith("dbfs:"):
        return settings.home / "ledgers" / f"{settings.app_id}.jsonl"
    return Path(cp) / "streamscore" / "batch_versions.jsonl"


def build_gate(settings, spark, client, recent_sample=None) -> ValidationGate:
    return ValidationGate(
        client, settings.home / "models", settings.source.event_id_field, settings.source.event_time_field,
        spark=spark, required_tag=settings.watch.required_tag, sample_rows=settings.watch.sample_rows,
        recent_sample=recent_sample,
    )


def build_watcher(settings, spark, client, recent_sample=None, tracker: Optional[RunTracker] = None):
    ref = ModelRef.parse(settings.model.ref)
    gate = build_gate(settings, spark, client, recent_sample)

    def on_swap(ev: SwapEvent) -> None:
        if tracker is None:
            return
        step = ev.first_batch_id or 0
        tracker.log_metrics({"swap_latency_s": ev.swap_latency_s, "swap_to_version": float(ev.to_version),
                             "swap_gate_s": ev.gate_seconds}, step=step)
        tracker.set_tags({f"streamscore.swap.{len(watcher.swaps)}": _json(ev.as_dict())})

    def on_refusal(r: Refusal) -> None:
        if tracker is None:
            return
        tracker.log_metrics({"refused_version": float(r.version) if r.version.isdigit() else -1.0},
                            step=int(r.at))
        tracker.set_tags({f"streamscore.refused.v{r.version}": r.reason[:5000]})

    watcher = RegistryWatcher(
        client, settings.model.name, ref, gate, BatchLedger(ledger_path(settings)),
        poll_interval_s=settings.watch.poll_interval_s, retry_refused_after_s=settings.watch.retry_refused_after_s,
        on_swap=on_swap, on_refusal=on_refusal,
    )
    return watcher


def _json(d: dict) -> str:
    import json

    return json.dumps(d, default=str)


class _Webhook:
    def __init__(self, receiver, client, webhook_id):
        self.receiver, self.client, self.webhook_id = receiver, client, webhook_id

    def close(self) -> None:
        self.receiver.stop()
        if self.webhook_id:
            try:
                self.client.delete_webhook(self.webhook_id)
            except Exception as e:  # noqa: BLE001
                log.warning("could not delete webhook %s: %s", self.webhook_id, e)


def start_webhook(settings, watcher, client) -> _Webhook:
    from registry_watch.webhook import WebhookReceiver

    wh = settings.watch.webhook
    secret = wh.secret.get_secret_value()
    receiver = WebhookReceiver(secret, settings.model.name, lambda _ev, ts: watcher.request_poll(alias_set_at=ts),
                               host=wh.host, port=wh.port, max_age_s=wh.max_age_s).start()
    webhook_id = None
    if wh.register_on_server:
        hook = client.create_webhook(
            name=f"streamscore-{settings.app_id}", url=receiver.url, secret=secret,
            events=["model_version_alias.created", "model_version.created"],
        )
        webhook_id = hook.webhook_id
    log.info("webhook receiver listening on %s", receiver.url)
    return _Webhook(receiver, client, webhook_id)


def run_params(settings) -> dict:
    s = settings.masked()
    return {"source": s["source"], "sink": {**s["sink"], "output_path": settings.output_path,
                                             "dead_letter_path": settings.dead_letter_path,
                                             "checkpoint_path": settings.checkpoint_path, "app_id": settings.app_id},
            "model": s["model"], "trigger": s["trigger"], "watch": s["watch"], "profile": settings.profile}


def run_stream(settings, should_stop: Optional[Callable[[], bool]] = None,
               on_ready: Optional[Callable[[dict], None]] = None, job: str = "stream") -> dict:
    """Run the continuous scoring job until it is stopped; returns the JSON summary."""
    from mlflow import MlflowClient

    from scoring import io as sio

    tracking_uri, registry_uri = configure_mlflow(settings)
    spark = build_spark(settings)
    client = MlflowClient(tracking_uri, registry_uri)
    tracker = make_tracker(settings, tracking_uri)
    processor_box: dict = {}
    watcher = build_watcher(settings, spark, client,
                            recent_sample=lambda: processor_box["p"].recent_sample() if "p" in processor_box else [],
                            tracker=tracker)
    handle = watcher.start()
    run_id = tracker.start(
        settings.app.run_name or f"{job}-{time.strftime('%Y%m%d-%H%M%S')}",
        run_params(settings),
        {"streamscore.job": job, "streamscore.model_name": handle.name,
         "streamscore.initial_model_version": handle.version},
    )
    processor = BatchProcessor(spark, settings, watcher, tracker)
    processor_box["p"] = processor
    processor.ensure_tables()

    src = settings.source
    events = (sio.read_kafka_stream(spark, src.kafka) if src.kind == "kafka"
              else sio.read_delta_stream(spark, src.delta))
    writer = events.writeStream.foreachBatch(processor).option("checkpointLocation", settings.checkpoint_path)
    writer = writer.queryName(f"streamscore-{settings.app_id}")
    trig = settings.trigger
    if trig.available_now:
        writer = writer.trigger(availableNow=True)
    elif trig.processing_time:
        writer = writer.trigger(processingTime=trig.processing_time)
    stopper = StopController(processor, trig.max_batches, trig.idle_timeout_s, should_stop)
    stopper.install_signal_handlers()
    status, error = "FINISHED", None
    query = None
    webhook = None
    try:
        query = writer.start()
        if settings.watch.enabled and settings.watch.background_thread:
            watcher.start_background()
        if settings.watch.enabled and settings.watch.webhook.enabled:
            webhook = start_webhook(settings, watcher, client)
        if on_ready:
            on_ready({"query_id": query.id, "run_id": run_id, "model_version": handle.version,
                      "processor": processor, "watcher": watcher})
        reason = stopper.run(query)
        if reason == "killed":
            status = "KILLED"
    except BaseException as e:
        status, error = "FAILED", f"{type(e).__name__}: {e}"
        raise
    finally:
        watcher.stop()
        if webhook is not None:
            webhook.close()
        if query is not None and query.isActive:
            query.stop()
        summary = {
            "job": job,
            "status": status,
            "query_id": query.id if query is not None else None,
            "output_table": settings.output_path,
            "dead_letter_table": settings.dead_letter_path,
            "checkpoint": settings.checkpoint_path,
            "tracking_uri": tracking_uri,
            "experiment": settings.tracking.experiment,
            "run_id": run_id,
            "model_name": settings.model.name,
            "model_ref": settings.model.ref,
            "model_version": watcher.current.version if watcher.current else None,
            **processor.summary(),
            "swaps": [
                {"from_version": e.from_version, "to_version": e.to_version, "first_batch_id": e.first_batch_id,
                 "swap_latency_s": None if e.swap_latency_s is None else round(e.swap_latency_s, 3)}
                for e in watcher.swaps
            ],
            "refused": [{"version": r.version, "reason": r.reason} for r in watcher.refusals],
            "stop_reason": stopper.reason or "completed",
            "tracking_metrics_dropped": tracker.dropped,
        }
        if settings.tracking.mirror_uri:
            summary["mirror_tracking_uri"] = settings.tracking.mirror_uri
            summary["mirror_run_id"] = tracker.mirror_run_id
        if error:
            summary["error"] = error
        tracker.finish(status, summary)
    return summary
