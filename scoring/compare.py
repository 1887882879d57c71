"""How two versions' outputs for the same rows are compared (backfill reports, shadow and canary
metrics): a classifier's top-class agreement and total variation, a regressor's differences."""

from __future__ import annotations

from typing import Any

import pandas as pd

from streamscore.scoring.spec import PROBABILITIES, InputSpec, Output


def compared_output(spec: InputSpec) -> Output:
    """The output two versions are compared on: a classifier's probabilities when it has them (the
    agreement of their top classes and their total variation), else its prediction."""
    return next((o for o in spec.output_list if o.name == PROBABILITIES and o.array), spec.primary)


def compare_predictions(parts: list[pd.DataFrame], prediction_type: str) -> dict[str, Any]:
    df = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({"base": [], "other": []})
    out: dict[str, Any] = {"rows": int(len(df))}
    if prediction_type.startswith("array<"):  # class probabilities (or scores) per row
        import numpy as np

        p = np.array([np.asarray(v, dtype=float) for v in df["base"]]) if len(df) else np.zeros((0, 1))
        q = np.array([np.asarray(v, dtype=float) for v in df["other"]]) if len(df) else np.zeros((0, 1))
        if p.shape != q.shape:
            raise ValueError(f"the versions' outputs have different widths ({p.shape[1:]} and {q.shape[1:]})")
        tvd = 0.5 * np.abs(p - q).sum(axis=1)
        out.update(
            {
                "kind": "probabilities",
                "agreement": float((p.argmax(axis=1) == q.argmax(axis=1)).mean()) if len(df) else 1.0,
                "mean_total_variation": float(tvd.mean()) if len(df) else 0.0,
                "max_total_variation": float(tvd.max()) if len(df) else 0.0,
            }
        )
        # plotted as the regression's histograms: each row's highest probability
        out["distribution"] = {"base": p.max(axis=1).tolist(), "other": q.max(axis=1).tolist()}
        return out
    if prediction_type in ("double", "float"):
        diff = (df["base"].astype(float) - df["other"].astype(float)).abs()
        out.update(
            {
                "kind": "regression",
                "mean_abs_diff": float(diff.mean()) if len(df) else 0.0,
                "max_abs_diff": float(diff.max()) if len(df) else 0.0,
                "mean_shift": float(df["other"].mean() - df["base"].mean()) if len(df) else 0.0,
            }
        )
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
