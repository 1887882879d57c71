"""The stream's input and output contract, derived from a model's MLflow signature (pure logic, no
Spark jobs).

An :class:`InputSpec` lists the event id / event time fields, the model's input columns with their
MLflow types, and the model's outputs (:class:`Output`), each a typed column of the scored table:

* a model's only output (a column, a ``(-1,)`` tensor) is the ``prediction`` column, whatever the
  signature calls it (a stable column for readers and monitors, and the one earlier versions of
  the table have);
* several outputs (a DataFrame with named columns, named tensors) keep their names;
* a ``(-1, k)`` tensor is an array column (``probabilities`` for a ``predict_proba`` model, else
  ``prediction``), ``(-1, 1)`` being a plain ``prediction``.

It fixes the output table's schema for the life of a checkpoint, so a candidate version must be
:func:`compatible` with it before it may serve. A model without an output signature gets its
outputs from the gate's sample (:func:`outputs_from_schema` on what it predicted).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from streamscore.errors import SignatureError

__all__ = [
    "RESERVED_COLUMNS",
    "SUPPORTED_TYPES",
    "Field",
    "InputSpec",
    "Output",
    "SignatureError",
    "compatible",
    "outputs_from_schema",
    "spec_from_signature",
]

# MLflow ColSpec type names the stream can carry (their Spark types: streamscore.scoring.schema)
SUPPORTED_TYPES = ("double", "float", "long", "integer", "string", "boolean")
# what a stream column of type K may feed into a model input of type V
_WIDENS = {
    "double": {"double", "float"},
    "float": {"float"},
    "long": {"long", "integer"},
    "integer": {"integer"},
    "string": {"string"},
    "boolean": {"boolean"},
}
# columns of the scored table (and of the scoring result) that are not model outputs: an output
# may not take their names (streamscore.scoring.schema builds them; a unit test keeps both in step)
RESERVED_COLUMNS = frozenset(
    {"ok", "reason", "raw_value", "event_id", "event_time", "backfill_id"}
    | {"model_name", "model_version", "model_run_id", "scored_at", "batch_id"}
    | {"source", "source_partition", "source_offset", "source_timestamp"}
)
PREDICTION = "prediction"
PROBABILITIES = "probabilities"


@dataclass(frozen=True)
class Field:
    name: str
    type: str  # an MLflow ColSpec type name, one of SUPPORTED_TYPES
    required: bool = True


@dataclass(frozen=True)
class Output:
    """One model output and the scored table's column for it.

    ``key``: where it is in what ``predict`` returns (a column name of a DataFrame / dict result),
    None for a model's only output (the array or the frame's only column); ``array``: each row's
    value is a list of ``type`` (a ``(-1, k)`` tensor), of ``length`` values when that is known."""

    name: str
    type: str
    array: bool = False
    length: int | None = None
    key: str | None = None

    @property
    def ddl(self) -> str:
        return f"array<{self.type}>" if self.array else self.type

    def __str__(self) -> str:
        return f"{self.name!r} ({self.ddl})"


@dataclass(frozen=True)
class InputSpec:
    event_id_field: str
    event_time_field: str
    features: tuple[Field, ...]
    # the model's outputs; a type name is short for one scalar ``prediction`` of that type; None:
    # not known yet (a model logged without an output signature, until the gate has scored a sample)
    outputs: tuple[Output, ...] | str | None = field(default=None)
    max_message_bytes: int | None = None  # larger payloads are dead-lettered before parsing

    def __post_init__(self) -> None:
        if isinstance(self.outputs, str):
            object.__setattr__(self, "outputs", (Output(PREDICTION, self.outputs),))

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def output_list(self) -> tuple[Output, ...]:
        if not isinstance(self.outputs, tuple):
            raise SignatureError("the model's outputs are not known yet (no output signature, no sample scored)")
        return self.outputs

    @property
    def primary(self) -> Output:
        """The output versions are compared by: ``prediction`` when there is one, else the first."""
        outs = self.output_list
        return next((o for o in outs if o.name == PREDICTION), outs[0])

    @property
    def prediction_type(self) -> str:
        return self.primary.ddl


def _type_name(t: Any) -> str:
    name = getattr(t, "name", None) or str(t)
    return str(name).lower()


def _tensor_type(dtype: Any) -> str:
    kind = getattr(dtype, "kind", "f")
    return "long" if kind in "iu" else "boolean" if kind == "b" else "string" if kind in "OUS" else "double"


def spec_from_signature(
    signature: Any,
    event_id_field: str,
    event_time_field: str,
    model_label: str,
    max_message_bytes: int | None = None,
    input_schema: Mapping[str, str] | None = None,
    predict_fn: str | None = None,
) -> InputSpec:
    """Build the spec from an ``mlflow.models.ModelSignature``; ``model_label`` names the model in errors.

    ``input_schema`` (``model.input_schema``: column -> type) declares what the stream parses for
    a model logged without an input signature (with one, the signature must fit it);
    ``predict_fn`` is the model's ``pyfunc_predict_fn`` (``predict_proba`` names its output)."""
    sig_inputs = None if signature is None else signature.inputs
    if input_schema:
        features = _declared_features(input_schema, event_id_field, event_time_field)
        if sig_inputs is not None:
            signed = _features(sig_inputs, event_id_field, event_time_field, model_label)
            declared = InputSpec(event_id_field, event_time_field, features, None)
            problems = _check_inputs(declared, signed)
            if problems:
                raise SignatureError(f"{model_label} does not fit model.input_schema: " + "; ".join(problems))
    elif sig_inputs is None:
        raise SignatureError(
            f"{model_label} has no input signature: log it with a signature "
            "(mlflow.models.infer_signature), or declare its input columns in model.input_schema"
        )
    else:
        features = _features(sig_inputs, event_id_field, event_time_field, model_label)
    outputs = None if signature is None else signature.outputs
    out = None if outputs is None else outputs_from_schema(outputs, model_label, predict_fn, features)
    return InputSpec(event_id_field, event_time_field, features, out, max_message_bytes)


def _declared_features(input_schema: Mapping[str, str], id_field: str, time_field: str) -> tuple[Field, ...]:
    features = []
    for name, t in input_schema.items():
        if str(t).lower() not in SUPPORTED_TYPES:
            raise SignatureError(f"model.input_schema: column {name!r} has unsupported type {t!r} ({SUPPORTED_TYPES})")
        if name in (id_field, time_field):
            raise SignatureError(f"model.input_schema: column {name!r} clashes with the event id/time field")
        features.append(Field(name, str(t).lower()))
    return tuple(features)


def _features(inputs: Any, id_field: str, time_field: str, model_label: str) -> tuple[Field, ...]:
    if not inputs.has_input_names() or inputs.is_tensor_spec():
        raise SignatureError(f"{model_label}: the input signature must name its columns (a column-based schema)")
    features = []
    for col in inputs.inputs:
        t = _type_name(col.type)
        if t not in SUPPORTED_TYPES:
            raise SignatureError(f"{model_label}: input column {col.name!r} has unsupported type {t!r}")
        if col.name in (id_field, time_field):
            raise SignatureError(f"{model_label}: input column {col.name!r} clashes with the event id/time field")
        features.append(Field(col.name, t, bool(getattr(col, "required", True))))
    return tuple(features)


def outputs_from_schema(
    outputs: Any, model_label: str, predict_fn: str | None = None, features: tuple[Field, ...] = ()
) -> tuple[Output, ...]:
    """The output columns an MLflow output ``Schema`` describes (see the module docstring); raises
    :class:`SignatureError` for an output the table cannot hold or a name that clashes."""
    specs = list(outputs.inputs)
    if not specs:
        raise SignatureError(f"{model_label}: its output signature is empty")
    single = len(specs) == 1
    result = []
    for s in specs:
        name = None if single else getattr(s, "name", None)
        if not single and not name:
            raise SignatureError(f"{model_label}: its output signature has several outputs, not all of them named")
        key = None if single else str(name)
        if outputs.is_tensor_spec():
            result.append(_tensor_output(s, name, key, model_label, predict_fn))
            continue
        t = _type_name(s.type)
        elem = getattr(s.type, "dtype", None)  # an mlflow Array type
        if elem is not None and _type_name(elem) in SUPPORTED_TYPES:
            default = PROBABILITIES if predict_fn == "predict_proba" else PREDICTION
            result.append(Output(str(name or default), _type_name(elem), array=True, key=key))
        elif t in SUPPORTED_TYPES:
            result.append(Output(str(name or PREDICTION), t, key=key))
        else:
            raise SignatureError(f"{model_label}: output {name or PREDICTION!r} has unsupported type {t!r}")
    _check_names(tuple(result), features, model_label)
    return tuple(result)


def _tensor_output(s: Any, name: str | None, key: str | None, model_label: str, predict_fn: str | None) -> Output:
    shape = tuple(getattr(s, "shape", None) or (-1,))
    t = _tensor_type(s.type)
    if len(shape) <= 1 or (len(shape) == 2 and shape[1] == 1 and predict_fn != "predict_proba"):
        return Output(str(name or PREDICTION), t, key=key)
    if len(shape) == 2:
        default = PROBABILITIES if predict_fn == "predict_proba" else PREDICTION
        return Output(str(name or default), t, array=True, length=None if shape[1] < 0 else int(shape[1]), key=key)
    raise SignatureError(
        f"{model_label}: output {name or PREDICTION!r} is a tensor of shape {shape} (up to 2 dimensions)"
    )


def _check_names(outputs: tuple[Output, ...], features: tuple[Field, ...], model_label: str) -> None:
    feature_names = {f.name for f in features}
    clashes = [
        f"{o.name!r} ({'an input column' if o.name in feature_names else 'a column streamscore writes'})"
        for o in outputs
        if o.name in feature_names or o.name in RESERVED_COLUMNS
    ]
    if clashes:
        raise SignatureError(
            f"{model_label}: output names clash with the scored table's other columns: {', '.join(clashes)}; "
            "rename the model's outputs"
        )


def _check_inputs(stream: InputSpec, candidate: tuple[Field, ...]) -> list[str]:
    have = {f.name: f for f in stream.features}
    problems = []
    for f in candidate:
        src = have.get(f.name)
        if src is None:
            if f.required:
                problems.append(f"needs input {f.name!r} ({f.type}) which the stream does not carry")
        elif f.type not in _WIDENS[src.type]:
            problems.append(f"input {f.name!r} is {f.type} but the stream carries {src.type}")
    return problems


def compatible(stream: InputSpec, candidate: InputSpec, model_label: str) -> None:
    """Raise :class:`SignatureError` unless ``candidate`` can score the stream's rows into its table."""
    problems = _check_inputs(stream, candidate.features)
    if isinstance(stream.outputs, tuple) and isinstance(candidate.outputs, tuple):
        problems += _output_problems(stream.outputs, candidate.outputs)
    if problems:
        raise SignatureError(f"{model_label} is incompatible with the stream: " + "; ".join(problems))


def _output_problems(table: tuple[Output, ...], candidate: tuple[Output, ...]) -> list[str]:
    have = {o.name: o for o in table}
    got = {o.name: o for o in candidate}
    problems = []
    for name, o in got.items():
        t = have.get(name)
        if t is None:
            problems.append(f"its output {o} has no column in the output table")
        elif (t.type, t.array) != (o.type, o.array):
            what = "predicts" if name == PREDICTION and len(table) == 1 else f"output {name!r} is"
            problems.append(f"{what} {o.ddl} but the output table holds {t.ddl}")
    missing = [str(t) for name, t in have.items() if name not in got]
    if missing:
        problems.append(f"it does not produce the output table's column(s) {', '.join(missing)}")
    return problems
