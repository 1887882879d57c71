"""The model loading policy: a version's MLmodel file decides, before any of its code runs, whether
it may be loaded. Checked on real registered versions (the gate refuses them and their code never
runs) and on MLmodel files of flavors this machine does not train."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from streamscore.demo import iris_frame, train_and_register
from streamscore.registry_watch.policy import LoadingPolicy
from streamscore.registry_watch.watcher import BatchLedger
from streamscore.streaming import build_watcher
from tests.helpers import PYFUNC_REQUIREMENTS, register_records_its_loading

DEFAULT = LoadingPolicy(["mlflow.sklearn", "mlflow.xgboost", "mlflow.lightgbm", "mlflow.onnx", "mlflow.pyfunc.model"])


def _mlmodel(tmp_path, flavors: dict) -> str:
    import yaml

    (tmp_path / "MLmodel").write_text(yaml.safe_dump({"flavors": flavors}))
    return str(tmp_path)


@pytest.mark.parametrize(
    "flavors, refused",
    [
        ({"python_function": {"loader_module": "mlflow.xgboost"}, "xgboost": {"data": "model.ubj"}}, None),
        ({"python_function": {"loader_module": "mlflow.onnx"}}, None),
        ({"python_function": {"loader_module": "mlflow.lightgbm"}, "lightgbm": {"data": "model.lgb"}}, None),
        (
            {
                "python_function": {"loader_module": "mlflow.lightgbm"},
                "lightgbm": {"data": "model.pkl", "model_class": "lightgbm.sklearn.LGBMClassifier"},
            },
            "saved as cloudpickle",
        ),
        (
            {
                "python_function": {"loader_module": "mlflow.sklearn"},
                "sklearn": {"serialization_format": "skops", "skops_trusted_types": ["sklearn.tree._tree.Tree"]},
            },
            None,
        ),
        (
            {"python_function": {"loader_module": "mlflow.sklearn", "code": "code"}, "sklearn": {}},
            "ships code paths",
        ),
        ({"python_function": {"loader_module": "mlflow.pyfunc.model", "model_code_path": "m.py"}}, "model from code"),
        ({"python_function": {"loader_module": "mlflow.pytorch"}}, "not in model.allowed_loaders"),
        ({"sklearn": {"serialization_format": "skops"}}, "no python_function flavor"),
    ],
)
def test_policy_on_mlmodel_files(tmp_path, flavors, refused):
    why = DEFAULT.check(_mlmodel(tmp_path, flavors))
    assert why is None if refused is None else (why is not None and refused in why), why
    permissive = LoadingPolicy([*DEFAULT.allowed_loaders, "mlflow.pytorch"], allow_pickle=True)
    assert (permissive.check(_mlmodel(tmp_path, flavors)) is None) == ("python_function" in flavors)


@pytest.mark.integration
def test_the_gate_refuses_versions_the_policy_forbids_before_any_of_their_code_runs(spark, make_settings, tmp_path):
    import mlflow.sklearn
    from sklearn.linear_model import LogisticRegression

    s = make_settings(model={"allow_pickle": False})
    client = MlflowClient(s.tracking.uri)
    v1 = train_and_register(s.model.name, "v1", alias="champion")  # scikit-learn through skops
    w = build_watcher(s, spark, client, BatchLedger(tmp_path / "ledger.jsonl"))
    assert w.start().version == v1  # the default policy admits the demo model

    marker = tmp_path / "loaded.txt"
    custom = register_records_its_loading(s.model.name, str(marker))
    X, y = iris_frame()
    model = LogisticRegression(max_iter=500).fit(X, y)
    with mlflow.start_run():
        pickled = mlflow.sklearn.log_model(
            model,
            name="model",
            serialization_format="cloudpickle",
            input_example=X.head(3),
            registered_model_name=s.model.name,
            pip_requirements=PYFUNC_REQUIREMENTS,
        ).registered_model_version
        trusts_too_much = mlflow.sklearn.log_model(
            model,
            name="model",
            input_example=X.head(3),
            registered_model_name=s.model.name,
            skops_trusted_types=["builtins.eval"],
            pip_requirements=PYFUNC_REQUIREMENTS,
        ).registered_model_version
    marker.unlink(missing_ok=True)  # logging it loaded it once, in the uploader's process (MLflow checks the example)
    expected = {
        custom: "custom python_model",
        str(pickled): "saved as cloudpickle",
        str(trusts_too_much): "outside model.trusted_types: builtins.eval",
    }
    for version, why in expected.items():
        client.set_registered_model_alias(s.model.name, "champion", version)
        assert w.poll(force=True) == "refused", version
        assert why in w.refusals[-1].reason and "loading policy" in w.refusals[-1].reason
    assert not marker.exists()  # the custom model's code never ran, on the driver or a worker
    assert w.serving.version == v1

    trusting_settings = make_settings(s.model.name, model={"allow_pickle": True})
    trusting = build_watcher(trusting_settings, spark, client, BatchLedger(tmp_path / "ledger2.jsonl"))
    client.set_registered_model_alias(s.model.name, "champion", custom)
    assert trusting.start().version == custom and marker.exists()  # allowed: now it loads
