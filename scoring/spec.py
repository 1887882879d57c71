"""The stream's input contract, derived from a model's MLflow signature (pure logic, no Spark jobs).

An :class:`InputSpec` lists the event id / event time fields and the model's input columns with
their MLflow types, plus the prediction type. It fixes the output table's schema for the life of a
checkpoint, so a candidate model version must be :func:`compatible` with it before it may serve.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from streamscore.errors import SignatureError

__all__ = ["SUPPORTED_TYPES", "Field", "InputSpec", "SignatureError", "compatible", "spec_from_signature"]

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


@dataclass(frozen=True)
class Field:
    name: str
    type: str  # an MLflow ColSpec type name, one of SUPPORTED_TYPES
    required: bool = True


@dataclass(frozen=True)
class InputSpec:
    event_id_field: str
    event_time_field: str
    features: tuple[Field, ...]
    prediction_type: str
    max_message_bytes: int | None = None  # larger payloads are dead-lettered before parsing

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]


def _type_name(t: Any) -> str:
    name = getattr(t, "name", None) or str(t)
    return str(name).lower()


def spec_from_signature(
    signature: Any, event_id_field: str, event_time_field: str, model_label: str, max_message_bytes: int | None = None
) -> InputSpec:
    """Build the spec from an ``mlflow.models.ModelSignature``; ``model_label`` names the model in errors."""
    if signature is None or signature.inputs is None:
        raise SignatureError(f"{model_label} has no input signature; log it with a signature to stream-score it")
    inputs = signature.inputs
    if not inputs.has_input_names() or inputs.is_tensor_spec():
        raise SignatureError(f"{model_label}: the input signature must name its columns (a column-based schema)")
    features = []
    for col in inputs.inputs:
        t = _type_name(col.type)
        if t not in SUPPORTED_TYPES:
            raise SignatureError(f"{model_label}: input column {col.name!r} has unsupported type {t!r}")
        if col.name in (event_id_field, event_time_field):
            raise SignatureError(f"{model_label}: input column {col.name!r} clashes with the event id/time field")
        features.append(Field(col.name, t, bool(getattr(col, "required", True))))
    pred = "double"
    outputs = signature.outputs
    if outputs is not None and not outputs.is_tensor_spec() and len(outputs.inputs) >= 1:
        t = _type_name(outputs.inputs[0].type)
        pred = t if t in SUPPORTED_TYPES else "double"
    elif outputs is not None and outputs.is_tensor_spec() and len(outputs.inputs) >= 1:
        kind = outputs.inputs[0].type.kind
        pred = "long" if kind in "iu" else "boolean" if kind == "b" else "string" if kind in "OUS" else "double"
    return InputSpec(event_id_field, event_time_field, tuple(features), pred, max_message_bytes)


def compatible(stream: InputSpec, candidate: InputSpec, model_label: str) -> None:
    """Raise :class:`SignatureError` unless ``candidate`` can score the stream's rows into its table."""
    have = {f.name: f for f in stream.features}
    problems = []
    for f in candidate.features:
        src = have.get(f.name)
        if src is None:
            if f.required:
                problems.append(f"needs input {f.name!r} ({f.type}) which the stream does not carry")
        elif f.type not in _WIDENS[src.type]:
            problems.append(f"input {f.name!r} is {f.type} but the stream carries {src.type}")
    if candidate.prediction_type != stream.prediction_type:
        problems.append(f"predicts {candidate.prediction_type} but the output table holds {stream.prediction_type}")
    if problems:
        raise SignatureError(f"{model_label} is incompatible with the stream: " + "; ".join(problems))
