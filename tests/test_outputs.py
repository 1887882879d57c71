"""The output contract (pure pandas, no Spark): every output a model's signature names becomes a
typed column, checked row by row; nothing is taken from the wrong place."""

from __future__ import annotations

import numpy as np
import orjson
import pandas as pd
import pytest
from mlflow.models import infer_signature
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression

from streamscore.demo import FEATURES, iris_frame
from streamscore.errors import ConfigError
from streamscore.registry_watch.gate import synthetic_rows
from streamscore.registry_watch.resolve import ModelRef, check_uc_ref
from streamscore.scoring.records import parse_chunk, score_chunk
from streamscore.scoring.spec import RESERVED_COLUMNS, SignatureError, compatible, spec_from_signature
from tests.helpers import PYFUNC_REQUIREMENTS


@pytest.fixture(scope="module")
def data():
    X, y = iris_frame()
    y = y.map({0: "setosa", 1: "versicolor", 2: "virginica"}) if y.dtype.kind in "iu" else y
    return X, y


def _events(X: pd.DataFrame) -> pd.Series:
    return pd.Series(
        [
            orjson.dumps({"event_id": f"e{i}", "event_time": 1_700_000_000_000, **r})
            for i, r in enumerate(X.to_dict("records"))
        ]
    )


def _spec(X, output, **kw):
    return spec_from_signature(infer_signature(X, output), "event_id", "event_time", "model 'm' version 1", **kw)


class Proba:
    """What mlflow's sklearn pyfunc does with ``pyfunc_predict_fn="predict_proba"``."""

    def __init__(self, clf):
        self.clf = clf

    def predict(self, frame):
        return self.clf.predict_proba(frame)


def test_predict_proba_gives_every_probability_not_the_first_column(data):
    X, y = data
    clf = RandomForestClassifier(n_estimators=5, random_state=0).fit(X, y)
    spec = _spec(X, clf.predict_proba(X), predict_fn="predict_proba")
    (out,) = spec.output_list
    assert (out.name, out.ddl, out.length) == ("probabilities", "array<double>", 3)

    scored = score_chunk(_events(X), spec, Proba(clf))

    assert scored["ok"].all() and "prediction" not in scored
    got = np.stack(scored["probabilities"].to_numpy())
    assert np.array_equal(got, clf.predict_proba(X))  # every row, every class, bit for bit


def test_named_outputs_keep_their_names_and_are_checked_each(data):
    X, y = data
    clf = LogisticRegression(max_iter=500).fit(X, y)

    class Several:
        def predict(self, frame):
            p = clf.predict_proba(frame)
            score = p.max(axis=1).astype(object)
            score[frame["sepal_length"].to_numpy() == 5.0] = None  # no score for these rows
            return pd.DataFrame({"label": clf.predict(frame), "score": score, "explanation_id": "x"})

    example = pd.DataFrame({"label": clf.predict(X), "score": clf.predict_proba(X).max(1), "explanation_id": "x"})
    spec = _spec(X, example)
    assert [(o.name, o.ddl) for o in spec.output_list] == [
        ("label", "string"),
        ("score", "double"),
        ("explanation_id", "string"),
    ]

    scored = score_chunk(_events(X), spec, Several(), "model 'm' version 1")

    bad = X["sepal_length"].to_numpy() == 5.0
    assert bad.any() and (scored["ok"].to_numpy() == ~bad).all()
    assert scored["reason"][bad].str.contains("output 'score': no prediction", regex=False).all()
    good = scored[~bad]
    assert (good["label"].to_numpy() == clf.predict(X[~bad])).all()
    assert np.allclose(good["score"].astype(float), clf.predict_proba(X[~bad]).max(axis=1))


def test_a_result_that_does_not_fit_the_signature_is_never_cut_to_fit(data):
    X, y = data
    clf = LogisticRegression(max_iter=500).fit(X, y)
    labels = _spec(X, clf.predict(X))  # the signature promises one label per row
    scored = score_chunk(_events(X.head(20)), labels, Proba(clf), "model 'm' version 2")
    assert not scored["ok"].any()
    assert scored["reason"].str.contains("returned 3 values per row for the one output 'prediction'").all()

    proba = _spec(X, clf.predict_proba(X), predict_fn="predict_proba")

    class Ragged:
        def predict(self, frame):
            rows = [list(r) for r in clf.predict_proba(frame)]
            rows[1] = rows[1][:2]  # one row short of a class
            rows[2] = [0.5, "x", 0.5]
            return rows

    scored = score_chunk(_events(X.head(5)), proba, Ragged())
    assert scored["ok"].tolist() == [True, False, False, True, True]
    assert "2 values, expected 3" in scored["reason"][1] and "output 'probabilities'" in scored["reason"][1]
    assert "is not a number" in scored["reason"][2]


def test_output_names_may_not_take_a_column_streamscore_or_the_input_owns(data):
    X, _ = data
    for name in ("batch_id", "sepal_length"):
        with pytest.raises(SignatureError, match=f"clash.*'{name}'"):
            _spec(X, pd.DataFrame({name: [1.0] * len(X), "other": 1.0}))
    assert {"ok", "reason", "raw_value", "model_version", "source_offset", "event_id"} <= RESERVED_COLUMNS


def test_the_gate_compares_outputs_with_the_table(data):
    X, y = data
    clf = LogisticRegression(max_iter=500).fit(X, y)
    proba = _spec(X, clf.predict_proba(X), predict_fn="predict_proba")
    labels = _spec(X, clf.predict(X))
    with pytest.raises(SignatureError, match="output 'prediction' \\(string\\) has no column.*'probabilities'"):
        compatible(proba, labels, "model 'm' version 3")
    four = _spec(X, np.c_[clf.predict_proba(X), np.zeros(len(X))], predict_fn="predict_proba")
    compatible(proba, four, "m")  # the array column holds any number of classes (recorded per version)


def test_unsigned_models_declare_their_inputs(data):
    X, _ = data
    declared = {f: "double" for f in FEATURES}
    spec = spec_from_signature(None, "event_id", "event_time", "m", input_schema=declared)
    assert spec.feature_names == FEATURES and spec.outputs is None  # outputs come from the gate's sample
    with pytest.raises(SignatureError, match="model.input_schema"):
        spec_from_signature(None, "event_id", "event_time", "m")
    signed = infer_signature(X.assign(extra=1.0), np.zeros(len(X)))
    with pytest.raises(SignatureError, match="does not fit model.input_schema: needs input 'extra'"):
        spec_from_signature(signed, "event_id", "event_time", "m", input_schema=declared)


def test_synthetic_sample_rows_parse_against_the_signature(data):
    X, _ = data
    spec = _spec(X.assign(kind="a", n=1, flag=True), np.zeros(len(X)))
    rows = synthetic_rows(spec, 3)
    assert parse_chunk(pd.Series(rows), spec)[0] == [None, None, None]


def test_model_uris_and_unity_catalog_references():
    assert ModelRef.parse_uri("models:/fraud@champion") == ("fraud", ModelRef("alias", "champion"))
    assert ModelRef.parse_uri("models:/main.ml.fraud/4") == ("main.ml.fraud", ModelRef("version", "4"))
    with pytest.raises(ConfigError, match="not a model URI"):
        ModelRef.parse_uri("models:/")
    for ref, why in (("stage:Production", "no stages"), ("latest", "no 'latest'"), ("@latest", "reserves")):
        with pytest.raises(ConfigError, match=why):
            check_uc_ref(ModelRef.parse(ref), "main.ml.fraud")
    check_uc_ref(ModelRef.parse("@champion"), "main.ml.fraud")


def test_settings_take_model_uris_and_refuse_uc_stages(tmp_path):
    from streamscore.conf.settings import load_settings

    s = load_settings("local", overrides={"model": {"ref": "models:/fraud@champion"}})
    assert (s.model.name, s.model.ref) == ("fraud", "@champion")
    with pytest.raises(ConfigError, match="names model 'fraud' but model.name is 'other'"):
        load_settings("local", overrides={"model": {"name": "other", "ref": "models:/fraud/3"}})
    with pytest.raises(ConfigError, match="Unity Catalog models have no stages"):
        load_settings(
            "local",
            overrides={"tracking": {"registry_uri": "databricks-uc"}, "model": {"ref": "stage:Production"}},
        )
    schema = tmp_path / "inputs.yaml"
    schema.write_text("a: double\nb: LONG\n")
    s = load_settings("local", overrides={"model": {"input_schema": str(schema)}})
    assert s.model.input_schema == {"a": "double", "b": "long"}
    with pytest.raises(ConfigError, match="input_schema"):
        load_settings("local", overrides={"model": {"input_schema": {"a": "tensor"}}})


def test_a_model_s_only_output_is_the_prediction_column_whatever_its_name(data):
    X, y = data
    for only in (pd.Series(y.to_numpy(), name="species"), pd.DataFrame({"score": np.ones(len(X))}), y.to_numpy()):
        (out,) = _spec(X, only).output_list
        assert out.name == "prediction" and not out.array


def test_a_replayed_version_is_scored_with_its_own_output_layout(data, tmp_path):
    """A stream whose table came from a Spark ML version (``prediction``, ``probabilities``) replays
    a batch of a pyfunc version returning a DataFrame with those columns: the watcher reads that
    version's layout from its MLmodel file (nothing of it loaded), and its rows score."""
    from dataclasses import replace

    import mlflow.pyfunc

    from streamscore.registry_watch.gate import own_outputs
    from streamscore.scoring.spec import Output

    X, y = data
    clf = LogisticRegression(max_iter=300).fit(X, y)

    class Frame(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            p = clf.predict_proba(model_input[FEATURES])
            return pd.DataFrame({"prediction": p.argmax(axis=1).astype(float), "probabilities": list(p)})

    frame = Frame().predict(None, X.head(5))
    path = tmp_path / "frame-model"
    mlflow.pyfunc.save_model(
        str(path), python_model=Frame(), signature=infer_signature(X, frame), pip_requirements=PYFUNC_REQUIREMENTS
    )
    table = (Output("prediction", "double"), Output("probabilities", "double", array=True, length=3))
    stream = spec_from_signature(infer_signature(X, np.zeros(len(X))), "event_id", "event_time", "m")
    stream = replace(stream, outputs=table)
    own = own_outputs(str(path), stream)

    assert own is not None
    assert [(o.name, o.key) for o in own] == [("prediction", "prediction"), ("probabilities", "probabilities")]

    class Loaded:  # what the loaded pyfunc does, without loading it
        def predict(self, frame):
            return Frame().predict(None, frame)

    with_stream_layout = score_chunk(_events(X.head(10)), stream, Loaded())
    assert not with_stream_layout["ok"].any()  # the first version's layout does not fit this one
    scored = score_chunk(_events(X.head(10)), replace(stream, outputs=own), Loaded())
    assert scored["ok"].all()
    assert np.array_equal(np.stack(scored["probabilities"].to_numpy()), clf.predict_proba(X.head(10)))
