"""Backfill: the stream's parsing, validation, dead-lettering, scoring and lineage over a bounded
input (a Delta table, optionally time-travelled and filtered, or a Kafka offset/timestamp range).

The model reference is resolved once. Each run owns a slice of the output tables named by its
``backfill_id`` (by default derived from the input, the range and the model version): a rerun
replaces its slice (``replaceWhere``) instead of appending duplicates, and a run with another
version writes a slice of its own, so versions can be compared side by side. The input is scored
in chunks (``pmod(xxhash64(value), chunks)``) so memory stays bounded; the first chunk replaces
the slice, the others append to it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from streamscore.conf.settings import BackfillRequest, DeltaSlice, Settings, check_metastore_name
from streamscore.errors import ConfigError
from streamscore.lifecycle import JobContext
from streamscore.pipeline import Outcome, Sinks, score_and_write
from streamscore.preflight import check_catalog
from streamscore.registry_watch.resolve import ModelRef
from streamscore.scoring import io as sio
from streamscore.scoring import schema
from streamscore.scoring.compare import compare_predictions, compared_output
from streamscore.scoring.spec import InputSpec
from streamscore.scoring.udf import ModelHandle, make_score_udf
from streamscore.streaming import build_gate

if TYPE_CHECKING:
    import pandas as pd

    from streamscore.tracking import Tracker

log = logging.getLogger(__name__)


def backfill_id_for(request: BackfillRequest, model_name: str, version: str) -> str:
    """The default slice name: a hash of the input, its range, the model name and the version."""
    input_desc = request.input.model_dump(mode="json", exclude_none=True)
    raw = json.dumps({"input": input_desc, "model": model_name, "version": version}, sort_keys=True)
    return "bf-" + hashlib.sha1(raw.encode()).hexdigest()[:16]


def run_backfill(settings: Settings, request: BackfillRequest) -> dict[str, Any]:
    """Score ``request.input`` once into its own slice of the backfill tables; returns the JSON
    summary (raises :class:`~streamscore.errors.JobFailed`, which carries it, when it fails)."""
    if request.table_names and settings.catalog.metastore != "session":
        for name in request.table_names:
            try:
                check_metastore_name(name, settings.catalog.metastore)
            except ValueError as e:
                raise ConfigError(f"invalid backfill request: {e}") from None
        # the session must reach the catalog for the request's names, not only for the settings'
        settings = settings.model_copy(update={"catalog": settings.catalog.model_copy(update={"connect": "always"})})
        check_catalog(settings)
    with JobContext("backfill", settings) as ctx:
        BackfillRun(ctx, request).run()
    return ctx.summary


class _Progress:
    """A progress bar on a terminal, one log line per chunk otherwise."""

    def __init__(self, chunks: int):
        self.chunks = chunks
        self.t0 = time.time()
        self.bar = None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:  # the `report` extra is not installed: one log line per chunk
                return
            self.bar = tqdm(total=chunks, unit="chunk", desc="backfill", file=sys.stderr)

    def chunk_done(self, chunk: int, outcome: Outcome, total_in: int) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(rows=total_in, rows_per_s=round(total_in / max(time.time() - self.t0, 1e-9)))
            return
        log.info(
            "backfill chunk %d/%d: %d in, %d scored, %d dead-lettered in %.1fs",
            chunk + 1,
            self.chunks,
            outcome.rows_in,
            outcome.rows_scored,
            outcome.rows_dead_lettered,
            outcome.score_s + outcome.write_s,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class BackfillRun:
    """One backfill inside its job context: admit the version(s), open the run, score the chunks,
    compare, and describe what happened (on every exit path, through the context)."""

    def __init__(self, ctx: JobContext, request: BackfillRequest):
        self.ctx, self.request, self.settings = ctx, request, ctx.settings
        self.totals = {"rows_in": 0, "rows_scored": 0, "rows_dead_lettered": 0}
        self.chunks_done = 0
        self.comparison: dict[str, Any] = {}
        self.gate = build_gate(self.settings, ctx.spark, ctx.client, source_sample=self._input_sample)
        self.ref = ModelRef.parse(request.model_ref or self.settings.model.ref)
        with ctx.phase("model"):
            admitted = self.gate.admit(self.ref, None)
        self.handle, self.spec = admitted.handle, admitted.spec
        self.backfill_id = request.backfill_id or backfill_id_for(request, self.handle.name, self.handle.version)
        st = self.settings
        self.out_table = st.table(request.output_table, request.output_path, "backfill")
        self.dead_table = st.table(request.dead_letter_table, request.dead_letter_path, "backfill_dead_letter")
        ctx.describe(self.describe)

    def _input_sample(self, n: int) -> list[str]:
        """Events of the backfill's own input: the gate's sample for a version without an example."""
        rows = _read_input(self.ctx.spark, self.settings, self.request).limit(n).collect()
        values = (r[schema.VALUE] for r in rows)
        return [v.decode("utf-8", errors="replace") if isinstance(v, bytes | bytearray) else v for v in values if v]

    def run(self) -> None:
        self._open()
        other = (
            self.gate.admit(ModelRef.parse(self.request.compare_with), self.spec).handle
            if self.request.compare_with
            else None
        )
        pairs = self._score_chunks(other)
        if other is not None and self.chunks_done == self.request.chunks:
            compared = compared_output(self.spec)
            self.comparison.update(compare_predictions(pairs, compared.ddl))
            self.comparison["output"] = compared.name
            self.comparison["versions"] = {"base": self.handle.version, "other": other.version}
            _log_comparison(self.ctx.tracker, self.comparison)

    def _open(self) -> None:
        spark, handle = self.ctx.spark, self.handle
        opts = sio.Creation.from_settings(self.settings)
        columns = schema.with_label(schema.output_schema(self.spec), self.settings.monitor.label_col, self.spec)
        sio.ensure_delta_table(spark, self.out_table, schema.with_backfill_id(columns), creation=opts)
        sio.ensure_delta_table(spark, self.dead_table, schema.with_backfill_id(schema.DEAD_LETTER), creation=opts)
        if handle.classes is not None:
            sio.record_classes(spark, self.out_table, handle.version, handle.classes)
        self.ctx.start_run(
            {
                "input": self.request.input.model_dump(mode="json"),
                "model": {"name": handle.name, "ref": str(self.ref), "version": handle.version},
                "backfill_id": self.backfill_id,
                "chunks": self.request.chunks,
                "output_table": str(self.out_table),
                "dead_letter_table": str(self.dead_table),
                "compare_with": self.request.compare_with or "",
            },
            {
                "streamscore.model_name": handle.name,
                "streamscore.initial_model_version": handle.version,
                "streamscore.backfill_id": self.backfill_id,
            },
        )

    def _score_chunks(self, other: ModelHandle | None) -> list[pd.DataFrame]:
        """Score chunk by chunk (stopping early on SIGTERM); returns (base, other) prediction pairs."""
        chunks = self.request.chunks
        topic = self.request.kafka_topic
        sinks = Sinks(
            sio.SliceWriter(self.out_table, schema.BACKFILL_ID.name, self.backfill_id),
            sio.SliceWriter(self.dead_table, schema.BACKFILL_ID.name, self.backfill_id),
            None if topic is None else sio.KafkaTopics.from_settings(self.settings, topic, self.backfill_id),
        )
        events = _read_input(self.ctx.spark, self.settings, self.request)
        events = events.withColumn("_chunk", F.pmod(F.xxhash64(schema.VALUE), F.lit(chunks)))
        pairs: list[pd.DataFrame] = []

        def compare(results: DataFrame, scored: int) -> None:
            if other is not None and scored:
                pairs.append(_paired_predictions(results, other, self.spec))

        progress = _Progress(chunks)
        try:
            for chunk in range(chunks):
                if self.ctx.stop_requested.is_set():
                    log.warning("backfill stopped after %d of %d chunks", self.chunks_done, chunks)
                    break
                part = events.where(F.col("_chunk") == chunk).drop("_chunk")
                outcome = score_and_write(
                    part, self.handle, self.spec, chunk, sinks, compare, keep_valid_raw=other is not None
                )
                self._account(chunk, outcome)
                progress.chunk_done(chunk, outcome, self.totals["rows_in"])
        finally:
            progress.close()
        return pairs

    def _account(self, chunk: int, outcome: Outcome) -> None:
        self.chunks_done += 1
        counts = outcome.counts()
        for key, value in counts.items():
            self.totals[key] += value
        self.ctx.tracker.log_metrics({**counts, "chunk_duration_s": outcome.score_s + outcome.write_s}, step=chunk)

    def describe(self) -> dict[str, Any]:
        seconds = time.time() - self.ctx.started_at
        rows_per_s = self.totals["rows_in"] / seconds if seconds else 0.0
        self.ctx.tracker.log_metrics(
            {f"total_{k}": v for k, v in self.totals.items()} | {"duration_s": seconds, "rows_per_s": rows_per_s},
            step=self.request.chunks,
        )
        out = {
            "backfill_id": self.backfill_id,
            "input": self.request.input.model_dump(mode="json", exclude_none=True),
            "output_table": str(self.out_table),
            "dead_letter_table": str(self.dead_table),
            "model_name": self.handle.name,
            "model_version": self.handle.version,
            **self.totals,
            "chunks": self.request.chunks,
            "chunks_done": self.chunks_done,
            "rows_per_s": round(rows_per_s, 1),
        }
        if self.comparison:
            out["comparison"] = {k: v for k, v in self.comparison.items() if k != "distribution"}
        return out


def _read_input(spark: Any, settings: Settings, request: BackfillRequest) -> DataFrame:
    inp = request.input
    if isinstance(inp, DeltaSlice):
        table = settings.table(inp.table, inp.path, "source")
        return sio.read_delta_table(spark, table, inp.version, inp.timestamp, inp.where)
    return sio.read_kafka_range(
        spark, settings.source.kafka, inp.starting, inp.ending, inp.starting_timestamp, inp.ending_timestamp
    )


def _paired_predictions(results: DataFrame, other_handle: ModelHandle, spec: InputSpec) -> pd.DataFrame:
    """(base, other) predictions of the same rows: the other version scores the same rows (a pyfunc
    version their raw payloads through its UDF, a Spark ML version their parsed features)."""
    name = compared_output(spec).name
    valid = results.where("ok")
    if other_handle.flavor == "spark":
        from streamscore.scoring import sparkml

        rows = valid.select(F.col(f"`{name}`").alias("base"), *[F.col(f"`{c}`") for c in spec.feature_names])
        applied = sparkml.apply(sparkml.load(other_handle), rows, spec)
        return applied.select("base", F.col(f"`{name}`").alias("other")).toPandas()
    udf = make_score_udf(other_handle, spec)
    pairs = valid.select(F.col(f"`{name}`").alias("base"), udf(F.col("raw_value")).alias("o"))
    return pairs.select("base", F.col(f"o.`{name}`").alias("other")).toPandas()


def _log_comparison(tracker: Tracker, comparison: dict[str, Any]) -> None:
    metrics = {f"compare_{k}": v for k, v in comparison.items() if isinstance(v, (int, float)) and k != "rows"}
    tracker.log_metrics(metrics, step=0)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "comparison.json"
        report.write_text(json.dumps(comparison, indent=2, default=str))
        files = [report]
        plot = Path(tmp) / "prediction_distribution.png"
        if _plot(comparison, plot):
            files.append(plot)
        for f in files:
            try:
                tracker.log_artifact(str(f), "comparison")
            except Exception as e:  # noqa: BLE001
                log.warning("could not store %s: %s", f.name, e)


def _plot(comparison: dict[str, Any], path: Path) -> bool:
    """The two versions' prediction distributions as a PNG; False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        log.info("comparison plot skipped: matplotlib is not installed (pip install 'streamscore[report]')")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    v = comparison["versions"]
    fig, ax = plt.subplots(figsize=(6, 4))
    if comparison["kind"] == "classification":
        share = comparison["class_share"]
        classes = list(share["base"])
        xs = range(len(classes))
        ax.bar([x - 0.2 for x in xs], [share["base"][c] for c in classes], width=0.4, label=f"version {v['base']}")
        ax.bar([x + 0.2 for x in xs], [share["other"][c] for c in classes], width=0.4, label=f"version {v['other']}")
        ax.set_xticks(list(xs), classes)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("share of rows")
        ax.set_title(f"agreement {comparison['agreement']:.1%}")
    else:
        dist = comparison["distribution"]
        ax.hist(dist["base"], bins=40, alpha=0.5, label=f"version {v['base']}")
        ax.hist(dist["other"], bins=40, alpha=0.5, label=f"version {v['other']}")
        if comparison["kind"] == "probabilities":
            ax.set_xlabel("probability of the top class")
            ax.set_title(
                f"agreement {comparison['agreement']:.1%}, mean total variation "
                f"{comparison['mean_total_variation']:.4g}"
            )
        else:
            ax.set_xlabel("prediction")
            ax.set_title(f"mean |diff| {comparison['mean_abs_diff']:.4g}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
