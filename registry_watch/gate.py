"""The validation gate a model version must pass before it may serve: at start, at a swap, and in
a backfill (one entry point, :meth:`ValidationGate.admit`).

1. the version is READY (one still registering is tried again later; a failed registration is
   refused), and an optional policy: a required tag on the version (``key=value``);
2. it downloads (within ``download_timeout_s``, else tried again later);
3. before any of its code runs, its ``MLmodel`` file (plain YAML) passes the loading policy
   (:mod:`~streamscore.registry_watch.policy`: loader module, no pickles or shipped code unless
   allowed) and its input signature (or ``model.input_schema``) is compatible with the stream's
   schema and its outputs with the output table's columns; only then is it loaded (a Spark ML
   version on the driver, where its outputs are read off its ``transform``);
4. it scores a sample through the real Spark UDF without error. The sample is the first of: recent
   valid input rows of the stream, the version's own input example, the newest events of the
   source that parse, rows built from the signature's types (so a fresh stream starts on any
   version whose signature fits); a refusal says which it was. A version logged without an output
   signature gets its outputs from its predictions on that sample (logged as an assumption).
   Running the sample through Spark also warms the Python workers' model cache, so the first batch
   after the swap does not pay for loading.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from streamscore.deadline import run_within
from streamscore.errors import GateRefused, RegistryError, SignatureError
from streamscore.registry_watch.policy import LoadingPolicy
from streamscore.registry_watch.resolve import ModelRef, local_handle, materialize, resolve_version
from streamscore.scoring import sparkml
from streamscore.scoring.sparkml import INPUT_REFUSED
from streamscore.scoring.spec import InputSpec, Output, compatible, outputs_from_schema, spec_from_signature
from streamscore.scoring.udf import ModelHandle, load_model

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion
    from pyspark.sql import SparkSession

    from streamscore.conf.settings import Settings

log = logging.getLogger(__name__)

__all__ = ["GateConfig", "GateRefused", "GateResult", "ValidationGate", "own_outputs"]


@dataclass
class GateResult:
    handle: ModelHandle
    spec: InputSpec  # the schema the version serves (the stream's, or its own at start)
    sample_rows: int
    seconds: float
    phases: dict[str, float] = field(default_factory=dict)  # seconds per step (download, load, score, ...)


@dataclass(frozen=True)
class GateConfig:
    """What the gate takes from the settings; no defaults of its own (they are the settings')."""

    model_name: str
    models_dir: Path
    event_id_field: str
    event_time_field: str
    max_message_bytes: int | None
    required_tag: str | None
    sample_rows: int
    timeout_s: float
    download_timeout_s: float
    partitions: int
    policy: LoadingPolicy | None
    input_schema: Mapping[str, str] | None

    @classmethod
    def from_settings(cls, settings: Settings) -> GateConfig:
        m, w, src = settings.model, settings.watch, settings.source
        return cls(
            model_name=m.name,
            models_dir=settings.home / "models",
            event_id_field=src.event_id_field,
            event_time_field=src.event_time_field,
            max_message_bytes=src.max_message_bytes,
            required_tag=w.required_tag,
            sample_rows=w.sample_rows,
            timeout_s=w.gate_timeout_s,
            download_timeout_s=w.download_timeout_s,
            partitions=w.gate_partitions,
            policy=LoadingPolicy(m.allowed_loaders, m.allow_pickle, m.trusted_types),
            input_schema=m.input_schema,
        )


class ValidationGate:
    """``recent_sample``: the stream's recent valid input; ``source_sample(n)``: the newest events
    of the job's source (both optional, see the module's docstring for the order)."""

    def __init__(
        self,
        client: MlflowClient,
        config: GateConfig,
        spark: SparkSession | None = None,
        recent_sample: Callable[[], list[str]] | None = None,
        source_sample: Callable[[int], list[str]] | None = None,
    ):
        self.client = client
        self.config = config
        self.spark = spark
        self.recent_sample = recent_sample
        self.source_sample = source_sample

    @property
    def model_name(self) -> str:
        return self.config.model_name

    @property
    def models_dir(self) -> Path:
        return self.config.models_dir

    def admit(self, ref: ModelRef, stream_spec: InputSpec | None, resolved: ModelVersion | None = None) -> GateResult:
        """Resolve ``ref`` (unless the caller already did: ``resolved``) and validate the version.

        ``stream_spec`` None means this version defines the stream's schema. Raises
        :class:`GateRefused` naming the model, the reference and the version, or
        :class:`~streamscore.errors.RegistryError` when the reference does not resolve or the
        version cannot be downloaded (transient: not held against the version)."""
        t0 = time.time()
        mv = resolved if resolved is not None else resolve_version(self.client, self.model_name, ref)
        resolve_s = round(time.time() - t0, 3)
        try:
            result = self._check(mv, stream_spec)
            result.phases = {"resolve": resolve_s, **result.phases}
            return result
        except GateRefused as e:
            raise GateRefused(e.version, e.reason, self.model_name, str(ref)) from e.__cause__

    def prepare(self, ref: ModelRef) -> None:
        """The steps of a start that need no Spark, done ahead (while the SparkContext starts): the
        version resolved, downloaded and, when its ``MLmodel`` passes the loading policy, loaded
        into this process's model cache, where :meth:`admit` then finds it. Whatever goes wrong is
        left for :meth:`admit` to meet again and report."""
        try:
            mv = resolve_version(self.client, self.model_name, ref)
            handle = self._fetch(mv, f"model {mv.name!r} version {mv.version}")
            if handle.flavor != "spark":  # a Spark ML version loads with the session
                load_model(handle)
        except Exception as e:  # noqa: BLE001 - the gate meets it again (a refusal included)
            log.debug("preparing %s ahead stopped (%s: %s); the gate does it", ref, type(e).__name__, e)

    def _check(self, mv: ModelVersion, stream_spec: InputSpec | None) -> GateResult:
        t0 = time.time()
        phases: dict[str, float] = {}
        version = str(mv.version)
        label = f"model {mv.name!r} version {version}"
        handle = self._fetch(mv, label)
        mark = _stopwatch(phases, "download", t0)
        native = handle.flavor == "spark"
        try:
            from mlflow.models import Model

            meta = Model.load(handle.local_path)
            predict_fn = (meta.flavors.get("python_function") or {}).get("predict_fn")
            spec = spec_from_signature(
                meta.signature,
                self.config.event_id_field,
                self.config.event_time_field,
                label,
                self.config.max_message_bytes,
                input_schema=self.config.input_schema,
                predict_fn=predict_fn,
            )
            if native:  # a Spark ML version's outputs are what its transform adds (below)
                spec = replace(spec, outputs=None)
            if stream_spec is not None:
                compatible(stream_spec, spec, label)
        except SignatureError as e:
            raise GateRefused(version, str(e)) from None
        except Exception as e:
            raise GateRefused(version, f"its MLmodel file cannot be read: {type(e).__name__}: {e}") from e
        mark("signature")
        model = self._load(handle, version)
        mark("load")
        known = sparkml.known_values(model) if native else {}
        sample, origin = self._sample(_input_example(meta, handle.local_path), stream_spec or spec, known)
        mark("sample")
        if native:
            assert self.spark is not None
            spec = replace(spec, outputs=sparkml.outputs(model, spec, self.spark))
        elif spec.outputs is None:  # no output signature: what it predicts on the sample fixes its columns
            spec = replace(spec, outputs=self._outputs_from_sample(model, spec, sample, origin, version, label))
        if stream_spec is not None and spec.outputs != stream_spec.outputs:
            try:
                compatible(stream_spec, spec, label)
            except SignatureError as e:
                raise GateRefused(version, str(e)) from None
        serving_spec = stream_spec or spec
        classes = sparkml.class_labels(model) if native else _class_labels(model, serving_spec)
        if stream_spec is not None:  # the table's outputs, as this version returns them
            serving_spec = replace(stream_spec, outputs=_in_table_order(stream_spec, spec.output_list))
        handle = replace(handle, classes=classes, outputs=serving_spec.output_list)
        # the stream's first version: no batch runs yet, so every core scores the sample, which also
        # starts and warms each Python worker (imports, model load) before the first batch needs it
        mark("outputs")
        self._score_sample(handle, serving_spec, sample, version, origin, all_cores=stream_spec is None)
        mark("score")
        return GateResult(handle, serving_spec, len(sample), time.time() - t0, phases)

    def _fetch(self, mv: ModelVersion, label: str) -> ModelHandle:
        """The version's files, once it is READY, carries any required tag and its ``MLmodel``
        passes the loading policy: nothing of the version has run yet, and its MLmodel file
        decides whether anything will."""
        self._check_status(mv, label)
        self._check_policy(mv)
        handle = self._download(mv, label)
        if self.config.policy is not None:
            why = self.config.policy.check(handle.local_path)
            if why:
                raise GateRefused(str(mv.version), f"loading policy: {why}")
        return handle

    @staticmethod
    def _check_status(mv: ModelVersion, label: str) -> None:
        status = str(getattr(mv, "status", None) or "READY")
        if status == "READY":
            return
        if status.startswith("FAILED"):
            msg = getattr(mv, "status_message", None) or ""
            raise GateRefused(str(mv.version), f"its registration failed (status {status}{': ' + msg if msg else ''})")
        raise RegistryError(f"{label} is not ready yet (status {status}); it is tried again later")

    def _download(self, mv: ModelVersion, label: str) -> ModelHandle:
        """:func:`materialize` within ``download_timeout_s``. Download trouble is the registry's or the
        storage's, not the version's: it raises :class:`RegistryError` (tried again later). An
        abandoned download finishes or fails in the background; it never replaces a finished copy."""
        outcome = run_within(
            lambda: materialize(self.client, mv, self.models_dir, self.spark),
            self.config.download_timeout_s,
            "streamscore-download",
        )
        if not outcome.finished:
            raise RegistryError(
                f"{label}: download took longer than watch.download_timeout_s ({self.config.download_timeout_s:g}s)"
            )
        if outcome.error is not None:
            e = outcome.error
            raise RegistryError(f"{label}: download failed: {type(e).__name__}: {e}") from e
        return outcome.result()

    def _check_policy(self, mv: ModelVersion) -> None:
        if not self.config.required_tag:
            return
        key, want = self.config.required_tag.split("=", 1)
        have = (mv.tags or {}).get(key)
        if have != want:
            missing = "missing" if have is None else repr(have)
            raise GateRefused(str(mv.version), f"required tag {key}={want} is {missing}")

    def handle_for(self, name: str, version: str, run_id: str, stream_spec: InputSpec | None) -> ModelHandle:
        """A version that served before (a replay after a crash, by its ledger record): from its
        local files when they are there (no registry call), else downloaded again; no gate. Its
        outputs are placed as it returns them (it may differ from the serving version's: a tensor
        against a DataFrame's columns)."""
        handle = local_handle(self.models_dir, name, version, run_id, self.spark)
        if handle is None:
            mv = self.client.get_model_version(name, version)
            handle = materialize(self.client, mv, self.models_dir, self.spark)
        outputs = own_outputs(handle.local_path, stream_spec) if stream_spec is not None else None
        return replace(handle, outputs=outputs)

    def _load(self, handle: ModelHandle, version: str) -> Any:
        """The version loaded on the driver: its pyfunc, or a Spark ML version's pipeline model."""
        try:
            if handle.flavor != "spark":
                return load_model(handle)
            if self.spark is None:
                raise GateRefused(version, "it is a Spark ML model, which needs the job's Spark session")
            model = sparkml.load(handle)
        except GateRefused:
            raise
        except Exception as e:  # any load failure refuses the candidate
            raise GateRefused(version, f"does not load: {type(e).__name__}: {e}") from e
        why = sparkml.problems(model)
        if why:
            raise GateRefused(version, "; ".join(why))
        return model

    def _sample(self, example: Any, spec: InputSpec, known: Mapping[str, list[str]]) -> tuple[list[str], str]:
        """The rows the version is tried on, and where they came from (named in a refusal);
        ``known``: values the model is known to take for some string inputs (for built rows)."""
        if self.recent_sample is not None:
            recent = self.recent_sample()[: self.config.sample_rows]
            if recent:
                return recent, "recent input of the stream"
        if example is not None:
            return self._example_rows(example, spec), "the input example logged with the model"
        if self.source_sample is not None:
            try:
                newest = _parsable(self.source_sample(self.config.sample_rows), spec)
            except Exception as e:  # noqa: BLE001 - the source is tried, the next kind of sample is used
                log.warning("could not read a sample from the source: %s: %s", type(e).__name__, e)
                newest = []
            if newest:
                return newest[: self.config.sample_rows], "the newest events of the source"
        return synthetic_rows(spec, min(self.config.sample_rows, 3), known), "rows built from the signature's types"

    def _example_rows(self, example: Any, spec: InputSpec) -> list[str]:
        import pandas as pd

        frame = example if isinstance(example, pd.DataFrame) else pd.DataFrame(example)
        rows = []
        for i, rec in enumerate(frame.head(self.config.sample_rows).to_dict(orient="records")):
            rec = {str(k): (v.item() if hasattr(v, "item") else v) for k, v in rec.items()}
            rec[spec.event_id_field] = f"gate-sample-{i}"
            rec[spec.event_time_field] = "2000-01-01T00:00:00Z"
            rows.append(orjson.dumps(rec).decode())
        return rows

    def _outputs_from_sample(
        self, model: Any, spec: InputSpec, sample: list[str], origin: str, version: str, label: str
    ) -> tuple[Output, ...]:
        """The outputs of a version logged without an output signature: inferred (as MLflow's
        ``infer_signature`` would) from its predictions on the sample, on the driver."""
        import pandas as pd
        from mlflow.models import infer_signature

        from streamscore.scoring.records import score_chunk

        parsed = score_chunk(pd.Series(sample), spec, None)
        frame = parsed[parsed["ok"]][spec.feature_names].reset_index(drop=True)
        if frame.empty:
            raise GateRefused(version, f"no row of the sample ({origin}) parses, so its outputs cannot be inferred")
        try:
            predicted = model.predict(frame)
            outputs = outputs_from_schema(infer_signature(frame, predicted).outputs, label, None, spec.features)
        except SignatureError as e:
            raise GateRefused(version, str(e)) from None
        except Exception as e:
            raise GateRefused(
                version, f"scoring the {len(frame)}-row sample failed ({origin}): {type(e).__name__}: {e}"
            ) from e
        log.warning(
            "%s has no output signature: assuming the output column(s) %s from its predictions on %d rows (%s)",
            label,
            ", ".join(map(str, outputs)),
            len(frame),
            origin,
        )
        return outputs

    def _collect_within_limit(self, df: Any, version: str) -> list[Any]:
        """``df.collect()`` in a Spark job group that is cancelled (tasks interrupted, a hanging
        Python worker killed) when it takes longer than ``timeout_s``."""
        assert self.spark is not None
        sc = self.spark.sparkContext
        group = f"streamscore-gate-{self.model_name}-v{version}-{uuid.uuid4().hex[:8]}"

        def collect() -> list[Any]:
            sc.setJobGroup(group, f"streamscore validation gate: version {version}", interruptOnCancel=True)
            return list(df.collect())

        outcome = run_within(collect, self.config.timeout_s, "streamscore-gate")
        if not outcome.finished:
            sc.cancelJobGroup(group)
            outcome.wait_more(60)  # the cancelled tasks wind down before the gate moves on
            raise GateRefused(
                version, f"scoring the sample took longer than watch.gate_timeout_s ({self.config.timeout_s:g}s)"
            )
        return outcome.result()

    def _score_sample(
        self,
        handle: ModelHandle,
        spec: InputSpec,
        sample: list[str],
        version: str,
        origin: str,
        all_cores: bool = False,
    ) -> None:
        n = len(sample)
        if self.spark is None:
            import pandas as pd

            from streamscore.scoring.records import score_chunk

            out = score_chunk(pd.Series(sample), handle.own_spec(spec), load_model(handle), handle.label)
            reasons, scored = list(out[~out["ok"]]["reason"]), int(out["ok"].sum())
        else:
            from streamscore.scoring.transform import as_events, score

            cores = self.spark.sparkContext.defaultParallelism
            if all_cores:  # a local frame is split over the cores: at least one row each
                sample = sample * -(-cores // len(sample))
            import pandas as pd

            # from pandas (Arrow, on the driver): a local list would be converted by a Python task,
            # which may start a second Python daemon beside the scoring UDFs' own (see io.empty_frame)
            values = self.spark.createDataFrame(pd.DataFrame({"value": sample}), "value string")
            df = as_events(values, "validation-gate")
            if not all_cores:
                df = df.repartition(max(1, min(self.config.partitions, len(sample))))
            try:
                rows = self._collect_within_limit(score(df, handle, spec, -1).select("ok", "reason"), version)
            except GateRefused:
                raise
            except Exception as e:  # e.g. the model kills its Python worker
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise GateRefused(
                    version, f"scoring the sample failed ({origin}): {type(e).__name__}: {first[:500]}"
                ) from e
            reasons, scored = [r.reason for r in rows if not r.ok], sum(1 for r in rows if r.ok)
        if reasons and scored and all(r.startswith(INPUT_REFUSED) for r in reasons):
            reasons = []  # rows the model declares it cannot take (see sparkml.guards); the rest scored
        if reasons:
            raise GateRefused(version, f"scoring the {n}-row sample failed ({origin}): {reasons[0]}")


def _stopwatch(phases: dict[str, float], first: str, since: float) -> Callable[[str], None]:
    """Records ``first`` (the time from ``since``), then each ``mark(name)`` as the time since the
    previous mark, into ``phases``."""
    last = time.time()
    phases[first] = round(last - since, 3)

    def mark(name: str) -> None:
        nonlocal last
        now = time.time()
        phases[name] = round(now - last, 3)
        last = now

    return mark


def own_outputs(model_dir: str, stream_spec: InputSpec) -> tuple[Output, ...] | None:
    """The table's outputs as the version at ``model_dir`` returns them, from its output
    signature (a version replayed without the gate); None when that cannot be read or does
    not match the table's columns (the stream's own layout is used then)."""
    from mlflow.models import Model

    try:
        meta = Model.load(model_dir)
        if sparkml.flavor_of(model_dir) == "spark" or meta.signature is None or meta.signature.outputs is None:
            return None
        predict_fn = (meta.flavors.get("python_function") or {}).get("predict_fn")
        own = outputs_from_schema(meta.signature.outputs, model_dir, predict_fn, stream_spec.features)
        return _in_table_order(stream_spec, own)
    except (SignatureError, KeyError, OSError, ValueError) as e:
        log.warning("the outputs of %s cannot be read (%s); its batch is scored with the stream's", model_dir, e)
        return None


def _in_table_order(stream_spec: InputSpec, own: tuple[Output, ...]) -> tuple[Output, ...]:
    """A version's own outputs in the order of the table's (the same names: the gate checked it,
    else KeyError)."""
    mine = {o.name: o for o in own}
    return tuple(mine[o.name] for o in stream_spec.output_list)


def _input_example(meta: Any, model_dir: str) -> Any:
    """The input example logged with the version (None when there is none or it cannot be read)."""
    try:
        return meta.load_input_example(model_dir)
    except Exception as e:  # noqa: BLE001 - a sample is taken elsewhere
        log.warning("the input example of %s cannot be read: %s", model_dir, e)
        return None


def _parsable(values: list[str], spec: InputSpec) -> list[str]:
    """The events among ``values`` that parse and validate (a malformed event of the source is not
    a reason to refuse a version)."""
    if not values:
        return []
    import pandas as pd

    from streamscore.scoring.records import parse_chunk

    reasons = parse_chunk(pd.Series(values), spec)[0]
    return [v for v, r in zip(values, reasons, strict=True) if r is None]


_SYNTHETIC: dict[str, float | int | str | bool] = {
    "double": 0.5,
    "float": 0.5,
    "long": 1,
    "integer": 1,
    "string": "a",
    "boolean": False,
}


def synthetic_rows(spec: InputSpec, n: int, known: Mapping[str, list[str]] | None = None) -> list[str]:
    """``n`` events built from the input types (numbers 0.5, 1.5, ...; strings "a", "b", ..., or
    for a column in ``known`` the values the model knows, in turn)."""
    rows = []
    for i in range(max(n, 1)):
        rec: dict[str, Any] = {
            spec.event_id_field: f"gate-synthetic-{i}",
            spec.event_time_field: "2000-01-01T00:00:00Z",
        }
        for f in spec.features:
            base = _SYNTHETIC[f.type]
            if isinstance(base, bool):
                rec[f.name] = bool(i % 2)
            elif known and known.get(f.name):
                values = known[f.name]
                rec[f.name] = values[i % len(values)]
            elif isinstance(base, str):
                rec[f.name] = chr(ord("a") + i % 26)
            elif isinstance(base, (int, float)):
                rec[f.name] = base + i
        rows.append(orjson.dumps(rec).decode())
    return rows


def _class_labels(model: Any, spec: InputSpec) -> tuple[str, ...] | None:
    """The classes a ``probabilities`` output's positions stand for (scikit-learn's ``classes_``)."""
    if not any(o.name == "probabilities" and o.array for o in spec.output_list):
        return None
    try:
        raw = model.get_raw_model() if hasattr(model, "get_raw_model") else model
    except Exception:  # noqa: BLE001 - a pyfunc without a raw model: the positions stay unnamed
        return None
    classes = getattr(raw, "classes_", None)
    return None if classes is None else tuple(str(c.item() if hasattr(c, "item") else c) for c in classes)
