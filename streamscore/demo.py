"""Demo model and demo events: scikit-learn's bundled iris data set, a real registered model, and a
producer that sends the rows as JSON events (optionally mixed with malformed ones)."""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

log = logging.getLogger(__name__)
_client_log = logging.getLogger("kafka.client")  # librdkafka's own lines: library output (the log file)

FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]

# variant -> LogisticRegression settings; v2 is deliberately more regularised so it predicts differently
VARIANTS = {"v1": {"C": 1.0}, "v2": {"C": 0.02}}


# what MLflow infers for a scikit-learn model here, given explicitly (see pinned_requirements)
SKLEARN_REQUIREMENTS = ("mlflow", "numpy", "pandas", "scikit-learn", "scipy", "skops")


def pinned_requirements(*distributions: str) -> list[str]:
    """``name==version`` of the installed ``distributions`` (those not installed are left out): a
    model's ``pip_requirements`` given to ``log_model``. Without them MLflow infers them by loading
    the model in a subprocess that imports everything it touches, about 14 s a model here."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for d in distributions:
        try:
            out.append(f"{d}=={version(d)}")
        except PackageNotFoundError:
            continue
    return out


def iris_frame():
    import pandas as pd
    from sklearn.datasets import load_iris

    data = load_iris()
    X = pd.DataFrame(data.data, columns=FEATURES)
    return X, pd.Series(data.target, name="species")


def train_and_register(
    name: str, variant: str = "v1", alias: str | None = "champion", tags: dict | None = None, estimator: Any = None
) -> str:
    """Train (the demo's logistic regression, or ``estimator``: any scikit-learn classifier), log
    with signature + input example, register; returns the new version number."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.models import infer_signature
    from sklearn.linear_model import LogisticRegression

    X, y = iris_frame()
    model = (estimator if estimator is not None else LogisticRegression(max_iter=500, **VARIANTS[variant])).fit(X, y)
    signature = infer_signature(X, model.predict(X))
    mlflow.set_experiment("streamscore-demo-models")
    with mlflow.start_run(run_name=f"train-{name}-{variant}") as run:
        mlflow.log_params({"variant": variant, **VARIANTS.get(variant, {})})
        mlflow.log_metric("train_accuracy", float(model.score(X, y)))
        info = mlflow.sklearn.log_model(
            model,
            name="model",
            signature=signature,
            input_example=X.head(5),
            registered_model_name=name,
            pip_requirements=pinned_requirements(*SKLEARN_REQUIREMENTS),
        )
    version = str(info.registered_model_version)
    client = MlflowClient()
    for k, v in (tags or {}).items():
        client.set_model_version_tag(name, version, k, v)
    if alias:
        promote(name, version, alias)
    log.info("registered %s version %s (run %s)", name, version, run.info.run_id)
    return version


SPECIES = ("setosa", "versicolor", "virginica")


def register_spark_pipeline(spark: Any, name: str, kind: str = "lr", alias: str | None = None) -> str:
    """Train a Spark ML pipeline on the iris data (a label ``StringIndexer`` over the species names,
    ``VectorAssembler``, then a logistic regression (``lr``) or a decision tree (``tree``)), log it
    with MLflow's Spark flavor and the signature of its prediction, register; returns the version."""
    import mlflow
    import mlflow.spark
    from mlflow.models import infer_signature
    from pyspark.ml import Pipeline
    from pyspark.ml.classification import DecisionTreeClassifier, LogisticRegression
    from pyspark.ml.feature import StringIndexer, VectorAssembler

    X, y = iris_frame()
    df = spark.createDataFrame(X.assign(species=y.map(dict(enumerate(SPECIES)))))
    clf = (
        LogisticRegression(labelCol="label", maxIter=50)
        if kind == "lr"
        else DecisionTreeClassifier(labelCol="label", maxDepth=3, seed=1)
    )
    stages: list[Any] = [
        StringIndexer(inputCol="species", outputCol="label"),
        VectorAssembler(inputCols=FEATURES, outputCol="features"),
        clf,
    ]
    model = Pipeline(stages=stages).fit(df)
    predictions: Any = model.transform(df.drop("species")).select("prediction").toPandas()
    predictions = predictions["prediction"]
    mlflow.set_experiment("streamscore-demo-models")
    with mlflow.start_run(run_name=f"train-{name}-spark-{kind}"):
        info = mlflow.spark.log_model(
            model,
            artifact_path="model",
            signature=infer_signature(X, predictions),
            registered_model_name=name,
            pip_requirements=pinned_requirements("mlflow", "pyspark"),  # see pinned_requirements
        )
    version = str(info.registered_model_version)
    if alias:
        promote(name, version, alias)
    return version


def promote(name: str, version: str, alias: str = "champion") -> float:
    """Move ``alias`` to ``version``, recording when (the watcher reports swap latency from it)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    at = time.time()
    client.set_registered_model_tag(name, f"streamscore.alias_set_at.{alias}", repr(at))
    client.set_registered_model_alias(name, alias, str(version))
    return at


def make_event(i: int, prefix: str, row: dict, when: dt.datetime) -> bytes:
    return orjson.dumps({"event_id": f"{prefix}-{i}", "event_time": when.isoformat(), **row})


MALFORMED = [
    lambda i, p, row, t: b"{not json",
    lambda i, p, row, t: orjson.dumps(
        {"event_id": f"{p}-{i}", "event_time": t.isoformat(), **{k: v for k, v in row.items() if k != "petal_width"}}
    ),
    lambda i, p, row, t: orjson.dumps(
        {"event_id": f"{p}-{i}", "event_time": t.isoformat(), **row, "sepal_length": "wide"}
    ),
    lambda i, p, row, t: orjson.dumps({"event_time": t.isoformat(), **row}),
]


@dataclass
class ProduceResult:
    topic: str
    sent: int = 0
    valid: int = 0
    malformed: int = 0
    valid_ids: list = field(default_factory=list)
    seconds: float = 0.0


def produce_events(
    bootstrap: str,
    topic: str,
    count: int,
    malformed_every: int = 0,
    rate: float = 0,
    prefix: str | None = None,
    start: int = 0,
) -> ProduceResult:
    """Send ``count`` events (iris rows, cycled); every ``malformed_every``-th one is malformed.
    ``rate`` events/s (0 = as fast as possible)."""
    from confluent_kafka import Producer

    X, _ = iris_frame()
    rows = X.to_dict(orient="records")
    prefix = prefix or f"evt{int(time.time())}"
    producer = Producer(
        {"bootstrap.servers": bootstrap, "linger.ms": 20, "enable.idempotence": True, "logger": _client_log}
    )
    res = ProduceResult(topic)
    t0 = time.time()
    errors: list = []

    def delivered(err, _msg):
        if err is not None:
            errors.append(err)

    for n in range(start, start + count):
        row = rows[n % len(rows)]
        when = dt.datetime.now(dt.timezone.utc)
        if malformed_every and n % malformed_every == malformed_every - 1:
            payload = MALFORMED[(n // malformed_every) % len(MALFORMED)](n, prefix, row, when)
            res.malformed += 1
        else:
            payload = make_event(n, prefix, row, when)
            res.valid += 1
            res.valid_ids.append(f"{prefix}-{n}")
        while True:
            try:
                producer.produce(topic, payload, key=str(n).encode(), on_delivery=delivered)
                break
            except BufferError:
                producer.poll(0.1)
        res.sent += 1
        if rate:
            delay = t0 + res.sent / rate - time.time()
            if delay > 0:
                producer.poll(delay)
        elif res.sent % 10000 == 0:
            producer.poll(0)
    remaining = producer.flush(60)
    if remaining or errors:
        raise RuntimeError(f"{remaining} events undelivered, {len(errors)} delivery errors: {errors[:3]}")
    res.seconds = time.time() - t0
    return res


def ensure_topic(bootstrap: str, topic: str, partitions: int = 2) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap, "logger": _client_log})  # type: ignore[dict-item]
    if topic in admin.list_topics(timeout=10).topics:
        return
    fut = admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])[topic]
    try:
        fut.result(30)
    except Exception as e:
        if "TOPIC_ALREADY_EXISTS" not in str(e):
            raise
