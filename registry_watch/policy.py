"""The model loading policy: what a registered version may make the driver and the workers run.

Loading a model is running code its uploader chose: a pickle executes whatever it was built to, a
custom ``python_model`` is a cloudpickled class, ``code_paths`` are imported, and skops loads the
types its ``MLmodel`` file calls trusted. So the gate reads the version's ``MLmodel`` file (plain
YAML, nothing executed) and checks it *before* the model is loaded anywhere:

* its ``python_function`` loader module is one of ``model.allowed_loaders``;
* unless ``model.allow_pickle`` is true, loading must not unpickle objects or import code shipped
  with the version: scikit-learn saved with skops (every trusted type under ``model.trusted_types``),
  XGBoost and LightGBM native formats, ONNX and Spark ML (MLlib's own format) pass; pickle /
  cloudpickle scikit-learn, LightGBM's pickled scikit-learn API, custom ``python_model`` classes,
  models from code and ``code_paths`` do not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

_NATIVE = {"mlflow.xgboost", "mlflow.onnx", "mlflow.spark"}  # loaders that never unpickle (MLlib: its own format)


@dataclass(frozen=True)
class LoadingPolicy:
    allowed_loaders: Sequence[str]
    allow_pickle: bool = False
    trusted_types: Sequence[str] = ("sklearn.",)

    def check(self, model_dir: str | Path) -> str | None:
        """None when the version at ``model_dir`` may be loaded, else why not (names the setting)."""
        try:
            meta = yaml.safe_load((Path(model_dir) / "MLmodel").read_text())
        except (OSError, yaml.YAMLError) as e:
            return f"its MLmodel file cannot be read: {e}"
        flavors: dict[str, Any] = (meta or {}).get("flavors") or {}
        pyfunc = flavors.get("python_function")
        if not isinstance(pyfunc, dict):
            return "it has no python_function flavor (streamscore scores through pyfunc)"
        loader = str(pyfunc.get("loader_module") or "")
        if loader not in self.allowed_loaders:
            return f"it loads with {loader or 'no loader module'!r}, which is not in model.allowed_loaders"
        if self.allow_pickle:
            return None
        why = self._runs_shipped_code(loader, pyfunc, flavors)
        return f"{why}; set model.allow_pickle: true to trust this registry's uploaders" if why else None

    def _runs_shipped_code(self, loader: str, pyfunc: dict[str, Any], flavors: dict[str, Any]) -> str | None:
        code = pyfunc.get("code") or any(isinstance(f, dict) and f.get("code") for f in flavors.values())
        if code:
            return "it ships code paths that loading imports"
        if loader in _NATIVE:
            return None
        if loader == "mlflow.sklearn":
            return self._sklearn_format(flavors.get("sklearn") or {}, "pickle", "scikit-learn model")
        if loader == "mlflow.lightgbm":
            lgb = flavors.get("lightgbm") or {}
            if lgb.get("model_class", "lightgbm.basic.Booster") == "lightgbm.basic.Booster":
                return None  # LightGBM's own text format
            return self._sklearn_format(lgb, "cloudpickle", "LightGBM scikit-learn model")
        if loader == "mlflow.pyfunc.model":
            if pyfunc.get("model_code_path"):
                return "it is a model from code (loading runs its Python file)"
            return "it is a custom python_model (loading unpickles it)"
        return f"{loader} may unpickle objects when loading"

    def _sklearn_format(self, conf: dict[str, Any], default: str, what: str) -> str | None:
        fmt = conf.get("serialization_format") or default
        if fmt != "skops":
            return f"its {what} is saved as {fmt} (loading unpickles it)"
        prefixes = tuple(self.trusted_types)
        untrusted = [str(t) for t in conf.get("skops_trusted_types") or [] if not str(t).startswith(prefixes)]
        if untrusted:
            return f"its skops file trusts types outside model.trusted_types: {', '.join(untrusted)}"
        return None
