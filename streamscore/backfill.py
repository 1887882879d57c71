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
from typing import Optional

from pyspark import StorageLevel
from pyspark.sql import functions as F

from registry_watch.gate import Refused
from registry_watch.resolve import ModelRef, resolve_version
from scoring import io as sio
from scoring.transform import (DEAD_LETTER_DDL, count_outcomes, dead_letter_rows, output_schema_ddl, score,
                               scored_rows)
from scoring.udf import make_score_udf
from streamscore.app import build_gate
from streamscore.spark import build_spark
from streamscore.tracking import configure_mlflow, make_tracker

log = logging.getLogger(__name__)


def backfill_id_for(input_desc: dict, model_name: str, version: str) -> str:
    raw = json.dumps({"input": input_desc, "model": model_name, "version": version}, sort_keys=True)
    return "bf-" + hashlib.sha1(raw.encode()).hexdigest()[:16]


def _progress(total: int):
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, unit="chunk", desc="backfill", file=sys.stderr)
    return None


def run_backfill(settings, input_desc: dict, model_ref: Optional[str] = None, backfill_id: Optional[str] = None,
                 compare_with: Optional[str] = None, chunks: int = 4, output_path: Optional[str] = None,
                 dead_letter_path: Optional[str] = None) -> dict:
    """``input_desc``: ``{"kind": "delta", "path", "version"?, "timestamp"?, "where"?}`` or
    ``{"kind": "kafka", "starting": <offsets spec>, "ending": <offsets spec>}``."""
    from mlflow import MlflowClient

    t0 = time.time()
    tracking_uri, registry_uri = configure_mlflow(settings)
    spark = build_spark(settings)
    client = MlflowClient(tracking_uri, registry_uri)
    gate = build_gate(settings, spark, client)
    ref = ModelRef.parse(model_ref or settings.model.ref)
    mv = resolve_version(client, settings.model.name, ref)
    try:
        result = gate.check(mv, None)
    except Refused as e:
        raise RuntimeError(f"model {settings.model.name!r} {ref} -> {e}") from None
    handle, spec = result.handle, result.spec
    bf_id = backfill_id or backfill_id_for(input_desc, handle.name, handle.version)
    out_path = output_path or settings.path("tables/backfill")
    dead_path = dead_letter_path or settings.path("tables/backfill_dead_letter")
    sio.ensure_delta_table(spark, out_path, output_schema_ddl(spec) + ", backfill_id string")
    sio.ensure_delta_table(spark, dead_path, DEAD_LETTER_DDL + ", backfill_id string")

    tracker = make_tracker(settings, tracking_uri)
    run_id = tracker.start(
        settings.app.run_name or f"backfill-{time.strftime('%Y%m%d-%H%M%S')}",
        {"input": input_desc, "model": {"name": handle.name, "ref": str(ref), "version": handle.version},
         "backfill_id": bf_id, "chunks": chunks, "output_path": out_path, "dead_letter_path": dead_path,
         "compare_with": compare_with or ""},
        {"streamscore.job": "backfill", "streamscore.model_name": handle.name,
         "streamscore.initial_model_version": handle.version, "streamscore.backfill_id": bf_id},
    )
    status, error, totals = "FINISHED", None, {"rows_in": 0, "rows_scored": 0, "rows_dead_lettered": 0}
    comparison = None
    try:
        events = _read_input(spark, settings, input_desc)
        events = events.withColumn("_chunk", F.pmod(F.xxhash64("value"), F.lit(chunks)))
        bar = _progress(chunks)
        compare_parts = []
        other = _prepare_other(client, gate, settings, compare_with, spec) if compare_with else None
        slice_cond = f"backfill_id = '{bf_id}'"
        for chunk in range(chunks):
            tc = time.time()
            part = events.where(F.col("_chunk") == chunk).drop("_chunk")
            results = score(part, handle, spec, chunk).persist(StorageLevel.MEMORY_AND_DISK)
            try:
                scored, dead = count_outcomes(results)
                mode = "overwrite" if chunk == 0 else "append"
                for df, path in ((scored_rows(results, spec).withColumn("backfill_id", F.lit(bf_id)), out_path),
                                 (dead_letter_rows(results).withColumn("backfill_id", F.lit(bf_id)), dead_path)):
                    w = df.write.format("delta").mode(mode)
                    if mode == "overwrite":
                        w = w.option("replaceWhere", slice_cond)
                    w.save(path)
                if other is not None and scored:
                    compare_parts.append(_paired_predictions(results, other, spec))
            finally:
                results.unpersist()
            totals["rows_in"] += scored + dead
            totals["rows_scored"] += scored
            totals["rows_dead_lettered"] += dead
            secs = time.time() - tc
            tracker.log_metrics({"rows_in": scored + dead, "rows_scored": scored, "rows_dead_lettered": dead,
                                 "chunk_duration_s": secs}, step=chunk)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(rows=totals["rows_in"], rows_per_s=round(totals["rows_in"] / (time.time() - t0)))
            else:
                log.info("backfill chunk %d/%d: %d in, %d scored, %d dead-lettered in %.1fs", chunk + 1, chunks,
                         scored + dead, scored, dead, secs)
        if bar is not None:
            bar.close()
        if other is not None:
            comparison = compare_predictions(compare_parts, spec.prediction_type)
            comparison["versions"] = {"base": handle.version, "other": other.version}
            _log_comparison(tracker, comparison)
    except BaseException as e:
        status, error = "FAILED", f"{type(e).__name__}: {e}"
        raise
    finally:
        seconds = time.time() - t0
        summary = {"job": "backfill", "status": status, "backfill_id": bf_id, "input": input_desc,
                   "output_table": out_path, "dead_letter_table": dead_path, "tracking_uri": tracking_uri,
                   "experiment": settings.tracking.experiment, "run_id": run_id, "model_name": handle.name,
                   "model_version": handle.version, **totals, "chunks": chunks, "duration_s": round(seconds, 3),
                   "rows_per_s": round(totals["rows_in"] / seconds, 1) if seconds else None}
        if comparison is not None:
            summary["comparison"] = {k: v for k, v in comparison.items() if k != "distribution"}
        if error:
            summary["error"] = error
        tracker.log_metrics({"total_rows_in": totals["rows_in"], "total_rows_scored": totals["rows_scored"],
                             "total_rows_dead_lettered": totals["rows_dead_lettered"], "duration_s": seconds,
                             "rows_per_s": totals["rows_in"] / seconds if seconds else 0.0}, step=chunks)
        tracker.finish(status, summary)
    return summary


def _read_input(spark, settings, d: dict):
    if d["kind"] == "delta":
        return sio.read_delta_table(spark, d["path"], d.get("version"), d.get("timestamp"), d.get("where"))
    if d["kind"] == "kafka":
        return sio.read_kafka_range(spark, settings.source.kafka, d.get("starting", "earliest"),
                                    d.get("ending", "latest"), d.get("starting_timestamp"),
                                    d.get("ending_timestamp"))
    raise ValueError(f"unknown backfill input kind {d['kind']!r}")


def _prepare_other(client, gate, settings, ref_text: str, spec):
    mv = resolve_version(client, settings.model.name, ModelRef.parse(ref_text))
    try:
        return gate.check(mv, spec).handle
    except Refused as e:
        raise RuntimeError(f"--compare-with {ref_text}: {e}") from None


def _paired_predictions(results, other_handle, spec):
    """(base, other) predictions of the same rows: the other version scores the same raw payloads."""
    udf = make_score_udf(other_handle, spec)
    pairs = results.where("ok").select(F.col("prediction").alias("base"), udf(F.col("raw_value")).alias("o"))
    return pairs.select("base", F.col("o.prediction").alias("other")).toPandas()


def compare_predictions(parts, prediction_type: str) -> dict:
    import pandas as pd

    df = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({"base": [], "other": []})
    out: dict = {"rows": int(len(df))}
    if prediction_type in ("double", "float"):
        diff = (df["base"].astype(float) - df["other"].astype(float)).abs()
        out.update({"kind": "regression", "mean_abs_diff": float(diff.mean()) if len(df) else 0.0,
                    "max_abs_diff": float(diff.max()) if len(df) else 0.0,
                    "mean_shift": float(df["other"].mean() - df["base"].mean()) if len(df) else 0.0})
        out["distribution"] = {"base": df["base"].astype(float).tolist(), "other": df["other"].astype(float).tolist()}
    else:
        base, other = df["base"].astype(str), df["other"].astype(str)
        out.update({"kind": "classification", "agreement": float((base == other).mean()) if len(df) else 1.0})
        classes = sorted(set(base) | set(other))
        share_b = base.value_counts(normalize=True).reindex(classes, fill_value=0.0)
        share_o = other.value_counts(normalize=True).reindex(classes, fill_value=0.0)
        out["class_share"] = {"base": share_b.round(6).to_dict(), "other": share_o.round(6).to_dict()}
        out["total_variation_distance"] = float(0.5 * (share_b - share_o).abs().sum())
        out["distribution"] = out["class_share"]
    return out


def _log_comparison(tracker, comparison: dict) -> None:
    metrics = {f"compare_{k}": v for k, v in comparison.items() if isinstance(v, (int, float)) and k != "rows"}
    tracker.log_metrics(metrics, step=0)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "comparison.json"
        report.write_text(json.dumps(comparison, indent=2, default=str))
        plot = Path(tmp) / "prediction_distribution.png"
        _plot(comparison, plot)
        for f in (report, plot):
            try:
                tracker.client.log_artifact(tracker.run_id, str(f), "comparison")
            except Exception as e:  # noqa: BLE001
                log.warning("could not store %s: %s", f.name, e)


def _plot(comparison: dict, path: Path) -> None:
    import matplotlib

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
        ax.set_xlabel("prediction")
        ax.set_title(f"mean |diff| {comparison['mean_abs_diff']:.4g}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
