"""The registry watcher's decisions, poll by poll, without Spark or a server: a registry and a gate
that say what the test tells them, a clock the test moves, a real batch ledger on disk. The same
decisions on the real registry, gate and Spark: tests/test_watcher.py and the stream tests."""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field

import pytest

from streamscore.conf.settings import WatchSettings
from streamscore.errors import GateRefused, RegistryError
from streamscore.registry_watch.gate import GateResult
from streamscore.registry_watch.resolve import ModelRef
from streamscore.registry_watch.watcher import (
    MAX_RETRY_DELAY_S,
    BatchLedger,
    PollOutcome,
    RegistryWatcher,
    SwapState,
)
from streamscore.rollout import RolloutStats, Side
from streamscore.scoring.udf import ModelHandle

SPEC = object()  # the stream's schema: the watcher only passes it on


@dataclass
class Version:
    name: str
    version: str
    run_id: str = "run"


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@dataclass
class Registry:
    """The reference points at ``points_at``; ``error``, when set, is raised instead."""

    model_name: str = "m"
    points_at: str = "1"
    error: Exception | None = None
    alias_moved_at: float | None = None
    others: dict[str, str] = field(default_factory=dict)  # other aliases (a shadow's) -> version

    def resolve(self, ref: ModelRef) -> Version:
        if self.error is not None:
            raise self.error
        return Version(self.model_name, self.others.get(ref.value, self.points_at))

    def alias_set_at(self, alias: str) -> float | None:
        return self.alias_moved_at


def handle(version: str, flavor: str = "pyfunc") -> ModelHandle:
    return ModelHandle("m", version, f"run-{version}", f"/models/v{version}", f"v{version}", flavor)


@dataclass
class Gate:
    """Admits every version except those in ``refuse`` (its fault) and ``fail`` (a transient error)."""

    refuse: dict[str, str] = field(default_factory=dict)
    fail: dict[str, Exception] = field(default_factory=dict)
    admitted: list[str] = field(default_factory=list)
    replayed: list[str] = field(default_factory=list)
    hold: threading.Event | None = None  # set: admit waits for it
    spark: set[str] = field(default_factory=set)  # versions that are Spark ML models
    entered: threading.Event = field(default_factory=threading.Event)

    def admit(self, ref: ModelRef, stream_spec: object, resolved: Version | None = None) -> GateResult:
        version = resolved.version if resolved is not None else "1"
        self.entered.set()
        if self.hold is not None:
            self.hold.wait(10)
        if version in self.refuse:
            raise GateRefused(version, self.refuse[version], "m", str(ref))
        if version in self.fail:
            raise self.fail[version]
        self.admitted.append(version)
        return GateResult(handle(version, "spark" if version in self.spark else "pyfunc"), SPEC, 3, 0.25)  # type: ignore[arg-type]

    def handle_for(self, name: str, version: str, run_id: str, stream_spec: object) -> ModelHandle:
        self.replayed.append(version)
        return handle(version)


@pytest.fixture
def parts(tmp_path):
    clock, registry, gate = Clock(), Registry(), Gate()
    swaps, refusals = [], []

    def make(**watch) -> RegistryWatcher:
        w = RegistryWatcher(
            registry,
            ModelRef("alias", "champion"),
            gate,
            WatchSettings(**{"poll_interval_s": 5, "retry_refused_after_s": 600, **watch}),
            BatchLedger(tmp_path / "ledger.jsonl"),
            on_swap=swaps.append,
            on_refusal=refusals.append,
            clock=clock,
        )
        assert w.state is SwapState.NOT_STARTED
        assert w.start().version == "1" and w.state is SwapState.SERVING
        return w

    return make, clock, registry, gate, swaps, refusals


def test_a_new_version_is_prepared_then_serves_from_the_next_batch(parts, tmp_path):
    make, clock, registry, gate, swaps, _ = parts
    w = make()
    assert w.model_for_batch(0).version == "1"
    registry.points_at, registry.alias_moved_at = "2", clock() - 1.5
    clock.advance(2)
    assert w.poll() is PollOutcome.NOT_DUE  # inside the poll interval
    clock.advance(3)
    assert w.poll() is PollOutcome.PREPARED and w.state is SwapState.PREPARED and w.swap_pending
    assert w.poll(force=True) is PollOutcome.UNCHANGED  # already prepared: not validated twice
    assert gate.admitted == ["1", "2"] and w.serving.version == "1"
    clock.advance(1)
    assert w.model_for_batch(1).version == "2" and w.state is SwapState.SWAPPED
    (swap,) = w.swaps
    assert (swap.from_version, swap.to_version, swap.first_batch_id, swap.gate_seconds) == ("1", "2", 1, 0.25)
    assert swaps == []  # closed when the batch is written
    w.batch_scored(1, rows_scored=0)  # an empty batch does not close it
    assert w.state is SwapState.SWAPPED
    clock.advance(0.5)
    w.batch_scored(1, rows_scored=10)
    assert swaps == [swap] and w.state is SwapState.SERVING
    assert swap.swap_latency_s == pytest.approx(1.5 + 2 + 3 + 1 + 0.5)  # from the recorded alias move
    lines = [json.loads(x) for x in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    assert [(r["batch_id"], r["version"], r["run_id"]) for r in lines] == [(0, "1", "run-1"), (1, "2", "run-2")]


def test_a_refused_version_is_held_off_then_validated_again(parts):
    make, clock, registry, gate, _, refusals = parts
    w = make(retry_refused_after_s=600)
    gate.refuse["2"] = "its outputs do not fit"
    registry.points_at = "2"
    assert w.poll(force=True) is PollOutcome.REFUSED
    (refusal,) = refusals
    assert refusal.version == "2" and refusal.reason == "its outputs do not fit" and w.refusals == [refusal]
    clock.advance(599)
    assert w.poll(force=True) is PollOutcome.REFUSED_RECENTLY and gate.admitted == ["1"]
    assert w.model_for_batch(0).version == "1" and w.state is SwapState.SERVING
    clock.advance(2)
    assert w.poll(force=True) is PollOutcome.REFUSED and len(refusals) == 2  # tried again, refused again
    del gate.refuse["2"]
    clock.advance(601)
    assert w.poll(force=True) is PollOutcome.PREPARED
    assert w.model_for_batch(1).version == "2"


def test_a_validation_error_backs_off_doubling_and_is_never_a_refusal(parts):
    make, clock, registry, gate, _, refusals = parts
    w = make(poll_interval_s=5)
    gate.fail["2"] = RegistryError("download took longer than watch.download_timeout_s")
    registry.points_at = "2"
    assert w.poll(force=True) is PollOutcome.VALIDATION_ERROR
    waits = []
    for _ in range(7):
        waited = 0
        while (outcome := w.poll(force=True)) is PollOutcome.RETRY_LATER:
            clock.advance(1)
            waited += 1
        assert outcome is PollOutcome.VALIDATION_ERROR
        waits.append(waited)
    assert waits[:5] == [10, 20, 40, 80, 160]  # poll interval x 2, x 4, ...
    assert max(waits) == MAX_RETRY_DELAY_S
    assert refusals == [] and w.serving.version == "1"
    del gate.fail["2"]
    clock.advance(MAX_RETRY_DELAY_S)
    assert w.poll(force=True) is PollOutcome.PREPARED
    gate.fail["3"] = TimeoutError("sample scoring did not answer")  # a new version starts its own backoff
    registry.points_at = "3"
    assert w.poll(force=True) is PollOutcome.VALIDATION_ERROR
    clock.advance(9)
    assert w.poll(force=True) is PollOutcome.RETRY_LATER
    clock.advance(1)
    assert w.poll(force=True) is PollOutcome.VALIDATION_ERROR


def test_registry_errors_keep_the_serving_version_and_an_outage_is_logged_once(parts, caplog):
    make, clock, registry, gate, _, refusals = parts
    w = make()
    registry.error = RegistryError("model 'm' has no alias 'champion'")
    assert w.poll(force=True) is PollOutcome.RESOLVE_FAILED
    registry.error = ConnectionError("connection refused")
    with caplog.at_level(logging.WARNING, logger="streamscore.registry_watch.watcher"):
        for _ in range(5):
            assert w.poll(force=True) is PollOutcome.REGISTRY_UNREACHABLE
        registry.error, registry.points_at = None, "2"
        assert w.poll(force=True) is PollOutcome.PREPARED
    messages = [r.getMessage() for r in caplog.records]
    assert sum("registry unreachable" in m for m in messages) == 1
    assert sum("registry reachable again" in m for m in messages) == 1
    assert refusals == [] and w.model_for_batch(0).version == "2"


def test_a_pending_swap_is_cancelled_when_the_alias_moves_back(parts):
    make, clock, registry, gate, swaps, _ = parts
    w = make()
    registry.points_at = "2"
    assert w.poll(force=True) is PollOutcome.PREPARED and w.state is SwapState.PREPARED
    registry.points_at = "1"
    assert w.poll(force=True) is PollOutcome.PENDING_CANCELLED and w.state is SwapState.SERVING
    assert w.model_for_batch(0).version == "1" and w.swaps == [] and swaps == []
    registry.points_at = "3"  # a different new version replaces a pending one
    assert w.poll(force=True) is PollOutcome.PREPARED
    registry.points_at = "4"
    assert w.poll(force=True) is PollOutcome.PREPARED
    assert w.model_for_batch(1).version == "4" and [s.to_version for s in w.swaps] == ["4"]


def test_replayed_batches_are_pinned_to_the_ledgers_version(parts, tmp_path):
    make, clock, registry, gate, _, _ = parts
    ledger = tmp_path / "ledger.jsonl"
    ledger.write_text(
        "".join(
            json.dumps({"batch_id": b, "name": "m", "version": "7", "run_id": "run-7", "at": 0}) + "\n" for b in (3, 4)
        )
        + '{"batch_id": 5, "name": "m", "vers'  # torn by a crash mid-write: batch 5 was never recorded
    )
    w = make()  # serves version 1; the ledger says batches 3 and 4 were scored by 7
    registry.points_at = "2"
    assert w.poll(force=True) is PollOutcome.PREPARED
    assert w.model_for_batch(3).version == "7" and gate.replayed == ["7"]
    assert w.model_for_batch(4).version == "7" and w.state is SwapState.PREPARED  # the swap waits for a new batch
    assert w.model_for_batch(5).version == "2" and w.state is SwapState.SWAPPED  # the torn line's batch is new
    assert w.model_for_batch(5).version == "2" and gate.replayed == ["7", "7"]  # its replay: the serving version
    again = BatchLedger(ledger)
    assert [again.get(b)["version"] for b in (3, 4, 5)] == ["7", "7", "2"]


def test_one_poll_at_a_time_and_a_requested_poll_is_due_at_once(parts):
    make, clock, registry, gate, _, _ = parts
    w = make(poll_interval_s=60)
    assert w.poll() is PollOutcome.NOT_DUE
    w.request_poll(alias_set_at=clock() - 4)
    registry.points_at = "2"
    gate.hold, gate.entered = threading.Event(), threading.Event()
    outcome: list[PollOutcome] = []
    t = threading.Thread(target=lambda: outcome.append(w.poll()))
    t.start()
    try:
        assert gate.entered.wait(10)  # the first poll is inside the gate
        assert w.poll(force=True) is PollOutcome.BUSY
        assert w.model_for_batch(0).version == "1"  # a batch is not held up by a poll in the gate
    finally:
        gate.hold.set()
        t.join(10)
    assert outcome == [PollOutcome.PREPARED]
    assert w.model_for_batch(1).version == "2"
    clock.advance(1)
    w.batch_scored(1, 5)
    assert w.swaps[0].swap_latency_s == pytest.approx(5)  # from the webhook's alias time
    assert w.poll() is PollOutcome.NOT_DUE


def _canary_batch(version: str, rows: int, errors: int = 0) -> RolloutStats:
    comparison = {"rows": rows - errors, "kind": "classification", "agreement": 1.0}
    return RolloutStats(canary=Side(version, rows, errors, 0.001 * rows, comparison, served=rows - errors))


def test_a_canary_serves_its_share_goes_on_after_a_restart_and_is_promoted(parts):
    make, clock, registry, gate, swaps, _ = parts
    canary = {"canary": {"fraction": 0.25, "promote_after_batches": 3, "promote_after_rows": 30}}
    w = make(**canary)
    assert w.model_for_batch(0).version == "1"
    registry.points_at = "2"
    assert w.poll(force=True) is PollOutcome.PREPARED
    plan = w.plan_for_batch(1)
    assert (plan.served.version, plan.canary and plan.canary.version, plan.fraction) == ("1", "2", 0.25)
    w.batch_judged(1, _canary_batch("2", 10))
    assert w.plan_for_batch(2).canary is not None and w.progress and w.progress.batches == 1

    w2 = make(**canary)  # a restart on the same ledger: v1 serves, v2 is the canary again, its figures kept
    assert w2.canary and w2.canary.version == "2" and w2.progress and (w2.progress.batches, w2.progress.rows) == (1, 10)
    replay = w2.plan_for_batch(2)  # the ledger's batch: the recorded versions
    assert (replay.served.version, replay.canary and replay.canary.version) == ("1", "2")
    w2.batch_judged(2, _canary_batch("2", 10))
    assert w2.plan_for_batch(3).canary is not None
    w2.batch_judged(3, _canary_batch("2", 10))  # 3 batches, 30 rows, no breach: promoted
    plan = w2.plan_for_batch(4)
    assert (plan.served.version, plan.canary) == ("2", None) and w2.serving.version == "2"
    assert [(s.to_version, s.first_batch_id) for s in w2.swaps] == [("2", 4)]
    assert "canary" not in json.loads((w2.ledger.path).read_text().splitlines()[-1])  # type: ignore[union-attr]


def test_a_canary_crossing_a_threshold_is_refused_and_a_restart_keeps_it_refused(parts):
    make, clock, registry, gate, _, refusals = parts
    settings = {"canary": {"fraction": 0.5}, "rollback": {"min_rows": 20, "max_model_error_rate": 0.1}}
    w = make(**settings)
    w.model_for_batch(0)
    registry.points_at = "2"
    assert w.poll(force=True) is PollOutcome.PREPARED
    w.plan_for_batch(1)
    w.batch_judged(1, _canary_batch("2", 10, errors=5))  # below min_rows: not judged yet
    assert w.canary is not None
    w.plan_for_batch(2)
    w.batch_judged(2, _canary_batch("2", 10, errors=0))  # 5 of 20 failed: 0.25 > 0.1
    assert w.canary is None and w.serving.version == "1"
    (rb,) = w.rollbacks
    assert rb.version == "2" and "5 of the 20 rows" in rb.reason and "max_model_error_rate" in rb.reason
    assert refusals[-1].version == "2" and w.plan_for_batch(3).canary is None
    assert w.poll(force=True) is PollOutcome.REFUSED_RECENTLY
    w2 = make(**settings)
    assert w2.canary is None and [r.version for r in w2.rollbacks] == ["2"]
    assert w2.poll(force=True) is PollOutcome.REFUSED_RECENTLY


def test_a_spark_ml_candidate_is_refused_as_a_canary_naming_the_setting(parts):
    make, clock, registry, gate, _, refusals = parts
    w = make(canary={"fraction": 0.1})
    w.model_for_batch(0)
    registry.points_at, gate.spark = "2", {"2"}
    assert w.poll(force=True) is PollOutcome.REFUSED
    assert "watch.canary.fraction: 0" in refusals[-1].reason and w.plan_for_batch(1).canary is None


def test_a_shadow_starts_with_the_stream_swaps_when_its_alias_moves_and_is_in_the_ledger(parts, tmp_path):
    make, clock, registry, gate, _, _ = parts
    registry.others["challenger"] = "5"
    w = make(shadow_ref="@challenger")
    plan = w.plan_for_batch(0)
    assert plan.served.version == "1" and plan.shadow and plan.shadow.version == "5"
    registry.others["challenger"] = "6"
    assert w.poll(force=True) is PollOutcome.UNCHANGED  # the served alias did not move; the shadow's did
    assert w.plan_for_batch(1).shadow.version == "6"  # type: ignore[union-attr]
    lines = [json.loads(x) for x in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    assert [line["shadow"]["version"] for line in lines] == ["5", "6"]
    registry.others["challenger"] = "7"
    gate.refuse["7"] = "does not fit"
    w.poll(force=True)  # refused: the shadow it has goes on, the problem is said
    assert w.plan_for_batch(2).shadow.version == "6" and "does not fit" in (w.shadow_problem or "")  # type: ignore[union-attr]
