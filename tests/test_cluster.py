"""The same job on a Spark cluster of separate executor processes (``local-cluster[2,1,1024]``: a
master, two workers, each executor its own JVM with its own Python workers): the connector and
Delta jars and the model reach the executors by the paths a real cluster uses (``spark.jars``,
``SparkContext.addArchive``), not through the driver's file system view of local mode."""

from __future__ import annotations

import json
import subprocess

import mlflow.pyfunc
import pytest

from streamscore.demo import FEATURES, ensure_topic, produce_events, train_and_register
from tests.helpers import stream_command

pytestmark = pytest.mark.integration


def test_the_stream_on_a_local_cluster_scores_like_the_model(spark, make_settings, tmp_path):
    s = make_settings()
    version = train_and_register(s.model.name, "v1", alias="champion")
    k = s.source.kafka
    ensure_topic(k.bootstrap_servers, k.topic)
    sent = produce_events(k.bootstrap_servers, k.topic, 400, malformed_every=40, prefix="cluster")
    command = stream_command(s, tmp_path / "home", "--available-now", spark__master="local-cluster[2,1,1024]")
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (summary["rows_in"], summary["rows_scored"], summary["rows_dead_lettered"]) == (400, 390, 10)

    out = spark.read.format("delta").load(s.output_path).toPandas()
    assert sorted(out["event_id"]) == sorted(sent.valid_ids)
    model = mlflow.pyfunc.load_model(f"models:/{s.model.name}/{version}")
    assert (model.predict(out[FEATURES]) == out["prediction"].to_numpy()).all()
    assert set(out["model_version"]) == {version}
