"""Parse, validate and score one chunk of raw JSON events (pure pandas; runs inside the Spark UDF).

Every input row yields exactly one output row: either ``ok=True`` with the typed features and the
outputs, or ``ok=False`` with a ``reason`` that names the field and the problem. Nothing is
dropped, so rows in = rows scored + rows dead-lettered holds per chunk and therefore per batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pandas as pd

from streamscore.scoring.spec import InputSpec, Output

_NUMPY = {"double": "float64", "float": "float32", "long": "int64", "integer": "int32", "boolean": "bool"}
_MAX_EPOCH_MS = 9.2e12
_EXACT = {"double": float, "float": float, "string": str}
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
    # values of exactly this type need no conversion (a finite float for a double, a str for a
    # string); anything else goes through _check
    exact_types = [_EXACT.get(f.type) for f in feats]
    loads = orjson.loads
    max_bytes = spec.max_message_bytes
    for i, raw in enumerate(values):
        if raw is None:
            reasons[i] = "empty payload (null value)"
            continue
        if max_bytes is not None and len(raw) > max_bytes // 4 and _size(raw) > max_bytes:
            reasons[i] = f"message of {_size(raw)} bytes is larger than source.max_message_bytes ({max_bytes})"
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
        for f, exact in zip(feats, exact_types, strict=True):
            v = obj.get(f.name)
            if type(v) is exact and (exact is not float or v - v == 0.0):  # type: ignore[operator] # common case, inline
                row.append(v)
                continue
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


def _size(raw: bytes | str) -> int:
    return len(raw) if isinstance(raw, bytes | bytearray) else len(raw.encode("utf-8", errors="replace"))


def _parse_times(times: list[Any], reasons: list[str | None], time_field: str) -> pd.Series:
    """Vectorised: ISO-8601 strings (any offset) and epoch milliseconds -> UTC timestamps.

    Epoch numbers are converted here, not by ``pandas.to_datetime(unit=...)``: that path raises
    ``FloatingPointError`` on some inputs holding NaN (it reads unset memory for them), so only
    finite numbers inside the nanosecond range (years 1677-2262) are converted; the rest are NaT."""
    n = len(times)
    ns = np.full(n, np.iinfo(np.int64).min, dtype=np.int64)  # the NaT sentinel
    str_idx = [i for i, t in enumerate(times) if isinstance(t, str)]
    num_idx = [i for i, t in enumerate(times) if t is not None and not isinstance(t, str)]
    if str_idx:
        parsed = pd.to_datetime(
            pd.Series([times[i] for i in str_idx], dtype="object"), utc=True, errors="coerce", format="ISO8601"
        )
        ns[str_idx] = parsed.dt.as_unit("ns").array.asi8
    if num_idx:
        ms = np.array([times[i] for i in num_idx], dtype=np.float64)
        with np.errstate(all="ignore"):
            ok = np.isfinite(ms) & (np.abs(ms) < _MAX_EPOCH_MS)
            whole = np.floor(ms[ok])  # whole milliseconds and their fraction apart: exact to the ns
            frac_ns = np.round((ms[ok] - whole) * 1_000_000.0).astype(np.int64)
            ns[np.asarray(num_idx)[ok]] = whole.astype(np.int64) * 1_000_000 + frac_ns
    out = pd.Series(ns.view("datetime64[ns]")).dt.tz_localize("UTC")
    bad = out.isna().to_numpy()
    for i in str_idx + num_idx:
        if bad[i]:
            reasons[i] = f"field {time_field!r}: not a valid timestamp ({times[i]!r})"[:300]
    return out


@dataclass
class Parsed:
    """A chunk parsed and checked: each row's problem (None: valid), id and time, and the features
    of the valid rows (``valid_idx``) as a frame aligned with the chunk."""

    n: int
    reasons: list[str | None]
    ids: list[str | None]
    event_time: pd.Series
    features: pd.DataFrame
    valid_idx: np.ndarray


@dataclass
class Predicted:
    """One version's outputs for a chunk: columns aligned with the chunk (null where it gave no
    value), each row's problem (None where it scored or was not asked) and the rows it scored."""

    columns: dict[str, Any]
    reasons: list[str | None]
    scored_idx: np.ndarray


def parse(values: pd.Series, spec: InputSpec) -> Parsed:
    """Parse and check a chunk of raw payloads (no model)."""
    reasons, ids, times, cols = parse_chunk(values, spec)
    event_time = _parse_times(times, reasons, spec.event_time_field)
    n = len(values)
    valid_idx = np.flatnonzero(np.array([r is None for r in reasons], dtype=bool))
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
    return Parsed(n, reasons, ids, event_time, pd.DataFrame(features, index=range(n)), valid_idx)


def predict(model: Any, parsed: Parsed, spec: InputSpec, label: str, rows: np.ndarray | None = None) -> Predicted:
    """``model``'s outputs (``spec``'s) for the valid rows of ``parsed``, or the subset ``rows`` of
    them; rows it fails on, or gives no usable value for, get a reason naming ``label``."""
    idx = parsed.valid_idx if rows is None else rows
    reasons: list[str | None] = [None] * parsed.n
    preds: dict[str, np.ndarray] | None = None
    if len(idx):
        preds, idx = _predict(model, parsed.features.iloc[idx].reset_index(drop=True), idx, spec, label, reasons)
    columns = {
        o.name: _output_column(None if preds is None else preds[o.name], idx, parsed.n, o) for o in spec.output_list
    }
    return Predicted(columns, reasons, idx)


def problems(parsed: Parsed, predicted: Predicted) -> list[str | None]:
    """Each row's problem: the parse's, else the model's (None: scored)."""
    return [a if a is not None else b for a, b in zip(parsed.reasons, predicted.reasons, strict=True)]


def result_frame(
    parsed: Parsed, reasons: list[str | None], spec: InputSpec, outputs: dict[str, Any] | None = None
) -> pd.DataFrame:
    """A chunk's result: ``ok`` and ``reason`` from ``reasons``, the event, its features and, given
    ``outputs`` (by name), the model's outputs in ``spec``'s order."""
    ok = np.array([r is None for r in reasons], dtype=bool)
    out = pd.DataFrame({"ok": ok, "reason": reasons, "event_id": parsed.ids, "event_time": parsed.event_time})
    for f in spec.features:
        out[f.name] = parsed.features[f.name]
    if outputs is not None:
        for o in spec.output_list:
            out[o.name] = outputs[o.name]
    return out


def score_chunk(values: pd.Series, spec: InputSpec, model: Any, label: str = "the model") -> pd.DataFrame:
    """Parse + validate + predict. ``model`` is anything with ``predict(pandas.DataFrame)``;
    ``label`` names it in the reasons of rows it could not score. With ``model`` None the chunk is
    parsed and validated only (no output columns): a model applied outside Python scores it."""
    parsed = parse(values, spec)
    if model is None:
        return result_frame(parsed, parsed.reasons, spec)
    p = predict(model, parsed, spec, label)
    return result_frame(parsed, problems(parsed, p), spec, p.columns)


def _predict(
    model: Any,
    frame: pd.DataFrame,
    valid_idx: np.ndarray,
    spec: InputSpec,
    label: str,
    reasons: list[str | None],
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Predict the valid rows; rows the model fails on, or gives no usable value for (in any of its
    outputs), get the reason in ``reasons``. Returns each output's usable values and the rows they
    belong to."""
    outputs = spec.output_list
    raw, problems = _Isolating(model, label, outputs).run(frame)
    checked = {o.name: _check_output(raw[o.name], o, problems, len(outputs) > 1) for o in outputs}
    failed = np.array([p is not None for p in problems], dtype=bool)
    if not failed.any():
        return checked, valid_idx
    for j in np.flatnonzero(failed):
        problem = problems[j] or ""
        reasons[valid_idx[j]] = problem if problem.startswith("model error") else f"model error: {problem} ({label})"
    return {k: np.asarray(v)[~failed] for k, v in checked.items()}, valid_idx[~failed]


# Predicting a chunk, row-level: a model that fails or returns a bad value for some rows costs
# only those rows (dead-lettered with the reason), never the chunk.
MAX_PREDICT_CALLS = 256  # per chunk, spent isolating the rows a model fails on
ROW_BY_ROW_BELOW = 8  # pieces this small are retried row by row
_INT_BOUNDS = {
    "long": (np.iinfo(np.int64).min, np.iinfo(np.int64).max),
    "integer": (np.iinfo(np.int32).min, np.iinfo(np.int32).max),
}


class _Isolating:
    """``predict`` on a frame; when it raises (or returns the wrong number of values), the frame is
    split in halves, pieces below :data:`ROW_BY_ROW_BELOW` rows row by row, until the failing rows
    are isolated or :data:`MAX_PREDICT_CALLS` calls are spent (the rest of the piece then shares
    the error)."""

    def __init__(self, model: Any, label: str, outputs: tuple[Output, ...]):
        self.model, self.label, self.outputs, self.calls = model, label, outputs, 0
        self.last_error = f"model error ({label})"

    def run(self, frame: pd.DataFrame) -> tuple[dict[str, np.ndarray], list[str | None]]:
        """Each output's values (aligned with ``frame``; None where a row failed) and each row's problem."""
        n = len(frame)
        problems: list[str | None] = [None] * n
        pieces: list[tuple[int, dict[str, np.ndarray]]] = []
        self._solve(frame, 0, problems, pieces)
        if len(pieces) == 1 and len(next(iter(pieces[0][1].values()))) == n:
            return pieces[0][1], problems
        merged = {}
        for o in self.outputs:
            out = np.full(n, None, dtype=object)
            for start, preds in pieces:
                values = preds[o.name]
                for j in range(len(values)):
                    out[start + j] = values[j]
            merged[o.name] = out
        return merged, problems

    def _call(self, frame: pd.DataFrame) -> dict[str, np.ndarray]:
        self.calls += 1
        return extract_outputs(self.model.predict(frame), self.outputs, len(frame))

    def _solve(
        self,
        frame: pd.DataFrame,
        start: int,
        problems: list[str | None],
        pieces: list[tuple[int, dict[str, np.ndarray]]],
    ) -> None:
        n = len(frame)
        if self.calls >= MAX_PREDICT_CALLS:  # out of budget: the piece shares the last error
            problems[start : start + n] = [self.last_error] * n
            return
        try:
            pieces.append((start, self._call(frame.reset_index(drop=True))))
            return
        except Exception as e:  # noqa: BLE001 - every row must end up somewhere: dead-letter with the cause
            self.last_error = f"model error: {type(e).__name__}: {str(e)[:900]} ({self.label})"
        if n == 1:
            problems[start] = self.last_error
            return
        bounds = [(i, i + 1) for i in range(n)] if n <= ROW_BY_ROW_BELOW else [(0, n // 2), (n // 2, n)]
        for a, b in bounds:
            self._solve(frame.iloc[a:b], start + a, problems, pieces)


def _check_predictions(preds: np.ndarray, kind: str, problems: list[str | None]) -> np.ndarray:
    """Predictions as ``kind`` (object array; None where not usable); a row whose value is missing
    or of the wrong type gets a problem."""
    arr = np.asarray(preds)
    n = len(arr)
    if kind in ("long", "integer") and arr.dtype.kind in "iub":
        lo, hi = _INT_BOUNDS[kind]
        bad = (arr < lo) | (arr > hi) if arr.dtype.kind != "b" else np.zeros(n, dtype=bool)
    elif kind in ("long", "integer") and arr.dtype.kind == "f":
        lo, hi = _INT_BOUNDS[kind]
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(arr) | (arr != np.floor(arr)) | (arr < lo) | (arr > hi)
    elif kind in ("double", "float") and arr.dtype.kind in "iufb":
        bad = np.zeros(n, dtype=bool)
    elif kind == "boolean" and arr.dtype.kind in "biu":
        bad = ~np.isin(arr, [0, 1]) if arr.dtype.kind != "b" else np.zeros(n, dtype=bool)
    elif kind == "string" and arr.dtype.kind in "USiufb":
        bad = np.zeros(n, dtype=bool)
    else:  # object arrays (and anything unusual): value by value
        out = np.full(n, None, dtype=object)
        for i, v in enumerate(arr):
            if problems[i] is None:
                out[i], problems[i] = _one_prediction(v, kind)
        return out
    if not bad.any():
        return arr
    out = arr.astype(object)
    for j in np.flatnonzero(bad):
        if problems[j] is None:
            problems[j] = f"prediction {arr[j].item()!r} is not a valid {kind}"
    return out


def _one_prediction(v: Any, kind: str) -> tuple[Any, str | None]:
    if v is None or (isinstance(v, float) and math.isnan(v) and kind not in ("double", "float")):
        return None, f"no prediction ({v!r}) for this row"
    if hasattr(v, "item"):  # numpy scalars
        v = v.item()
    if kind in ("long", "integer"):
        if isinstance(v, float) and math.isfinite(v) and v.is_integer():
            v = int(v)
        lo, hi = _INT_BOUNDS[kind]
        if isinstance(v, int) and lo <= v <= hi:
            return int(v), None
        return None, f"prediction {v!r} is not a valid {kind}"
    if kind in ("double", "float"):
        if isinstance(v, (int, float)):
            return float(v), None
        return None, f"prediction {v!r} is not a number"
    if kind == "boolean":
        if isinstance(v, bool) or v in (0, 1):
            return bool(v), None
        return None, f"prediction {v!r} is not a boolean"
    if isinstance(v, (str, int, float, bool)):
        return str(v), None
    return None, f"prediction of type {type(v).__name__} is not a string"


def extract_outputs(raw: Any, outputs: tuple[Output, ...], n: int) -> dict[str, np.ndarray]:
    """Each output's ``n`` values from what ``predict`` returned; raises ValueError when the result
    does not have the shape the outputs promise (a wrong number of rows, a missing named output,
    several values per row for a scalar output): never a plausible column taken from the wrong place."""
    if len(outputs) == 1 and outputs[0].key is None:
        o = outputs[0]
        return {o.name: _sized(_one_output(raw, o), n, o)}
    if isinstance(raw, pd.DataFrame):
        have = {str(c): raw[c] for c in raw.columns}
    elif isinstance(raw, dict):
        have = {str(k): v for k, v in raw.items()}
    else:
        names = ", ".join(repr(o.key) for o in outputs)
        raise ValueError(f"returned a {type(raw).__name__}, not the named outputs {names} its signature promises")
    found = {}
    for o in outputs:
        if o.key not in have:
            raise ValueError(f"returned no output {o.key!r} (it returned {', '.join(map(repr, have)) or 'none'})")
        found[o.name] = _sized(_one_output(have[str(o.key)], o), n, o)
    return found


def _one_output(raw: Any, o: Output) -> np.ndarray:
    if isinstance(raw, pd.DataFrame):
        if o.array:
            return raw.to_numpy()
        if raw.shape[1] != 1:
            raise ValueError(f"returned {raw.shape[1]} columns for the one output {o}")
        raw = raw.iloc[:, 0]
    if o.array and isinstance(raw, (list, tuple, pd.Series)) and not isinstance(raw, np.ndarray):
        items = list(raw)
        try:
            arr = np.asarray(items)
        except ValueError:  # rows of different lengths: checked row by row
            arr = np.empty(len(items), dtype=object)
            for i, v in enumerate(items):
                arr[i] = v
        if arr.ndim == 2 or arr.dtype == object:
            return arr
    arr = np.asarray(raw)
    if o.array:
        if arr.ndim != 2 and arr.dtype != object:
            raise ValueError(f"returned a {arr.ndim}-dimensional result for the array output {o}")
        return arr
    if arr.ndim == 2:
        if arr.shape[1] != 1:
            raise ValueError(
                f"returned {arr.shape[1]} values per row for the one output {o}: the model's output signature "
                "promises one (log the model with the signature of what it predicts)"
            )
        arr = arr[:, 0]
    elif arr.ndim > 2:
        raise ValueError(f"returned a {arr.ndim}-dimensional result for the output {o}")
    return arr


def _sized(arr: np.ndarray, n: int, o: Output) -> np.ndarray:
    if len(arr) != n:
        what = "predictions" if o.name == "prediction" else f"values of output {o.name!r}"
        raise ValueError(f"returned {len(arr)} {what} for {n} rows")
    return arr


def _check_output(values: np.ndarray, o: Output, problems: list[str | None], named: bool) -> np.ndarray:
    """One output's values checked row by row (see :func:`_check_predictions`); the problems of a
    model with several outputs name the output."""
    own: list[str | None] = [None] * len(values)
    checked = _check_array(values, o, own) if o.array else _check_predictions(values, o.type, own)
    for j, p in enumerate(own):
        if p is not None and problems[j] is None:
            problems[j] = f"output {o.name!r}: {p}" if named or o.array else p
    return checked


def _check_array(values: np.ndarray, o: Output, problems: list[str | None]) -> np.ndarray:
    """Array outputs: a 2-D numeric array of the right width passes whole; anything else is read
    row by row (each row a sequence of ``o.length`` values of ``o.type``)."""
    n = len(values)
    if values.ndim == 2 and values.dtype != object:
        if o.length is not None and values.shape[1] != o.length:
            problems[:] = [f"{values.shape[1]} values, expected {o.length}"] * n
            return np.full(n, None, dtype=object)
        fast = {"double": "iuf", "float": "iuf", "long": "iu", "integer": "iu", "boolean": "b", "string": "U"}
        if values.dtype.kind in fast[o.type] and not (o.type == "integer" and values.dtype.itemsize > 4):
            return values
    out = np.full(n, None, dtype=object)
    for i in range(n):
        row = values[i]
        if row is None or isinstance(row, (str, bytes)) or not hasattr(row, "__len__"):
            problems[i] = f"expected a list of {o.type} values, got {type(row).__name__}"
            continue
        items = list(row)
        if o.length is not None and len(items) != o.length:
            problems[i] = f"{len(items)} values, expected {o.length}"
            continue
        converted = []
        for v in items:
            value, why = _one_prediction(v, o.type)
            if why:
                problems[i] = f"element {why}"
                break
            converted.append(value)
        else:
            out[i] = converted
    return out


def _output_column(values: np.ndarray | None, valid_idx: np.ndarray, n: int, o: Output) -> Any:
    if not o.array:
        return _prediction_column(values, valid_idx, n, o.type)
    column = np.full(n, None, dtype=object)
    if values is not None:
        dtype = _NUMPY.get(o.type)
        for j, i in enumerate(valid_idx):
            column[i] = np.asarray(values[j], dtype=dtype) if dtype else [str(v) for v in values[j]]
    return column


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
