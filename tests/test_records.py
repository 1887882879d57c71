"""Parsing, validation and scoring of raw events (pure pandas, no Spark)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression

from streamscore.demo import FEATURES, iris_frame
from streamscore.registry_watch.resolve import ModelRef
from streamscore.scoring.records import score_chunk
from streamscore.scoring.spec import Field, InputSpec, SignatureError, compatible, spec_from_signature
from tests.fuzz import fuzz_corpus
from tests.helpers import SKLEARN_PIP

SPEC = InputSpec("event_id", "event_time", tuple(Field(f, "double") for f in FEATURES), "long")


@pytest.fixture(scope="module")
def model():
    X, y = iris_frame()
    return LogisticRegression(max_iter=500).fit(X, y)


def _event(i, **over):
    X, _ = iris_frame()
    rec = {"event_id": f"e{i}", "event_time": "2026-01-02T03:04:05Z", **X.iloc[i % 150].to_dict()}
    rec.update(over)
    return orjson.dumps({k: v for k, v in rec.items() if v is not ...})


def test_valid_rows_are_scored_like_the_model(model):
    X, _ = iris_frame()
    values = pd.Series([_event(i) for i in range(150)])
    out = score_chunk(values, SPEC, model)
    assert out["ok"].all() and out["reason"].isna().all()
    assert (out["prediction"].to_numpy() == model.predict(X)).all()
    assert list(out["event_id"]) == [f"e{i}" for i in range(150)]
    assert str(out["event_time"].dtype) == "datetime64[ns, UTC]"


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"{oops", "invalid JSON"),
        (b"[1, 2]", "expected a JSON object, got list"),
        (None, "empty payload"),
        (_event(1, petal_width=...), "missing required field 'petal_width'"),
        (_event(1, event_id=...), "missing required field 'event_id'"),
        (_event(1, event_time=...), "missing required field 'event_time'"),
        (_event(1, event_time="not a time"), "field 'event_time': not a valid timestamp"),
        (_event(1, sepal_length="wide"), "field 'sepal_length': expected a number, got str"),
        (_event(1, sepal_length=True), "field 'sepal_length': expected a number, got bool"),
        (_event(1, event_id={"a": 1}), "field 'event_id': expected a string or integer id"),
    ],
)
def test_invalid_rows_get_a_reason_and_do_not_disturb_valid_ones(model, payload, reason):
    values = pd.Series([_event(0), payload, _event(2)])
    out = score_chunk(values, SPEC, model)
    assert list(out["ok"]) == [True, False, True]
    assert reason in out["reason"][1]
    assert out["prediction"].isna().tolist() == [False, True, False]


def test_epoch_millis_and_integer_values_are_accepted(model):
    out = score_chunk(pd.Series([_event(0, event_time=1_700_000_000_000, sepal_length=5)]), SPEC, model)
    assert out["ok"][0] and out["event_time"][0] == pd.Timestamp(1_700_000_000_000, unit="ms", tz="UTC")


def test_epoch_times_out_of_range_are_dead_lettered_and_fractions_kept_exactly(model):
    # pandas' own epoch conversion raised FloatingPointError on a mix like this one (CI, once)
    times = [1767225845123.5, -1.25, 1e30, -1e30, 1e300, 9.3e15, 1_700_000_000_000] * 300
    out = score_chunk(pd.Series([_event(i, event_time=t) for i, t in enumerate(times)]), SPEC, model)
    first = out.iloc[:7]
    assert first["ok"].tolist() == [True, True, False, False, False, False, True]
    assert first["event_time"][0] == pd.Timestamp("2026-01-01T00:04:05.1235Z")
    assert first["event_time"][1] == pd.Timestamp("1969-12-31T23:59:59.99875Z")
    assert "not a valid timestamp (1e+30)" in first["reason"][2]
    assert out["ok"].sum() == 3 * 300


def test_a_failing_model_dead_letters_the_rows_with_the_cause():
    class Broken:
        def predict(self, df):
            raise RuntimeError("boom")

    out = score_chunk(pd.Series([_event(0), b"{bad"]), SPEC, Broken())
    assert not out["ok"].any()
    assert "model error: RuntimeError: boom" in out["reason"][0] and "invalid JSON" in out["reason"][1]


def test_spec_from_signature_and_compatibility(model):
    from mlflow.models import infer_signature

    X, y = iris_frame()
    spec = spec_from_signature(infer_signature(X, model.predict(X)), "event_id", "event_time", "m v1")
    assert spec.feature_names == FEATURES and spec.prediction_type == "long"
    compatible(spec, spec, "m v2")
    wider = spec_from_signature(infer_signature(X.assign(extra=1.0), model.predict(X)), "event_id", "event_time", "x")
    with pytest.raises(SignatureError, match="needs input 'extra'"):
        compatible(spec, wider, "m v3")
    regressor = spec_from_signature(infer_signature(X, model.predict(X).astype(float)), "event_id", "event_time", "x")
    with pytest.raises(SignatureError, match="predicts double but the output table holds long"):
        compatible(spec, regressor, "m v4")
    with pytest.raises(SignatureError, match="no input signature"):
        spec_from_signature(None, "event_id", "event_time", "m v5")


def test_model_refs():
    assert ModelRef.parse("@champion") == ModelRef("alias", "champion")
    assert ModelRef.parse("stage:Production") == ModelRef("stage", "Production")
    assert ModelRef.parse("latest") == ModelRef("latest", "")
    assert ModelRef.parse("7") == ModelRef("version", "7")
    with pytest.raises(ValueError, match="not a model reference"):
        ModelRef.parse("champion")


def test_worker_model_cache_is_bounded(tmp_path, model):
    """Many swaps must not grow a worker's memory: at most CACHE_SIZE versions stay loaded."""
    import mlflow.sklearn
    from mlflow.models import infer_signature

    from streamscore.scoring import udf

    X, _ = iris_frame()
    path = tmp_path / "m"
    mlflow.sklearn.save_model(
        model, str(path), signature=infer_signature(X, model.predict(X)), pip_requirements=SKLEARN_PIP
    )
    for v in range(50):
        udf.load_model(udf.ModelHandle("cache-test", str(v), "run", str(path), "ship"))
    mine = [k for k in udf.cached_versions() if k[0] == "cache-test"]
    assert mine == [("cache-test", str(v)) for v in range(50 - udf.CACHE_SIZE, 50)]


class Picky:
    """Scores like ``model`` except on rows whose sepal_length is in ``bad``, where it misbehaves."""

    def __init__(self, model, bad: set, how: str):
        self.model, self.bad, self.how, self.calls = model, bad, how, 0

    def predict(self, df):
        self.calls += 1
        bad = df["sepal_length"].isin(self.bad).to_numpy()
        if self.how == "raise" and bad.any():
            raise ValueError("cannot score these rows")
        out = self.model.predict(df).astype(object)
        if self.how == "none":
            out[bad] = None
        elif self.how == "nan":
            out = out.astype(float)
            out[bad] = np.nan
        elif self.how == "string":
            out[bad] = "setosa"
        elif self.how == "short":
            return out[~bad]
        return out


@pytest.mark.parametrize(
    "how, reason",
    [
        ("raise", "model error: ValueError: cannot score these rows"),
        ("none", "no prediction (None) for this row"),
        ("nan", "prediction nan is not a valid long"),
        ("string", "prediction 'setosa' is not a valid long"),
        ("short", "returned 0 predictions for 1 rows"),
    ],
)
def test_a_model_that_fails_on_some_rows_costs_only_those_rows(model, how, reason):
    X, _ = iris_frame()
    values = pd.Series([_event(i) for i in range(150)] + [b"{broken"])
    out = score_chunk(values, SPEC, Picky(model, {5.0, 6.3}, how), "model 'm' version 7")
    bad = np.append(X["sepal_length"].isin({5.0, 6.3}).to_numpy(), True)
    assert 10 < bad.sum() < 40
    assert (out["ok"].to_numpy() == ~bad).all()  # exactly the bad rows, and the broken payload
    assert all(reason in r and r.endswith("(model 'm' version 7)") for r in out["reason"][bad][:-1])
    assert "invalid JSON" in out["reason"].iloc[-1]
    assert (out["prediction"][~bad].to_numpy() == model.predict(X)[~bad[:-1]]).all()
    assert out["prediction"][bad].isna().all()


def test_isolating_failing_rows_is_bounded(model):
    from streamscore.scoring.records import MAX_PREDICT_CALLS

    class AlwaysFails:
        calls = 0

        def predict(self, df):
            AlwaysFails.calls += 1
            raise RuntimeError("always")

    values = pd.Series([_event(i) for i in range(3000)])
    out = score_chunk(values, SPEC, AlwaysFails(), "m")
    assert not out["ok"].any() and out["reason"].str.contains("RuntimeError: always").all()
    assert AlwaysFails.calls <= MAX_PREDICT_CALLS


@pytest.mark.parametrize(
    "kind, raw, expected, problems",
    [
        ("long", np.array([1.0, 2.5, np.inf]), [1, None, None], [False, True, True]),
        ("integer", np.array([1, 2**40]), [1, None], [False, True]),
        ("double", np.array([1, None, "x"], dtype=object), [1.0, None, None], [False, True, True]),
        ("boolean", np.array([0, 1, 2]), [False, True, None], [False, False, True]),
        ("string", np.array(["a", None, 3], dtype=object), ["a", None, "3"], [False, True, False]),
    ],
)
def test_predictions_of_the_wrong_type_are_problems_of_their_rows(kind, raw, expected, problems):
    from streamscore.scoring.records import _check_predictions, _prediction_column

    found: list = [None] * len(raw)
    checked = _check_predictions(raw, kind, found)
    assert [p is not None for p in found] == problems
    keep = np.array([not p for p in problems])
    column = _prediction_column(np.asarray(checked)[keep], np.flatnonzero(keep), len(raw), kind)
    assert [None if pd.isna(v) else v for v in column] == [
        v if k else None for v, k in zip(expected, keep, strict=True)
    ]


def test_fuzzed_messages_are_all_accounted_for_with_reasons(model):
    from dataclasses import replace

    spec = replace(SPEC, max_message_bytes=2048)
    corpus = fuzz_corpus(12_000)
    out = pd.concat(
        [score_chunk(pd.Series(corpus[i : i + 1000]), spec, model) for i in range(0, len(corpus), 1000)],
        ignore_index=True,
    )
    assert len(out) == len(corpus)
    bad = out[~out["ok"]]
    assert len(bad) > 10_000 and bad["reason"].notna().all() and (bad["reason"].str.len() > 0).all()
    good = out[out["ok"]]
    assert good["prediction"].notna().all() and good["event_id"].notna().all() and good["event_time"].notna().all()
    for kind in (
        "invalid JSON",
        "larger than source.max_message_bytes",
        "empty payload",
        "missing required field",
        "expected a number",
        "not a valid timestamp",
        "expected a JSON object",
    ):
        assert bad["reason"].str.contains(kind, regex=False).any(), kind


def test_the_worker_daemon_drops_only_archives_whose_python_is_installed(tmp_path):
    """scoring/daemon.py: Spark's copy of an installed package (same version.py) leaves the path, a
    jar without Python too; an archive of another release, or of a package not installed, stays."""
    import zipfile

    import pyspark

    from streamscore.scoring.daemon import prefer_installed_copies

    installed = (Path(pyspark.__file__).parent / "version.py").read_bytes()

    def archive(name: str, files: dict[str, bytes]) -> str:
        path = tmp_path / name
        path.parent.mkdir(exist_ok=True)
        with zipfile.ZipFile(path, "w") as z:
            for member, data in files.items():
                z.writestr(member, data)
        return str(path)

    same = archive("pyspark.zip", {"pyspark/__init__.py": b"", "pyspark/version.py": installed})
    other = archive("old/pyspark.zip", {"pyspark/__init__.py": b"", "pyspark/version.py": b"__version__ = '3.5.0'\n"})
    unknown = archive("mine.zip", {"not_installed_pkg/__init__.py": b"", "not_installed_pkg/version.py": b"1"})
    jar = archive("spark-core.jar", {"org/apache/spark/SparkContext.class": b"\xca\xfe"})
    python_jar = archive("with-python.jar", {"pyspark/__init__.py": b""})
    site = str(Path(pyspark.__file__).parent.parent)
    path = [same, other, unknown, jar, python_jar, site]
    assert prefer_installed_copies(path) == [other, unknown, python_jar, site]


class _Doubles:
    """x * factor; fails (raises) on any frame holding a row with x == fail_on; sleeps per call."""

    def __init__(self, factor, fail_on=None, sleep=0.0):
        self.factor, self.fail_on, self.sleep = factor, fail_on, sleep

    def predict(self, frame):
        import time

        time.sleep(self.sleep)
        if self.fail_on is not None and (frame["x"] == self.fail_on).any():
            raise ValueError("cannot score it")
        return frame["x"].to_numpy() * self.factor


def test_one_pass_serves_the_canary_its_share_falls_back_on_its_failures_and_keeps_the_shadow_apart():
    from streamscore.scoring import plan as P

    spec = InputSpec("event_id", "event_time", (Field("x", "double"),), "double")
    ids = [f"e{i}" for i in range(400)]
    values = pd.Series(
        [orjson.dumps({"event_id": e, "event_time": 1000 + i, "x": float(i % 50)}).decode() for i, e in enumerate(ids)]
        + ["{broken"]
    )
    loaded = P.LoadedPlan((_Doubles(2), spec, "v1"), (_Doubles(3, fail_on=7.0), spec, "v2"), 0.3, None, 1.0)
    loaded.shadow = (_Doubles(5, fail_on=9.0), spec, "v3")
    out = P.score_plan_chunk(values, spec, loaded)
    x = out["x"].to_numpy()
    in_share = np.array([P.canary_bucket(e) < 0.3 for e in ids] + [False])
    failed = in_share & (x == 7.0)
    assert (out[P.CANARY].to_numpy() == in_share).all() and 80 < in_share.sum() < 160
    by_canary = out[P.BY_CANARY].to_numpy()
    assert (by_canary == (in_share & ~failed)).all()  # its failures are served by v1 ...
    assert out[P.CANARY_ERROR].notna().to_numpy().tolist() == failed.tolist()  # ... and counted as its own
    ok = out["ok"].to_numpy()
    assert ok[:-1].all() and not ok[-1]  # only the broken payload is dead-lettered
    served = out["prediction"].to_numpy()
    assert np.array_equal(served[by_canary], x[by_canary] * 3)
    assert np.array_equal(served[ok & ~by_canary], x[ok & ~by_canary] * 2)
    assert np.array_equal(out[P.CANARY_BASE].to_numpy()[ok], x[ok] * 2)  # v1's own, for the comparison
    # the shadow: its own values, its failures on its own rows only, nothing of it served
    shadow_failed = ok & (x == 9.0)
    assert out[P.SHADOW_REASON].notna().to_numpy().tolist() == shadow_failed.tolist()
    good = ok & ~shadow_failed
    assert np.array_equal(out[P.SHADOW_PREFIX + "prediction"].to_numpy()[good], x[good] * 5)
    # a shadow slower than its budget per row skips the task's later chunks, saying why
    slow = P.LoadedPlan((_Doubles(2), spec, "v1"), None, 0.0, (_Doubles(5, sleep=0.05), spec, "v3"), 1e-5)
    first = P.score_plan_chunk(values, spec, slow)
    assert first[P.SHADOW_REASON].isna().all() and slow.shadow_skip is not None
    second = P.score_plan_chunk(values, spec, slow)
    assert second[P.SHADOW_REASON][second["ok"]].str.startswith("shadow skipped").all()
    assert np.array_equal(second["prediction"].to_numpy()[ok], x[ok] * 2)
