"""Real models on the real services: a predict_proba classifier, a pyfunc with named outputs, an
unsigned model served through ``model.input_schema``, and Spark ML pipelines scored natively
(streamed, swapped under load, and on a cluster), each row checked against its labelled version's
own ``predict`` / ``transform``."""

from __future__ import annotations

import json
import subprocess
import sys

import cloudpickle
import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.models import infer_signature
from sklearn.linear_model import LogisticRegression

from streamscore.demo import (
    FEATURES,
    SPECIES,
    ensure_topic,
    iris_frame,
    produce_events,
    promote,
    register_spark_pipeline,
)
from streamscore.scoring import io as sio
from streamscore.streaming import run_stream
from tests.helpers import PYFUNC_REQUIREMENTS, StreamThread, stream_command, wait_for
from tests.test_hot_swap import Producer

pytestmark = pytest.mark.integration


def _read(spark, path) -> pd.DataFrame:
    return spark.read.format("delta").load(path).toPandas()


def _labelled():
    X, y = iris_frame()
    return X, y.map(dict(enumerate(SPECIES)))


def _topic_with_events(s, count: int, prefix: str, malformed_every: int = 20):
    k = s.source.kafka
    ensure_topic(k.bootstrap_servers, k.topic)
    return produce_events(k.bootstrap_servers, k.topic, count, malformed_every=malformed_every, prefix=prefix)


def test_a_predict_proba_classifier_without_input_example_streams_every_probability(spark, make_settings):
    """Logged as the scikit-learn docs show for scores (``pyfunc_predict_fn="predict_proba"``, the
    signature of ``predict_proba``, no input example) and started on a new checkpoint: the gate
    samples the topic; each row holds all three probabilities of its version, and the table says
    which class each position is."""
    s = make_settings(trigger={"available_now": True})
    X, y = _labelled()
    clf = LogisticRegression(max_iter=500).fit(X, y)
    with mlflow.start_run():
        info = mlflow.sklearn.log_model(
            clf,
            name="model",
            pyfunc_predict_fn="predict_proba",
            signature=infer_signature(X, clf.predict_proba(X)),
            registered_model_name=s.model.name,
            pip_requirements=PYFUNC_REQUIREMENTS,
        )
    version = str(info.registered_model_version)
    MlflowClient().set_registered_model_alias(s.model.name, "champion", version)
    sent = _topic_with_events(s, 400, "proba")

    summary = run_stream(s)

    assert summary["status"] == "FINISHED"
    assert (summary["rows_in"], summary["rows_scored"]) == (400, sent.valid)
    out = _read(spark, s.output_path)
    assert "prediction" not in out.columns
    assert sorted(out["event_id"]) == sorted(sent.valid_ids)
    own = mlflow.pyfunc.load_model(f"models:/{s.model.name}/{version}").predict(out[FEATURES])
    assert own.shape == (len(out), 3)
    assert np.array_equal(np.stack(out["probabilities"].to_numpy()), own)
    assert sio.class_labels(spark, s.output_table, version) == ["setosa", "versicolor", "virginica"]
    tags = MlflowClient().get_run(summary["run_id"]).data.tags
    assert json.loads(tags[f"streamscore.classes.v{version}"]) == ["setosa", "versicolor", "virginica"]


class Explained(mlflow.pyfunc.PythonModel):
    """Several named outputs: a label, its score, and an explanation id (no score for rows with
    sepal_width 3.0, which must be dead-lettered naming the output)."""

    def load_context(self, context):
        X, y = _labelled()
        self.clf = LogisticRegression(max_iter=500).fit(X, y)

    def predict(self, context, model_input, params=None):
        p = self.clf.predict_proba(model_input[FEATURES])
        score = p.max(axis=1).astype(object)
        score[(model_input["sepal_width"] == 3.0).to_numpy()] = None
        return pd.DataFrame(
            {
                "label": self.clf.predict(model_input[FEATURES]),
                "score": score,
                "explanation_id": [f"x{int(a * 10)}" for a in model_input["petal_length"]],
            }
        )


cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers load it without this module


def test_named_outputs_are_columns_and_a_candidate_whose_outputs_do_not_fit_is_refused(spark, make_settings):
    s = make_settings()
    name = s.model.name
    X, y = _labelled()
    model = Explained()
    model.load_context(None)
    example = model.predict(None, X)
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=Explained(),
            signature=infer_signature(X, example.assign(score=example["score"].astype(float))),
            input_example=X[X["sepal_width"] != 3.0].head(3),  # rows it scores (the gate's sample)
            registered_model_name=name,
            pip_requirements=PYFUNC_REQUIREMENTS,
        )
    v1 = str(info.registered_model_version)
    promote(name, v1, "champion")
    producer = Producer(s.source.kafka.bootstrap_servers, s.source.kafka.topic)
    ensure_topic(s.source.kafka.bootstrap_servers, s.source.kafka.topic)
    producer.start()
    stream = StreamThread(s)
    p, w = stream.processor, stream.watcher
    try:
        wait_for(lambda: p.rows_by_version.get(v1, 0) > 0, what="rows scored by v1")
        labels_only = LogisticRegression(max_iter=500).fit(X, y)
        with mlflow.start_run():
            info = mlflow.sklearn.log_model(
                labels_only,
                name="model",
                signature=infer_signature(X, labels_only.predict(X)),
                registered_model_name=name,
                pip_requirements=PYFUNC_REQUIREMENTS,
            )
        v2 = str(info.registered_model_version)
        promote(name, v2, "champion")
        wait_for(lambda: any(r.version == v2 for r in w.refusals), what="v2 refused")
        before = p.rows_by_version[v1]
        wait_for(lambda: p.rows_by_version[v1] > before, what="v1 still serving")
        producer.stop()
        wait_for(lambda: p.totals["rows_in"] >= producer.sent, timeout=180, what="all events processed")
    finally:
        producer.stop()
        summary = stream.stop()
    reason = next(r.reason for r in w.refusals if r.version == v2)
    assert "output 'prediction' (string) has no column in the output table" in reason
    assert "'label' (string), 'score' (double), 'explanation_id' (string)" in reason
    assert summary["status"] == "FINISHED" and set(summary["rows_by_version"]) == {v1}

    out = _read(spark, s.output_path)
    assert {"label", "score", "explanation_id"} <= set(out.columns) and "prediction" not in out.columns
    truth = model.predict(None, out[FEATURES])
    assert (out["label"].to_numpy() == truth["label"].to_numpy()).all()
    assert np.allclose(out["score"].astype(float), truth["score"].astype(float))
    assert (out["explanation_id"].to_numpy() == truth["explanation_id"].to_numpy()).all()
    dead = _read(spark, s.dead_letter_path)
    no_score = dead[dead["reason"].str.contains("output 'score'", regex=False)]
    assert len(no_score) > 0 and (out["sepal_width"] != 3.0).all()
    assert no_score["reason"].str.contains(f"version {v1}", regex=False).all()
    assert len(out) + len(dead) == producer.sent


def test_an_unsigned_model_is_served_through_the_declared_input_schema(spark, make_settings, tmp_path):
    """Logged with neither signature nor input example (``log_model(model, name=...)``): refused
    naming both fixes; with ``model.input_schema`` (a file) it is served, its output column taken
    from what it predicts on the gate's sample."""
    from streamscore.errors import JobFailed

    X, y = _labelled()
    tree = LogisticRegression(max_iter=300).fit(X, y)
    plain = make_settings(trigger={"available_now": True})
    with mlflow.start_run():
        info = mlflow.sklearn.log_model(tree, name="model", registered_model_name=plain.model.name)
    version = str(info.registered_model_version)
    MlflowClient().set_registered_model_alias(plain.model.name, "champion", version)
    sent = _topic_with_events(plain, 300, "unsigned")
    with pytest.raises(JobFailed) as refused:
        run_stream(plain)
    error = refused.value.summary["error"]
    assert "no input signature" in error and "model.input_schema" in error

    schema_file = tmp_path / "iris-inputs.yaml"
    schema_file.write_text("".join(f"{f}: double\n" for f in FEATURES))
    s = make_settings(
        trigger={"available_now": True},
        model={"name": plain.model.name, "input_schema": str(schema_file)},
        source={"kafka": {"topic": plain.source.kafka.topic}},
    )
    summary = run_stream(s)

    assert summary["status"] == "FINISHED" and summary["rows_scored"] == sent.valid
    out = _read(spark, s.output_path)
    assert out["prediction"].dtype == object  # a string label, as the model predicts it
    assert (out["prediction"].to_numpy() == tree.predict(out[FEATURES])).all()


# -- Spark ML ------------------------------------------------------------------------------


def _spark_truth(spark, name: str, version: str, rows: pd.DataFrame) -> pd.DataFrame:
    import mlflow.spark
    from pyspark.ml.functions import vector_to_array

    model = mlflow.spark.load_model(f"models:/{name}/{version}")
    frame = spark.createDataFrame(rows[["event_id", *FEATURES]])
    return (
        model.transform(frame)
        .select("event_id", "prediction", vector_to_array("probability").alias("probability"))
        .toPandas()
        .set_index("event_id")
    )


def _assert_own_transform(spark, name: str, out: pd.DataFrame) -> None:
    for version, rows in out.groupby("model_version"):
        truth = _spark_truth(spark, name, str(version), rows).loc[rows["event_id"]]
        assert (truth["prediction"].to_numpy() == rows["prediction"].to_numpy()).all(), version
        assert np.array_equal(np.stack(truth["probability"].to_numpy()), np.stack(rows["probabilities"].to_numpy()))


@pytest.mark.heavy
def test_spark_ml_pipelines_stream_natively_and_swap_under_load(spark, make_settings):
    s = make_settings()
    name = s.model.name
    v1 = register_spark_pipeline(spark, name, "lr")
    promote(name, v1, "champion")
    k = s.source.kafka
    ensure_topic(k.bootstrap_servers, k.topic)
    producer = Producer(k.bootstrap_servers, k.topic)
    producer.start()
    stream = StreamThread(s)
    p = stream.processor
    try:
        wait_for(lambda: p.rows_by_version.get(v1, 0) > 0, what="rows scored by v1")
        v2 = register_spark_pipeline(spark, name, "tree")
        promote(name, v2, "champion")
        wait_for(lambda: p.rows_by_version.get(v2, 0) > 0, timeout=180, what="rows scored by v2")
        producer.stop()
        wait_for(lambda: p.totals["rows_in"] >= producer.sent, timeout=180, what="all events processed")
    finally:
        producer.stop()
        summary = stream.stop()
    assert summary["status"] == "FINISHED" and [sw["to_version"] for sw in summary["swaps"]] == [v2]
    out = _read(spark, s.output_path)
    dead = _read(spark, s.dead_letter_path)
    assert sorted(out["event_id"]) == sorted(producer.valid_ids)  # each valid event once
    assert len(dead) == producer.malformed and summary["rows_in"] == producer.sent
    assert out.groupby("batch_id")["model_version"].nunique().max() == 1  # no batch mixes versions
    assert set(out["model_version"]) == {v1, v2}
    _assert_own_transform(spark, name, out)
    for version in (v1, v2):  # positions are the label indexer's classes
        labels = sio.class_labels(spark, s.output_table, version)
        assert labels is not None and sorted(labels) == sorted(SPECIES)


@pytest.mark.heavy
def test_a_spark_ml_version_on_a_cluster(spark, make_settings, tmp_path):
    """``local-cluster[1,1,1024]`` (one worker, its executor in a JVM of its own: one is enough to
    leave the driver's JVM, at a third less CPU than two): the executor applies the pipeline the
    driver loaded; every row is its version's own ``transform``."""
    s = make_settings()
    v1 = register_spark_pipeline(spark, s.model.name, "lr")
    promote(s.model.name, v1, "champion")
    sent = _topic_with_events(s, 300, "cluster")
    args = stream_command(s, tmp_path / "home", "--available-now", spark__master="local-cluster[1,1,1024]")
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["status"] == "FINISHED" and summary["rows_scored"] == sent.valid, summary
    out = _read(spark, s.output_path)
    assert sorted(out["event_id"]) == sorted(sent.valid_ids)
    _assert_own_transform(spark, s.model.name, out)


class ProbaFrame(mlflow.pyfunc.PythonModel):
    """A scikit-learn classifier behind a pyfunc whose named outputs match a Spark ML classifier's
    columns: ``prediction`` (the class index, double) and ``probabilities``."""

    def load_context(self, context):
        X, y = _labelled()
        self.clf = LogisticRegression(C=0.05, max_iter=500).fit(X, y)

    def predict(self, context, model_input, params=None):
        p = self.clf.predict_proba(model_input[FEATURES])
        return pd.DataFrame({"prediction": p.argmax(axis=1).astype(float), "probabilities": list(p)})


def test_backfill_compares_a_spark_ml_version_with_a_pyfunc_one(spark, make_settings, tmp_path):
    from streamscore.backfill import run_backfill
    from streamscore.conf.settings import BackfillRequest

    s = make_settings()
    name = s.model.name
    v1 = register_spark_pipeline(spark, name, "lr")
    promote(name, v1, "champion")
    X, _ = _labelled()
    pyfunc = ProbaFrame()
    pyfunc.load_context(None)
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=ProbaFrame(),
            signature=infer_signature(X, pyfunc.predict(None, X.head(5))),
            input_example=X.head(3),
            registered_model_name=name,
            pip_requirements=PYFUNC_REQUIREMENTS,
        )
    v2 = str(info.registered_model_version)
    history = X.assign(event_id=[f"h-{i}" for i in range(len(X))], event_time="2026-01-01T00:00:00Z")
    path = str(tmp_path / "history")
    spark.createDataFrame(history).write.format("delta").save(path)
    out = str(tmp_path / "bf")

    summary = run_backfill(
        s, BackfillRequest.of(input={"kind": "delta", "path": path}, compare_with=v2, output_path=out)
    )

    assert summary["status"] == "FINISHED" and summary["rows_scored"] == len(X)
    rows = _read(spark, out)
    _assert_own_transform(spark, name, rows)  # the backfill's rows are the Spark ML version's
    spark_p = np.stack(rows.sort_values("event_id")["probabilities"].to_numpy())
    own_p = pyfunc.predict(None, rows.sort_values("event_id")[FEATURES])["probabilities"]
    py_p = np.stack(own_p.to_numpy())
    c = summary["comparison"]
    assert c["kind"] == "probabilities" and c["versions"] == {"base": v1, "other": v2} and c["rows"] == len(X)
    assert c["agreement"] == pytest.approx(float((spark_p.argmax(1) == py_p.argmax(1)).mean()))
    assert c["mean_total_variation"] == pytest.approx(float((0.5 * np.abs(spark_p - py_p).sum(1)).mean()))
    assert 0 < c["mean_total_variation"] < 1


def test_events_a_spark_ml_stage_would_fail_on_are_dead_lettered_not_a_failed_batch(spark, make_settings, tmp_path):
    """A category the pipeline's StringIndexer never saw (``handleInvalid='error'``) would fail the
    batch's job, and every restart after it: such rows are dead-lettered with the reason instead."""
    import mlflow.spark
    from pyspark.ml import Pipeline
    from pyspark.ml.classification import LogisticRegression as SparkLR
    from pyspark.ml.feature import StringIndexer, VectorAssembler

    from streamscore.backfill import run_backfill
    from streamscore.conf.settings import BackfillRequest

    s = make_settings()
    X, y = _labelled()
    X = X.assign(color=np.where(X["petal_length"] > 3, "red", "blue"))
    train = spark.createDataFrame(X.assign(species=y))
    pipeline = Pipeline(
        stages=[
            StringIndexer(inputCol="species", outputCol="label"),
            StringIndexer(inputCol="color", outputCol="color_idx"),
            VectorAssembler(inputCols=[*FEATURES, "color_idx"], outputCol="features"),
            SparkLR(labelCol="label", maxIter=20),
        ]
    ).fit(train)
    with mlflow.start_run():
        info = mlflow.spark.log_model(
            pipeline,
            artifact_path="model",
            signature=infer_signature(X, np.zeros(len(X))),
            registered_model_name=s.model.name,
            pip_requirements=["pyspark"],
        )
    promote(s.model.name, str(info.registered_model_version), "champion")
    events = X.assign(event_id=[f"c-{i}" for i in range(len(X))], event_time="2026-01-01T00:00:00Z")
    events.loc[[5, 70, 140], "color"] = "green"  # unseen in training
    path = str(tmp_path / "colors")
    spark.createDataFrame(events).write.format("delta").save(path)
    out, dead = str(tmp_path / "out"), str(tmp_path / "dead")

    summary = run_backfill(
        s, BackfillRequest.of(input={"kind": "delta", "path": path}, output_path=out, dead_letter_path=dead)
    )

    assert summary["status"] == "FINISHED"
    assert (summary["rows_scored"], summary["rows_dead_lettered"]) == (147, 3)
    lost = _read(spark, dead)
    assert lost["reason"].str.contains("field 'color': a value the model's StringIndexerModel has no index").all()
    assert sorted(json.loads(v)["event_id"] for v in lost["raw_value"]) == ["c-140", "c-5", "c-70"]
    rows = _read(spark, out)
    own = pipeline.transform(spark.createDataFrame(rows[["event_id", *FEATURES, "color"]])).toPandas()
    assert (own.set_index("event_id").loc[rows["event_id"], "prediction"].to_numpy() == rows["prediction"]).all()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-x"]))
