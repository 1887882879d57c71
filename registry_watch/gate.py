"""The validation gate a candidate model version must pass before it may serve the stream.

1. optional policy: a required tag on the version (``key=value``);
2. it downloads and loads;
3. its input signature is compatible with the stream's schema (and it predicts the same type);
4. it scores a sample through the real Spark UDF without error: recent valid input rows of the
   stream when there are some, else the version's own input example. Running the sample through
   Spark also warms the Python workers' model cache, so the first batch after the swap does not
   pay for loading.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import orjson

from registry_watch.resolve import materialize
from scoring.spec import InputSpec, SignatureError, compatible, spec_from_signature
from scoring.udf import ModelHandle, load_model

log = logging.getLogger(__name__)


class Refused(Exception):
    """A candidate failed the gate; the message says why."""

    def __init__(self, version: str, reason: str):
        super().__init__(f"version {version} refused: {reason}")
        self.version = version
        self.reason = reason


@dataclass
class GateResult:
    handle: ModelHandle
    spec: InputSpec
    sample_rows: int
    seconds: float


class ValidationGate:
    def __init__(
        self,
        client,
        models_dir: Path,
        event_id_field: str,
        event_time_field: str,
        spark=None,
        required_tag: Optional[str] = None,
        sample_rows: int = 20,
        recent_sample: Optional[Callable[[], list[str]]] = None,
    ):
        self.client = client
        self.models_dir = models_dir
        self.event_id_field = event_id_field
        self.event_time_field = event_time_field
        self.spark = spark
        self.required_tag = required_tag
        self.sample_rows = sample_rows
        self.recent_sample = recent_sample

    def check(self, mv, stream_spec: Optional[InputSpec]) -> GateResult:
        """Validate ``mv``; ``stream_spec`` None means this version defines the stream's schema."""
        t0 = time.time()
        version = str(mv.version)
        label = f"model {mv.name!r} version {version}"
        if self.required_tag:
            key, want = self.required_tag.split("=", 1)
            have = (mv.tags or {}).get(key)
            if have != want:
                raise Refused(version, f"required tag {key}={want} is {'missing' if have is None else repr(have)}")
        try:
            handle = materialize(self.client, mv, self.models_dir, self.spark)
            model = load_model(handle)
        except Exception as e:  # noqa: BLE001 - any load failure refuses the candidate
            raise Refused(version, f"does not load: {type(e).__name__}: {e}") from e
        try:
            spec = spec_from_signature(model.metadata.signature, self.event_id_field, self.event_time_field, label)
            if stream_spec is not None:
                compatible(stream_spec, spec, label)
        except SignatureError as e:
            raise Refused(version, str(e)) from None
        serving_spec = stream_spec or spec
        sample = self._sample(model, serving_spec)
        if not sample:
            raise Refused(version, "no sample to score: no recent input and no input example logged with the model")
        self._score_sample(handle, serving_spec, sample, version)
        return GateResult(handle, serving_spec, len(sample), time.time() - t0)

    def _sample(self, model, spec: InputSpec) -> list[str]:
        if self.recent_sample is not None:
            recent = self.recent_sample()[: self.sample_rows]
            if recent:
                return recent
        example = getattr(model, "input_example", None)
        if example is None:
            return []
        import pandas as pd

        frame = example if isinstance(example, pd.DataFrame) else pd.DataFrame(example)
        rows = []
        for i, rec in enumerate(frame.head(self.sample_rows).to_dict(orient="records")):
            rec = {k: (v.item() if hasattr(v, "item") else v) for k, v in rec.items()}
            rec[spec.event_id_field] = f"gate-sample-{i}"
            rec[spec.event_time_field] = "2000-01-01T00:00:00Z"
            rows.append(orjson.dumps(rec).decode())
        return rows

    def _score_sample(self, handle: ModelHandle, spec: InputSpec, sample: list[str], version: str) -> None:
        if self.spark is None:
            import pandas as pd

            from scoring.records import score_chunk

            out = score_chunk(pd.Series(sample), spec, load_model(handle))
            bad = out[~out["ok"]]
            reasons = list(bad["reason"])
        else:
            from scoring.transform import as_events, score

            df = as_events(self.spark.createDataFrame([(s,) for s in sample], "value string"), "validation-gate")
            parts = max(1, self.spark.sparkContext.defaultParallelism)
            rows = score(df.repartition(parts), handle, spec, -1).select("ok", "reason").collect()
            reasons = [r.reason for r in rows if not r.ok]
        if reasons:
            raise Refused(version, f"scoring the {len(sample)}-row sample failed: {reasons[0]}")
