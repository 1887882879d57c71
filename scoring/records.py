"""Parse, validate and score one chunk of raw JSON events (pure pandas; runs inside the Spark UDF).

Every input row yields exactly one output row: either ``ok=True`` with the typed features and the
prediction, or ``ok=False`` with a ``reason`` that names the field and the problem. Nothing is
dropped, so rows in = rows scored + rows dead-lettered holds per chunk and therefore per batch.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import orjson
import pandas as pd

from streamscore.scoring.spec import InputSpec

_NUMPY = {"double": "float64", "float": "float32", "long": "int64", "integer": "int32", "boolean": "bool"}
_INT_RANGE = {"long": (-(2**63), 2**63 - 1), "integer": (-(2**31), 2**31 - 1)}


def _check(value: Any, kind: str) -> tuple[Any, str | None]:
    """Return (converted value, None) or (None, problem)."""
    if kind in ("double", "float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None, f"expected a number, got {type(value).__name__}"
        if isinstance(value, float) and not math.isfinite(value):
            return None, "expected a finite number"
        return float(value), None
    if kind in ("long", "integer"):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            return None, f"expected an integer, got {type(value).__name__}"
        lo, hi = _INT_RANGE[kind]
        if not lo <= value <= hi:
            return None, f"integer out of range for {kind}"
        return value, None
    if kind == "string":
        if not isinstance(value, str):
            return None, f"expected a string, got {type(value).__name__}"
        return value, None
    if kind == "boolean":
        if not isinstance(value, bool):
            return None, f"expected a boolean, got {type(value).__name__}"
        return value, None
    return None, f"unsupported type {kind}"  # pragma: no cover - spec_from_signature rejects these


def parse_chunk(
    values: pd.Series, spec: InputSpec
) -> tuple[list[str | None], list[str | None], list[Any], dict[str, list[Any]]]:
    """Parse raw payloads. Returns ``(reasons, event_ids, event_times, columns)`` where ``columns``
    maps feature name to a list aligned with ``values`` (None where the row is invalid)."""
    n = len(values)
    reasons: list[str | None] = [None] * n
    ids: list[str | None] = [None] * n
    times: list[Any] = [None] * n
    cols = {f.name: [None] * n for f in spec.features}
    id_f, time_f = spec.event_id_field, spec.event_time_field
    feats = spec.features
    loads = orjson.loads
    for i, raw in enumerate(values):
        if raw is None:
            reasons[i] = "empty payload (null value)"
            continue
        try:
            obj = loads(raw)
        except orjson.JSONDecodeError as e:
            reasons[i] = f"invalid JSON: {e}"
            continue
        if not isinstance(obj, dict):
            reasons[i] = f"expected a JSON object, got {type(obj).__name__}"
            continue
        eid = obj.get(id_f)
        if eid is None or isinstance(eid, (dict, list, bool)) or eid == "":
            reasons[i] = (
                f"missing required field {id_f!r}"
                if eid is None
                else f"field {id_f!r}: expected a string or integer id"
            )
            continue
        et = obj.get(time_f)
        if et is None:
            reasons[i] = f"missing required field {time_f!r}"
            continue
        if isinstance(et, bool) or not isinstance(et, (str, int, float)):
            reasons[i] = f"field {time_f!r}: expected an ISO-8601 string or epoch milliseconds"
            continue
        problem = None
        row: list[Any] = []
        for f in feats:
            v = obj.get(f.name)
            if v is None:
                if f.required:
                    problem = f"missing required field {f.name!r}"
                    break
                row.append(None)
                continue
            v, why = _check(v, f.type)
            if why:
                problem = f"field {f.name!r}: {why}"
                break
            row.append(v)
        if problem:
            reasons[i] = problem
            continue
        ids[i] = str(eid)
        times[i] = et
        for f, v in zip(feats, row, strict=True):
            cols[f.name][i] = v
    return reasons, ids, times, cols


def _parse_times(times: list[Any], reasons: list[str | None], time_field: str) -> pd.Series:
    """Vectorised: ISO-8601 strings (any offset) and epoch milliseconds -> UTC timestamps."""
    n = len(times)
    out = pd.Series(pd.NaT, index=range(n), dtype="datetime64[ns, UTC]")
    str_idx = [i for i, t in enumerate(times) if isinstance(t, str)]
    num_idx = [i for i, t in enumerate(times) if t is not None and not isinstance(t, str)]
    if str_idx:
        parsed = pd.to_datetime(
            pd.Series([times[i] for i in str_idx], dtype="object"), utc=True, errors="coerce", format="ISO8601"
        )
        out.iloc[str_idx] = parsed.to_numpy()
    if num_idx:
        nums = pd.Series([times[i] for i in num_idx], dtype="float64")
        with np.errstate(all="ignore"):
            parsed = pd.to_datetime(nums, unit="ms", utc=True, errors="coerce")
        out.iloc[num_idx] = parsed.to_numpy()
    bad = out.isna().to_numpy()
    for i in str_idx + num_idx:
        if bad[i]:
            reasons[i] = f"field {time_field!r}: not a valid timestamp ({times[i]!r})"[:300]
    return out


def score_chunk(values: pd.Series, spec: InputSpec, model: Any) -> pd.DataFrame:
    """Parse + validate + predict. ``model`` is anything with ``predict(pandas.DataFrame)``."""
    reasons, ids, times, cols = parse_chunk(values, spec)
    event_time = _parse_times(times, reasons, spec.event_time_field)
    ok = np.array([r is None for r in reasons], dtype=bool)
    n = len(values)
    out = pd.DataFrame({"ok": ok, "reason": reasons, "event_id": ids, "event_time": event_time})
    valid_idx = np.flatnonzero(ok)
    features = {}
    for f in spec.features:
        full = cols[f.name]
        if f.type in _NUMPY and f.required:
            arr = np.zeros(n, dtype=_NUMPY[f.type])
            if len(valid_idx):
                arr[valid_idx] = [full[i] for i in valid_idx]
            features[f.name] = arr
        else:
            features[f.name] = pd.Series(full, dtype="object")
    feat_df = pd.DataFrame(features, index=range(n))
    preds = None
    if len(valid_idx):
        try:
            preds = _first_column(model.predict(feat_df.iloc[valid_idx].reset_index(drop=True)))
            if len(preds) != len(valid_idx):
                raise ValueError(f"model returned {len(preds)} predictions for {len(valid_idx)} rows")
        except Exception as e:  # noqa: BLE001 - every row must end up somewhere: dead-letter with the cause
            msg = f"model error: {type(e).__name__}: {e}"[:1000]
            for i in valid_idx:
                reasons[i] = msg
            ok[:] = False
            valid_idx = valid_idx[:0]
            preds = None
            out["ok"] = ok
            out["reason"] = reasons
    for f in spec.features:
        out[f.name] = feat_df[f.name]
    out["prediction"] = _prediction_column(preds, valid_idx, n, spec.prediction_type)
    return out


def _first_column(preds: Any) -> np.ndarray:
    if isinstance(preds, pd.DataFrame):
        preds = preds.iloc[:, 0]
    arr = np.asarray(preds)
    if arr.ndim > 1:
        arr = arr[:, 0]
    return arr


def _prediction_column(preds: np.ndarray | None, valid_idx: np.ndarray, n: int, kind: str) -> Any:
    """Predictions placed at the valid rows, null elsewhere, typed for the output schema."""
    mask = np.ones(n, dtype=bool)
    mask[valid_idx] = False
    if kind in ("long", "integer"):
        values = np.zeros(n, dtype="int64" if kind == "long" else "int32")
        if preds is not None:
            values[valid_idx] = np.asarray(preds).astype(values.dtype)
        return pd.arrays.IntegerArray(values, mask)
    if kind in ("double", "float"):
        values = np.full(n, np.nan, dtype="float64")
        if preds is not None:
            values[valid_idx] = np.asarray(preds, dtype="float64")
        return values
    if kind == "boolean":
        values = np.zeros(n, dtype=bool)
        if preds is not None:
            values[valid_idx] = np.asarray(preds).astype(bool)
        return pd.arrays.BooleanArray(values, mask)
    values = np.full(n, None, dtype=object)
    if preds is not None:
        values[valid_idx] = [str(v) for v in preds]
    return values
