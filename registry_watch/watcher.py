"""Watch the registry and hot-swap the serving model version between micro-batches.

The watcher polls in a driver thread of its own (:meth:`start_background`, every
``poll_interval_s``), never on a batch's path: a registry that hangs, a slow download or a long
validation does not hold up scoring. Webhooks can ask for an immediate poll (:meth:`request_poll`).
A candidate that passes the gate is *prepared* (downloaded, loaded, workers warmed) and becomes the
serving version at the start of the next batch (:meth:`model_for_batch`), so each batch is scored
by exactly one version.

Replays: the version used for each batch id is written to a ledger before the batch is scored. A
batch replayed after a crash is scored by the version recorded for it, whatever the alias says now.

Safe rollout (:meth:`plan_for_batch`): with ``watch.canary.fraction`` above 0, a candidate that
passed the gate first serves that share of the events, beside the serving version, until
``watch.canary.promote_after_*`` (then it serves all) or until a ``watch.rollback.*`` threshold is
crossed (:meth:`batch_judged`: then it is refused with the reason, and the serving version goes on
alone). ``watch.shadow_ref`` names a version that scores every batch beside them, into the shadow
table only. The ledger records, per batch, the canary and the shadow too (and the canary's figures
so far): a replay uses exactly those versions, and a restart continues the canary where it was.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from streamscore.errors import GateRefused, RegistryError
from streamscore.faults import failpoint
from streamscore.registry_watch.gate import GateResult
from streamscore.registry_watch.resolve import ModelRef
from streamscore.rollout import CanaryProgress, RolloutStats
from streamscore.scoring.plan import ScoringPlan
from streamscore.scoring.spec import InputSpec
from streamscore.scoring.udf import ModelHandle

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

    from streamscore.conf.settings import WatchSettings

log = logging.getLogger(__name__)

LEDGER_KEEP = 200  # batches the ledger remembers (it is compacted when it holds twice as many)
MAX_RETRY_DELAY_S = 300.0  # a version whose validation hit a transient error is tried again at most this late


@dataclass
class SwapEvent:
    from_version: str
    to_version: str
    detected_at: float
    prepared_at: float
    swapped_at: float | None = None
    first_batch_id: int | None = None
    alias_set_at: float | None = None
    first_scored_at: float | None = None
    swap_latency_s: float | None = None
    gate_seconds: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


@dataclass
class Refusal:
    version: str
    reason: str
    at: float


@dataclass
class Rollback:
    version: str  # the canary sent back
    to_version: str  # the version that serves all events again
    reason: str
    at: float
    batches: int  # batches it served as a canary
    rows: int  # rows it was asked to score


@dataclass
class _Pending:
    result: GateResult
    event: SwapEvent


class RemoteFile(Protocol):
    """A small file on any file system (a checkpoint on a URI): read whole, written whole."""

    def read(self) -> bytes | None: ...

    def write(self, data: bytes) -> None: ...


class BatchLedger:
    """Record of ``batch_id -> version`` (JSON lines) beside the checkpoint.

    Local: appended and fsynced per batch; a line torn by a crash mid-write (the last one, without
    its newline) is cut off when the ledger is opened, so the next record starts on a line of its
    own. On a URI (``remote``): rewritten whole per batch through the file system's API (an object
    store replaces the object atomically). Any unreadable line is skipped with a warning, and only
    the last :data:`LEDGER_KEEP` batches are kept."""

    def __init__(self, path: Path | str, remote: RemoteFile | None = None):
        self.path = path
        self.remote = remote
        self._entries: dict[int, dict[str, Any]] = {}
        raw = self._read()
        if raw is None:
            return
        if raw and not raw.endswith(b"\n"):
            keep = raw.rfind(b"\n") + 1
            log.warning("ledger %s: cutting a torn last line (%d bytes)", path, len(raw) - keep)
            if remote is None:
                os.truncate(path, keep)
            raw = raw[:keep]
        for n, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                self._entries[int(rec["batch_id"])] = rec
            except (ValueError, KeyError, TypeError) as e:
                log.warning("ledger %s line %d unreadable, skipped: %s", path, n, e)

    def _read(self) -> bytes | None:
        if self.remote is not None:
            return self.remote.read()
        path = Path(self.path)
        return path.read_bytes() if path.exists() else None

    def get(self, batch_id: int) -> dict[str, Any] | None:
        return self._entries.get(batch_id)

    def last(self) -> dict[str, Any] | None:
        """The record of the highest batch id (the version the stream served last)."""
        return self._entries[max(self._entries)] if self._entries else None

    def record(self, batch_id: int, name: str, version: str, run_id: str, **extra: Any) -> None:
        """``extra``: what else scored the batch (a canary, a shadow) and the rollout's state."""
        rec = {"batch_id": batch_id, "name": name, "version": version, "run_id": run_id, "at": time.time(), **extra}
        self._entries[batch_id] = rec
        if len(self._entries) > 2 * LEDGER_KEEP:
            keep = sorted(self._entries)[-LEDGER_KEEP:]
            self._entries = {b: self._entries[b] for b in keep}
            self._rewrite()
        elif self.remote is not None:
            self._rewrite()
        else:
            path = Path(self.path)
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.write(json.dumps(rec) + "\n")
                f.flush()
                os.fsync(f.fileno())

    def _rewrite(self) -> None:
        data = "".join(json.dumps(self._entries[b]) + "\n" for b in sorted(self._entries)).encode()
        if self.remote is not None:
            self.remote.write(data)
            return
        path = Path(self.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".compacting")
        tmp.write_bytes(data)
        os.replace(tmp, path)


class PollOutcome(str, Enum):
    """What one :meth:`RegistryWatcher.poll` did (a ``str``: it reads and logs as its value)."""

    NOT_DUE = "not-due"  # polled less than poll_interval_s ago (and not asked to poll now)
    BUSY = "busy"  # another poll is running (the gate can take a while)
    RESOLVE_FAILED = "resolve-failed"  # the registry answered that the reference does not resolve
    REGISTRY_UNREACHABLE = "registry-unreachable"  # the registry did not answer
    UNCHANGED = "unchanged"  # the reference points at the serving (or already prepared) version
    PENDING_CANCELLED = "pending-cancelled"  # it moved back to the serving version before the swap
    REFUSED_RECENTLY = "refused-recently"  # a version refused less than retry_refused_after_s ago
    RETRY_LATER = "retry-later"  # a version whose validation hit a transient error, inside its backoff
    REFUSED = "refused"  # the gate refused the new version (its fault: a refusal is recorded)
    VALIDATION_ERROR = "validation-error"  # the gate could not finish (not its fault): backoff
    PREPARED = "prepared"  # the new version passed: it serves from the next batch


class SwapState(str, Enum):
    NOT_STARTED = "not-started"
    SERVING = "serving"  # one version serves; nothing waits
    PREPARED = "prepared"  # a validated version takes over at the start of the next new batch
    SWAPPED = "swapped"  # the new version took over; its first batch is not written yet


class Registry(Protocol):
    """The registered model as the watcher needs it (:class:`~.resolve.MlflowRegistry`)."""

    model_name: str

    def resolve(self, ref: ModelRef) -> ModelVersion: ...

    def alias_set_at(self, alias: str) -> float | None: ...


class Gate(Protocol):
    """The validation gate as the watcher needs it (:class:`~.gate.ValidationGate`)."""

    def admit(
        self, ref: ModelRef, stream_spec: InputSpec | None, resolved: ModelVersion | None = None
    ) -> GateResult: ...

    def handle_for(self, name: str, version: str, run_id: str, stream_spec: InputSpec | None) -> ModelHandle: ...


class RegistryWatcher:
    """State, guarded by ``_lock``: the serving version (``current``), a prepared one waiting for
    the next batch (``_pending``) and a swap whose first batch is not written yet
    (``_unscored_swap``): :attr:`state` names the combination. ``_poll_lock`` lets one poll run at a
    time (the gate runs outside ``_lock``, so a batch starting meanwhile is not held up by it).
    Time comes from ``clock`` (tests drive it)."""

    def __init__(
        self,
        registry: Registry,
        ref: ModelRef,
        gate: Gate,
        watch: WatchSettings,
        ledger: BatchLedger | None,
        on_swap: Callable[[SwapEvent], None] | None = None,
        on_refusal: Callable[[Refusal], None] | None = None,
        clock: Callable[[], float] = time.time,
        on_rollback: Callable[[Rollback], None] | None = None,
    ):
        self.registry = registry
        self.ref = ref
        self.gate = gate
        self.ledger = ledger
        self.poll_interval_s = watch.poll_interval_s
        self.retry_refused_after_s = watch.retry_refused_after_s
        self.on_swap = on_swap
        self.on_refusal = on_refusal
        self.clock = clock
        self.current: ModelHandle | None = None
        self.spec: InputSpec | None = None
        self.start_phases: dict[str, float] = {}  # the start version's gate steps, seconds
        self.swaps: list[SwapEvent] = []
        self.refusals: list[Refusal] = []
        self._refused_at: dict[str, float] = {}
        self._retries: dict[str, tuple[int, float]] = {}  # version -> (failed attempts, next try at)
        self._pending: _Pending | None = None
        self._unscored_swap: SwapEvent | None = None
        self._last_poll = 0.0
        self._poll_now = threading.Event()
        self._lock = threading.RLock()
        self._poll_lock = threading.Lock()
        self._hint_alias_set_at: float | None = None
        self._registry_down = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # safe rollout
        self.canary_settings = watch.canary
        self.rollback = watch.rollback
        self.shadow_ref = ModelRef.parse(watch.shadow_ref) if watch.shadow_ref else None
        self.shadow_max_seconds_per_row = watch.shadow_max_seconds_per_row
        self.on_rollback = on_rollback
        self.canary: ModelHandle | None = None
        self.progress: CanaryProgress | None = None
        self._canary_event: SwapEvent | None = None
        self.rollbacks: list[Rollback] = []
        self.shadow: ModelHandle | None = None
        self.shadow_problem: str | None = None  # why the shadow ref has no version scoring (None: it has)
        self._pending_shadow: ModelHandle | None = None
        self._shadow_refused: dict[str, float] = {}

    @property
    def model_name(self) -> str:
        return self.registry.model_name

    @property
    def state(self) -> SwapState:
        with self._lock:
            if self.current is None:
                return SwapState.NOT_STARTED
            if self._pending is not None:
                return SwapState.PREPARED
            return SwapState.SWAPPED if self._unscored_swap is not None else SwapState.SERVING

    # -- start -------------------------------------------------------------------------------
    def start(self, ref: ModelRef | None = None) -> ModelHandle:
        """Resolve and validate the initial version (it defines the stream's schema); ``ref``
        overrides the watched reference for this start only (a restart keeping the ledger's version).

        With a canary share set, a restart serves the version the ledger says served all events
        last, and a watched version other than it becomes (again) its canary, with the canary's
        figures so far when it was the canary already; versions rolled back are refused again."""
        last = self.ledger.last() if self.ledger is not None else None
        if ref is None and self.canary_settings.fraction > 0 and last is not None:
            return self._resume(last)
        self._serve(self.gate.admit(ref or self.ref, None), str(ref or self.ref))
        self._start_shadow()
        return self.serving

    def _serve(self, result: GateResult, why: str) -> None:
        """The start version (``why``: how it was chosen)."""
        self.current, self.spec = result.handle, result.spec
        self.start_phases = result.phases
        self._last_poll = self.clock()
        log.info("serving %s (%s)", result.handle.label, why)

    def _resume(self, last: dict[str, Any]) -> ModelHandle:
        for version, r in (last.get("rolled_back") or {}).items():
            at, reason = float(r["at"]), str(r["reason"])
            self._refused_at[version] = at
            self.refusals.append(Refusal(version, reason, at))
            self.rollbacks.append(Rollback(version, str(last["version"]), reason, at, 0, 0))
        result = self.gate.admit(ModelRef("version", str(last["version"])), None)
        self._serve(result, "the version that served all events last: the batch ledger")
        mv = self._resolve()
        new = not isinstance(mv, PollOutcome) and self._triage(str(mv.version), self.clock()) is None
        if new:
            assert not isinstance(mv, PollOutcome)
            if self._validate(mv, self.clock(), None) is PollOutcome.PREPARED:
                previous = last.get("canary") or {}
                with self._lock:
                    self._begin_canary(None)
                    if self.progress is not None and str(previous.get("version")) == self.progress.version:
                        self.progress = CanaryProgress.from_dict(previous)
                        log.info("the canary goes on where it was: %s", previous)
        self._start_shadow()
        return self.serving

    def _start_shadow(self) -> None:
        if self.shadow_ref is None:
            return
        handle = self._admit_shadow(None)
        if handle is not None:
            self.shadow = handle
            log.info("shadow: %s (%s) scores every batch beside the served version", handle.label, self.shadow_ref)

    def _admit_shadow(self, known: str | None) -> ModelHandle | None:
        """The shadow reference's version through the gate, when it is not ``known`` (the one
        shadowing now); None when it does not resolve, is refused (noted in ``shadow_problem``,
        tried again after ``retry_refused_after_s``) or is the same."""
        assert self.shadow_ref is not None
        try:
            mv = self.registry.resolve(self.shadow_ref)
        except Exception as e:  # noqa: BLE001 - a shadow never stops the stream
            problem = f"watch.shadow_ref {self.shadow_ref} does not resolve: {type(e).__name__}: {e}"
            if problem != self.shadow_problem:
                log.warning("%s; no shadow until it does", problem)
            self.shadow_problem = problem
            return None
        version = str(mv.version)
        if version == known:
            return None
        refused_at = self._shadow_refused.get(version)
        if refused_at is not None and self.clock() - refused_at < self.retry_refused_after_s:
            return None
        try:
            handle = self.gate.admit(self.shadow_ref, self.spec, resolved=mv).handle
            if handle.flavor != "pyfunc" or self.serving.flavor != "pyfunc":
                raise GateRefused(
                    version,
                    "a shadow needs pyfunc versions (served and shadow); a Spark ML version cannot shadow "
                    "or be shadowed: compare Spark ML versions with `streamscore backfill --compare-ref`",
                )
        except Exception as e:  # noqa: BLE001 - refused or not validated: no shadow, the stream goes on
            self._shadow_refused[version] = self.clock()
            self.shadow_problem = f"shadow version {version} ({self.shadow_ref}) not used: {e}"
            log.warning("%s", self.shadow_problem)
            return None
        self.shadow_problem = None
        return handle

    @property
    def serving(self) -> ModelHandle:
        if self.current is None:
            raise RuntimeError("the watcher has not been started")
        return self.current

    # -- polling -----------------------------------------------------------------------------
    def request_poll(self, alias_set_at: float | None = None) -> None:
        """Ask for a poll as soon as possible (e.g. from a webhook, which says when the alias moved)."""
        if alias_set_at is not None:
            self._hint_alias_set_at = alias_set_at
        self._poll_now.set()

    def poll(self, force: bool = False, alias_set_at: float | None = None) -> PollOutcome:
        """Check the registry; prepare a new version if the reference moved."""
        if not self._poll_lock.acquire(blocking=False):
            return PollOutcome.BUSY
        try:
            now = self.clock()
            if not force and not self._poll_now.is_set() and now - self._last_poll < self.poll_interval_s:
                return PollOutcome.NOT_DUE
            self._poll_now.clear()
            self._last_poll = now
            if self.shadow_ref is not None:
                self._poll_shadow()
            mv = self._resolve()
            if isinstance(mv, PollOutcome):
                return mv
            outcome = self._triage(str(mv.version), now)
            if outcome is not None:
                return outcome
            return self._validate(mv, now, alias_set_at)
        finally:
            self._poll_lock.release()

    def _poll_shadow(self) -> None:
        with self._lock:
            known = self._pending_shadow or self.shadow
        handle = self._admit_shadow(known.version if known is not None else None)
        if handle is not None:
            with self._lock:
                self._pending_shadow = handle
            log.info("shadow version %s passed the gate; it shadows from the next batch", handle.version)

    def _resolve(self) -> ModelVersion | PollOutcome:
        """The version the reference points at, or why the registry could not say."""
        try:
            mv = self.registry.resolve(self.ref)
        except RegistryError as e:
            log.warning("registry poll failed, keeping %s: %s", self.serving.label, e)
            return PollOutcome.RESOLVE_FAILED
        except Exception as e:  # noqa: BLE001 - a flaky registry must not stop scoring
            if not self._registry_down:  # log an outage once, not once per poll
                log.warning("registry unreachable, keeping %s: %s", self.serving.label, e)
            self._registry_down = True
            return PollOutcome.REGISTRY_UNREACHABLE
        if self._registry_down:
            log.warning("registry reachable again")
            self._registry_down = False
        return mv

    def _triage(self, version: str, now: float) -> PollOutcome | None:
        """None when ``version`` is a new candidate to validate, else why not."""
        with self._lock:
            target = self.serving.version
            if self.canary is not None:
                target = self.canary.version
            if self._pending is not None:
                target = self._pending.result.handle.version
            if version == target:
                return PollOutcome.UNCHANGED
            if version == self.serving.version:  # the reference moved back before the swap (or the canary) ended
                self._pending = None
                self._end_canary(f"version {target} is no longer wanted")
                log.info("version %s is no longer wanted: %s keeps serving", target, self.serving.label)
                return PollOutcome.PENDING_CANCELLED
        refused_at = self._refused_at.get(version)
        if refused_at is not None and now - refused_at < self.retry_refused_after_s:
            return PollOutcome.REFUSED_RECENTLY
        retry = self._retries.get(version)
        if retry is not None and now < retry[1]:
            return PollOutcome.RETRY_LATER
        return None

    def _validate(self, mv: ModelVersion, detected_at: float, alias_set_at: float | None) -> PollOutcome:
        version = str(mv.version)
        log.info(
            "registry: %s %s now points at version %s (serving %s); validating",
            self.model_name,
            self.ref,
            version,
            self.serving.version,
        )
        try:
            result = self.gate.admit(self.ref, self.spec, resolved=mv)
            if self.canary_settings.fraction > 0 and {result.handle.flavor, self.serving.flavor} != {"pyfunc"}:
                raise GateRefused(
                    version,
                    "a canary needs pyfunc versions and this candidate or the serving version is a Spark ML "
                    "model (one pass scores pyfunc versions only): set watch.canary.fraction: 0 to swap it whole",
                )
        except GateRefused as e:
            self._refuse(version, e)
            return PollOutcome.REFUSED
        except Exception as e:  # noqa: BLE001 - never fails the batch that polled; tried again later
            self._retry_later(version, e)
            return PollOutcome.VALIDATION_ERROR
        self._refused_at.pop(version, None)
        self._retries.pop(version, None)
        recorded_at = self.registry.alias_set_at(self.ref.value) if self.ref.kind == "alias" else None
        with self._lock:
            event = SwapEvent(
                from_version=self.serving.version,
                to_version=version,
                detected_at=detected_at,
                prepared_at=self.clock(),
                alias_set_at=alias_set_at or recorded_at or self._hint_alias_set_at,
                gate_seconds=result.seconds,
            )
            self._pending = _Pending(result, event)
            self._hint_alias_set_at = None
        share = self.canary_settings.fraction
        log.info(
            "version %s passed the gate in %.1fs; it serves %s from the next batch",
            version,
            result.seconds,
            "all events" if share <= 0 else f"{share:.0%} of the events as a canary",
        )
        return PollOutcome.PREPARED

    def _retry_later(self, version: str, e: Exception) -> None:
        attempts, _ = self._retries.get(version, (0, 0.0))
        delay = min(self.poll_interval_s * 2 ** (attempts + 1), MAX_RETRY_DELAY_S)
        self._retries[version] = (attempts + 1, self.clock() + delay)
        log.warning(
            "could not validate version %s (attempt %d: %s: %s); trying again in %.0fs, %s keeps serving",
            version,
            attempts + 1,
            type(e).__name__,
            e,
            delay,
            self.serving.label,
        )

    def _refuse(self, version: str, e: GateRefused) -> None:
        log.warning("candidate %s", e)
        self._record_refusal(Refusal(version, e.reason, self.clock()))

    def _record_refusal(self, refusal: Refusal) -> None:
        """Held against the version for ``retry_refused_after_s``, and reported."""
        self._refused_at[refusal.version] = refusal.at
        self.refusals.append(refusal)
        if self.on_refusal:
            self.on_refusal(refusal)

    @property
    def swap_pending(self) -> bool:
        return self._pending is not None

    # -- per batch ---------------------------------------------------------------------------
    def model_for_batch(self, batch_id: int) -> ModelHandle:
        """The version whose outputs ``batch_id`` serves (see :meth:`plan_for_batch`)."""
        return self.plan_for_batch(batch_id).served

    def plan_for_batch(self, batch_id: int) -> ScoringPlan:
        """The versions that score ``batch_id`` (the ledger's, for a replayed batch): a prepared
        version takes over here (or starts as the canary), a prepared shadow starts shadowing."""
        if self.ledger is None:
            raise RuntimeError("the watcher has no batch ledger")
        with self._lock:
            seen = self.ledger.get(batch_id)
            if seen is not None:
                return self._replay_plan(batch_id, seen)
            if self._pending is not None:
                if self.canary_settings.fraction > 0:
                    self._begin_canary(batch_id)
                else:
                    pending, self._pending = self._pending, None
                    self._take_over(pending.result.handle, pending.event, batch_id)
            if self._pending_shadow is not None:
                self.shadow, self._pending_shadow = self._pending_shadow, None
                log.info("shadow: %s from batch %d", self.shadow.label, batch_id)
            if self.shadow is not None and self.serving.flavor != "pyfunc":  # swapped to a Spark ML version
                self.shadow_problem = (
                    f"the shadow {self.shadow.label} stops: the serving {self.serving.label} is a Spark ML model "
                    "(one pass scores pyfunc versions only)"
                )
                log.warning("%s", self.shadow_problem)
                self.shadow = None
            plan = ScoringPlan(
                self.serving,
                self.canary,
                self.canary_settings.fraction if self.canary is not None else 0.0,
                self.shadow,
                self.shadow_max_seconds_per_row,
            )
            extra = plan.versions()
            if self.progress is not None and "canary" in extra:
                extra["canary"] = {**extra["canary"], **self.progress.as_dict()}
            rolled_back = self._recent_rollbacks()
            if rolled_back:
                extra["rolled_back"] = rolled_back
            serving = self.serving
            self.ledger.record(batch_id, serving.name, serving.version, serving.run_id, **extra)
            failpoint("after-ledger-write")
            return plan

    def _replay_plan(self, batch_id: int, seen: dict[str, Any]) -> ScoringPlan:
        def handle(rec: dict[str, Any], *now: ModelHandle | None) -> ModelHandle:
            for h in now:
                if h is not None and h.version == str(rec["version"]):
                    return h
            name = rec.get("name") or seen["name"]
            return self.gate.handle_for(name, str(rec["version"]), rec.get("run_id") or "", self.spec)

        served = handle(seen, self.current)
        if served is not self.current or seen.get("canary") or seen.get("shadow"):
            log.info("batch %d is a replay: scoring it as before (%s)", batch_id, _versions_text(seen))
        canary = seen.get("canary")
        shadow = seen.get("shadow")
        return ScoringPlan(
            served,
            handle(canary, self.canary, self.current) if canary else None,
            float(canary["fraction"]) if canary else 0.0,
            handle(shadow, self.shadow) if shadow else None,
            self.shadow_max_seconds_per_row,
        )

    def _begin_canary(self, batch_id: int | None) -> None:
        """The prepared version becomes the canary (under ``_lock``)."""
        assert self._pending is not None
        pending, self._pending = self._pending, None
        handle = pending.result.handle
        self.canary, self._canary_event = handle, pending.event
        self.progress = CanaryProgress(handle.version, handle.run_id, self.canary_settings.fraction)
        log.info(
            "canary: %s serves %.0f%% of the events (by event id) beside %s from %s",
            handle.label,
            self.canary_settings.fraction * 100,
            self.serving.label,
            "the start" if batch_id is None else f"batch {batch_id}",
        )

    def _end_canary(self, why: str) -> None:
        if self.canary is not None:
            log.info("canary %s ends: %s", self.canary.label, why)
        self.canary, self.progress, self._canary_event = None, None, None

    def _recent_rollbacks(self) -> dict[str, dict[str, Any]]:
        """Rollbacks still held against their versions (a restart keeps refusing them)."""
        now = self.clock()
        return {
            r.version: {"reason": r.reason, "at": r.at}
            for r in self.rollbacks
            if now - r.at < self.retry_refused_after_s
        }

    def batch_judged(self, batch_id: int, stats: RolloutStats | None) -> None:
        """After a batch with a canary is written: add its figures; roll the canary back when a
        ``watch.rollback.*`` threshold is crossed, or make it the serving version once
        ``watch.canary.promote_after_*`` is reached. Either takes effect from the next batch."""
        if stats is None or stats.canary is None:
            return
        with self._lock:
            canary, progress = self.canary, self.progress
            if canary is None or progress is None or stats.canary.version != canary.version:
                return  # a replay of an earlier canary's batch, or a canary already ended
            progress.add(stats.canary)
            why = progress.breach(self.rollback)
            if why is not None:
                self._roll_back(canary, progress, why)
            elif progress.due(self.canary_settings):
                self._promote(canary, progress, batch_id)

    def _roll_back(self, canary: ModelHandle, progress: CanaryProgress, why: str) -> None:
        at = self.clock()
        reason = (
            f"rolled back after {progress.batches} batch(es) as a canary: {why}; {self.serving.label} serves "
            "all events again (the alias is left as it is: point it elsewhere, or fix the model and register "
            "a new version)"
        )
        rollback = Rollback(canary.version, self.serving.version, reason, at, progress.batches, progress.rows)
        self.rollbacks.append(rollback)
        self._end_canary("rolled back")
        log.warning("version %s %s", canary.version, reason)
        if self.on_rollback:
            self.on_rollback(rollback)
        self._record_refusal(Refusal(canary.version, reason, at))

    def _promote(self, canary: ModelHandle, progress: CanaryProgress, batch_id: int) -> None:
        event = self._canary_event or SwapEvent(self.serving.version, canary.version, self.clock(), self.clock())
        self._end_canary(f"promoted after {progress.batches} batches and {progress.rows} rows without a breach")
        self._take_over(canary, event, batch_id + 1)

    def _take_over(self, handle: ModelHandle, event: SwapEvent, first_batch_id: int) -> None:
        """``handle`` serves every event from batch ``first_batch_id`` (under ``_lock``)."""
        event.swapped_at = self.clock()
        event.first_batch_id = first_batch_id
        self.current = handle
        self.swaps.append(event)
        self._unscored_swap = event
        log.info("swapped %s -> %s at batch %d", event.from_version, event.to_version, first_batch_id)

    def batch_scored(self, batch_id: int, rows_scored: int) -> None:
        """Called after a batch is written: closes the swap latency of the first batch after a swap."""
        with self._lock:
            ev = self._unscored_swap
            if ev is None or rows_scored == 0 or (ev.first_batch_id is not None and batch_id < ev.first_batch_id):
                return
            self._unscored_swap = None
            ev.first_scored_at = self.clock()
            start = ev.alias_set_at or ev.detected_at
            ev.swap_latency_s = ev.first_scored_at - start
        if self.on_swap:
            self.on_swap(ev)

    # -- background polling --------------------------------------------------------------------
    def start_background(self) -> None:
        if self._thread is not None:
            return

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.poll()
                except Exception:
                    log.exception("background registry poll failed")
                self._poll_now.wait(timeout=min(1.0, self.poll_interval_s))

        self._thread = threading.Thread(target=loop, name="streamscore-registry-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._poll_now.set()
        if self._thread is not None:  # a poll stuck on a hanging registry is left behind (daemon)
            self._thread.join(timeout=10)
            self._thread = None


def _versions_text(rec: dict[str, Any]) -> str:
    parts = [f"version {rec['version']}"]
    if rec.get("canary"):
        parts.append(f"canary {rec['canary']['version']} ({float(rec['canary']['fraction']):.0%})")
    if rec.get("shadow"):
        parts.append(f"shadow {rec['shadow']['version']}")
    return ", ".join(parts)
