"""The continuous scoring job: a Kafka topic or Delta table, scored into Delta by the model version
the registry watcher serves, until it is stopped.

:func:`run_stream` wires the pieces inside one :class:`~streamscore.lifecycle.JobContext`: the
watcher (its validation gate samples the stream's recent input), the micro-batch processor and its
sinks, the streaming query, the optional webhook receiver, and the stop controller.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from streamscore.errors import GateRefused, SinkError
from streamscore.lifecycle import JobContext
from streamscore.pipeline import Sinks
from streamscore.registry_watch.gate import GateConfig, ValidationGate
from streamscore.registry_watch.resolve import MlflowRegistry, ModelRef
from streamscore.registry_watch.watcher import BatchLedger, Refusal, RegistryWatcher, Rollback, SwapEvent
from streamscore.runner import BatchProcessor, RecentSample, StopController
from streamscore.scoring import io as sio

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from pyspark.sql import DataFrame, SparkSession
    from pyspark.sql.streaming import StreamingQuery

    from streamscore.conf.settings import Settings
    from streamscore.registry_watch.webhook import WebhookReceiver
    from streamscore.scoring.udf import ModelHandle
    from streamscore.tracking import Tracker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamHandle:
    """What a running stream exposes to its caller (``on_ready``): the demo and the tests watch it."""

    query_id: str
    run_id: str
    model_version: str
    processor: BatchProcessor
    watcher: RegistryWatcher


def open_ledger(settings: Settings, spark: SparkSession) -> BatchLedger:
    """The batch ledger, inside the checkpoint (so a checkpoint reset resets it too): a local file,
    or through the Hadoop file system API for a checkpoint on a URI."""
    cp = settings.checkpoint_path
    if "://" in cp or cp.startswith("dbfs:"):
        uri = cp.rstrip("/") + "/streamscore/batch_versions.jsonl"
        return BatchLedger(uri, sio.HadoopFile(spark, uri))
    return BatchLedger(Path(cp) / "streamscore" / "batch_versions.jsonl")


def delta_app_id(settings: Settings, incarnation: str) -> str:
    """The Delta ``txnAppId`` of the stream's writes: unique per checkpoint incarnation. The query
    id is kept in the checkpoint (the same across restarts on it, new for a new checkpoint), so a
    deleted and recreated checkpoint, whose batch ids start at 0 again, never has its writes
    skipped as already done."""
    return f"{settings.app_id}-{incarnation}"


def build_gate(
    settings: Settings,
    spark: SparkSession | None,
    client: MlflowClient,
    recent_sample: Callable[[], list[str]] | None = None,
    source_sample: Callable[[int], list[str]] | None = None,
) -> ValidationGate:
    """The gate; ``source_sample`` reads the newest events of the job's input (default: the
    configured source's, :func:`source_sampler`)."""
    return ValidationGate(
        client,
        GateConfig.from_settings(settings),
        spark,
        recent_sample,
        source_sample or source_sampler(settings, spark),
    )


def source_sampler(settings: Settings, spark: SparkSession | None) -> Callable[[int], list[str]] | None:
    """Reads the newest events of the job's source (the gate's sample when there is no other)."""
    src = settings.source
    if src.kind == "kafka":
        from streamscore.preflight import librdkafka_config

        conf = librdkafka_config(settings)
        if conf is None:  # options librdkafka cannot take: no sample from the source
            return None
        timeout = settings.app.preflight_timeout_s
        return lambda n: sio.newest_kafka_values(conf, src.kafka.topic, n, timeout)
    table = settings.source_table
    if spark is not None and table is not None:
        return lambda n: sio.newest_delta_values(spark, table, n)
    return None


def build_watcher(
    settings: Settings,
    spark: SparkSession | None,
    client: MlflowClient,
    ledger: BatchLedger | None,
    recent_sample: Callable[[], list[str]] | None = None,
    tracker: Tracker | None = None,
) -> RegistryWatcher:
    """The registry watcher (``ledger``: the batch ledger a stream's replays are pinned by; None
    for a watcher that never scores a batch); with a tracker, swaps and refusals are logged to the
    job's run."""
    swaps_logged = 0

    def on_swap(ev: SwapEvent) -> None:
        nonlocal swaps_logged
        if tracker is None:
            return
        swaps_logged += 1
        if settings.tracking.rotate_on_swap:
            tracker.request_rotation()  # the new version's metrics in a run of their own
        tracker.log_metrics(
            {
                "swap_latency_s": ev.swap_latency_s,
                "swap_to_version": float(ev.to_version),
                "swap_gate_s": ev.gate_seconds,
            },
            step=ev.first_batch_id or 0,
        )
        tracker.set_tags({f"streamscore.swap.{swaps_logged}": json.dumps(ev.as_dict(), default=str)})

    def held_against(what: str, r: Refusal | Rollback) -> None:
        """A version refused or rolled back: metric ``<what>_version``, tag ``streamscore.<what>.v<N>``."""
        if tracker is None:
            return
        tracker.log_metrics({f"{what}_version": float(r.version) if r.version.isdigit() else -1.0}, step=int(r.at))
        tracker.set_tags({f"streamscore.{what}.v{r.version}": r.reason[:5000]})

    return RegistryWatcher(
        MlflowRegistry(client, settings.model.name),
        ModelRef.parse(settings.model.ref),
        build_gate(settings, spark, client, recent_sample),
        settings.watch,
        ledger,
        on_swap=on_swap,
        on_refusal=lambda r: held_against("refused", r),
        on_rollback=lambda r: held_against("rolled_back", r),
    )


def start_webhook(
    settings: Settings, watcher: RegistryWatcher, client: MlflowClient, ctx: JobContext
) -> WebhookReceiver:
    """Receive registry webhooks (each verified delivery asks the watcher to poll); the receiver and
    the webhook it registered on the MLflow server are removed when the job ends."""
    from streamscore.registry_watch.webhook import WebhookReceiver

    wh = settings.watch.webhook
    receiver = WebhookReceiver(wh, settings.model.name, lambda _ev, ts: watcher.request_poll(alias_set_at=ts)).start()
    ctx.on_close(receiver.stop)
    if wh.register_on_server:
        hook = client.create_webhook(
            name=f"streamscore-{settings.app_id}",
            url=receiver.url,
            secret=receiver.secret,
            events=["model_version_alias.created", "model_version.created"],
        )
        ctx.on_close(lambda: client.delete_webhook(hook.webhook_id))
    log.info("webhook receiver listening on %s", receiver.url)
    return receiver


def run_params(settings: Settings) -> dict[str, Any]:
    s = settings.masked()
    sink = {
        **s["sink"],
        "output_table": str(settings.output_table),
        "dead_letter_table": str(settings.dead_letter_table),
        "checkpoint_path": settings.checkpoint_path,
        "app_id": settings.app_id,
    }
    return {
        "source": s["source"],
        "sink": sink,
        "model": s["model"],
        "trigger": s["trigger"],
        "watch": s["watch"],
        "tracking": s["tracking"],  # the token (a secret) is masked
        "profile": settings.profile,
    }


def read_events(spark: SparkSession, settings: Settings) -> DataFrame:
    src = settings.source
    if src.kind == "kafka":
        return sio.read_kafka_stream(spark, src.kafka)
    table = settings.source_table
    assert table is not None, "settings validation requires source.delta.table or .path"
    return sio.read_delta_stream(spark, table, src.delta.max_files_per_trigger)


def start_query(events: DataFrame, processor: BatchProcessor, settings: Settings) -> StreamingQuery:
    writer = (
        events.writeStream.foreachBatch(processor)
        .option("checkpointLocation", settings.checkpoint_path)
        .queryName(f"streamscore-{settings.app_id}")
    )
    trig = settings.trigger
    if trig.available_now:
        writer = writer.trigger(availableNow=True)
    elif trig.processing_time:
        writer = writer.trigger(processingTime=trig.processing_time)
    return writer.start()


def run_stream(
    settings: Settings,
    should_stop: Callable[[], bool] | None = None,
    on_ready: Callable[[StreamHandle], None] | None = None,
    job: str = "stream",
) -> dict[str, Any]:
    """Run the continuous scoring job until it is stopped; returns the JSON summary (raises
    :class:`~streamscore.errors.JobFailed`, which carries it, when the job fails)."""
    from streamscore.preflight import check_stream_services

    with JobContext(
        job,
        settings,
        preflight=check_stream_services,
        checkpoint=settings.checkpoint_path,
        while_spark_starts=prepare_start_version,
    ) as ctx:
        ScoringStream(ctx, should_stop).run(on_ready)
    return ctx.summary


def prepare_start_version(ctx: JobContext) -> None:
    """While Spark starts: the watched version downloaded and loaded on the driver, ahead of the gate."""
    settings = ctx.settings
    ValidationGate(ctx.client, GateConfig.from_settings(settings)).prepare(ModelRef.parse(settings.model.ref))


class ScoringStream:
    """A stream ready to start. Construction does every step that must precede the query, in the
    one order that works: the query's id (read from the checkpoint, or chosen for a new one) fixes
    the Delta app id of the sinks; the ledger, the watcher and the processor are built complete;
    the start version passes the gate and the tables are created for its schema (phase ``model``);
    the run opens. :meth:`run` then starts the query, the registry polling and the webhook, and
    blocks until the stream stops."""

    def __init__(self, ctx: JobContext, should_stop: Callable[[], bool] | None = None):
        settings, spark = ctx.settings, ctx.spark
        self.ctx, self.settings = ctx, settings
        self.query_id, new_checkpoint = sio.stream_id(spark, settings.checkpoint_path)
        if new_checkpoint:
            _warn_if_new_checkpoint_on_old_tables(spark, settings)
        app_id = delta_app_id(settings, self.query_id)
        tables = [settings.output_table, settings.dead_letter_table]
        sinks = Sinks(
            sio.IdempotentAppend(tables[0], app_id),
            sio.IdempotentAppend(tables[1], app_id + "-dead-letter"),
            sio.KafkaTopics.from_settings(settings),
            sio.IdempotentAppend(settings.shadow_table, app_id + "-shadow") if settings.watch.shadow_ref else None,
        )
        recent = RecentSample()
        self.watcher = build_watcher(
            settings, spark, ctx.client, open_ledger(settings, spark), recent.rows, ctx.tracker
        )
        ctx.on_close(self.watcher.stop)
        warmer = sio.SnapshotWarmer(spark, tables, settings.sink.warm_snapshots)
        ctx.on_close(warmer.stop)
        self.processor = BatchProcessor(
            spark,
            self.watcher,
            ctx.tracker,
            sinks,
            recent,
            warmer,
            settings,
        )
        warm = _warm_source_reader(spark, settings)
        with ctx.phase("model"):  # resolve, download, policy, gate (warms the Python workers), tables
            self.serving = start_serving(self.watcher, self.processor)
        if warm is not None:
            warm.join(10.0)
        ctx.phases.update({f"model.{k}": v for k, v in self.watcher.start_phases.items()})
        if self.processor.tables_s is not None:
            ctx.phases["model.tables"] = self.processor.tables_s
        self.run_id = ctx.start_run(
            run_params(settings),
            {"streamscore.model_name": self.serving.name, "streamscore.initial_model_version": self.serving.version},
        )
        trig = settings.trigger
        self.stopper = StopController(
            self.processor, ctx.stop_requested, trig.max_batches, trig.idle_timeout_s, should_stop
        )
        ctx.describe(lambda: _summary(settings, ctx, self.processor, self.watcher, self.stopper))

    def run(self, on_ready: Callable[[StreamHandle], None] | None = None) -> None:
        ctx, settings = self.ctx, self.settings
        with ctx.phase("query_start"):
            query = start_query(read_events(ctx.spark, settings), self.processor, settings)
        ctx.on_close(lambda: query.stop() if query.isActive else None)
        self.processor.query_started_at = time.time()
        ctx.summary["query_id"] = query.id
        if query.id != self.query_id:  # Spark took another id than its checkpoint's: the app id would not be unique
            raise RuntimeError(
                f"the query started with id {query.id}, not the checkpoint's {self.query_id} "
                f"({settings.checkpoint_path}/metadata): its writes would not be recognised after a restart"
            )
        if settings.watch.enabled:  # false: the start version serves until the job ends
            self.watcher.start_background()
        if settings.watch.enabled and settings.watch.webhook.enabled:
            start_webhook(settings, self.watcher, ctx.client, ctx)
        if on_ready:
            on_ready(StreamHandle(query.id, self.run_id, self.serving.version, self.processor, self.watcher))
        self.stopper.run(query, settings.checkpoint_path)


def _warm_source_reader(spark: SparkSession, settings: Settings) -> threading.Thread | None:
    """While the gate scores its sample (mostly Python: the workers' imports and model load), the
    JVM reads one event of the source topic in a batch job of its own: the Kafka client's classes,
    the driver's admin client and an executor's consumer are then ready for the first micro-batch
    (about 1 s of it here). Nothing depends on it: a failure is logged at debug level."""
    if settings.source.kind != "kafka" or not settings.spark.master:
        return None

    def warm() -> None:
        try:
            sio.read_kafka_range(spark, settings.source.kafka, "earliest", "latest").limit(1).collect()
        except Exception as e:  # noqa: BLE001 - the stream's own read reports real problems
            log.debug("source warm-up: %s: %s", type(e).__name__, str(e)[:300])

    thread = threading.Thread(target=warm, name="streamscore-source-warmer", daemon=True)
    thread.start()
    return thread


def start_serving(watcher: RegistryWatcher, processor: BatchProcessor) -> ModelHandle:
    """The version the stream starts with: the watched reference's, when it passes the gate and fits
    the output tables. On a restart where it does not (the alias moved to a version the stream
    refused, or one whose schema the tables do not have), the version the ledger recorded last
    serves instead, and the reason is logged; without a ledger the job stops with the error."""
    try:
        handle = watcher.start()
        processor.ensure_tables()
        return handle
    except (GateRefused, SinkError) as e:
        last = watcher.ledger.last() if watcher.ledger is not None else None
        if last is None:
            raise
        log.warning("%s; keeping version %s, the last one this stream served (its ledger)", e, last["version"])
    handle = watcher.start(ModelRef("version", str(last["version"])))
    processor.ensure_tables()
    return handle


def _warn_if_new_checkpoint_on_old_tables(spark: SparkSession, settings: Settings) -> None:
    if sio.table_exists(spark, settings.output_table) and sio.has_rows(spark, settings.output_table):
        log.warning(
            "starting a new checkpoint at %s on an output table that already holds rows (%s): events the "
            "source delivers again are scored again",
            settings.checkpoint_path,
            settings.output_table,
        )


def _summary(
    settings: Settings, ctx: JobContext, processor: BatchProcessor, watcher: RegistryWatcher, stopper: StopController
) -> dict[str, Any]:
    processor.metrics.flush()  # the last window's step, before the run is closed
    out: dict[str, Any] = {  # query id, run id, tracking URI and experiment: already in ctx.summary
        "output_table": str(settings.output_table),
        "dead_letter_table": str(settings.dead_letter_table),
        "checkpoint": settings.checkpoint_path,
        "model_name": settings.model.name,
        "model_ref": settings.model.ref,
        "model_version": watcher.current.version if watcher.current else None,
        **processor.summary(),
        "swaps": [
            {
                "from_version": e.from_version,
                "to_version": e.to_version,
                "first_batch_id": e.first_batch_id,
                "swap_latency_s": None if e.swap_latency_s is None else round(e.swap_latency_s, 3),
            }
            for e in watcher.swaps
        ],
        "refused": [{"version": r.version, "reason": r.reason} for r in watcher.refusals],
        "rolled_back": [
            {"version": r.version, "to_version": r.to_version, "batches": r.batches, "rows": r.rows, "reason": r.reason}
            for r in watcher.rollbacks
        ],
        "stop_reason": stopper.reason or "completed",
        "first_batch_s": processor.first_batch_s(),
        "halted_before_batch": processor.halted_before,  # stopped under load: this batch is read again next time
        "tracking_metrics_dropped": ctx.tracker.dropped,
    }
    if watcher.canary is not None and watcher.progress is not None:
        out["canary"] = watcher.progress.as_dict()
    if settings.watch.shadow_ref is not None:
        out["shadow_table"] = str(settings.shadow_table)
        out["shadow_version"] = watcher.shadow.version if watcher.shadow else None
        if watcher.shadow_problem:
            out["shadow_problem"] = watcher.shadow_problem
    if settings.tracking.mirror_uri:
        out["mirror_tracking_uri"] = settings.tracking.mirror_uri
        out["mirror_run_id"] = ctx.tracker.mirror_run_id
    return out
