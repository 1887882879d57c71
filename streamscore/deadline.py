"""Run a blocking call with a time limit: in a daemon thread, waited for at most ``timeout_s``.

Used where a call may hang on something outside the job (a registry, a download, the tracking
server, a model's ``predict``) and the caller must go on. A call that overruns is abandoned, not
stopped: it finishes or fails in the background (daemon thread), and its result is dropped.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class Outcome(Generic[T]):
    finished: bool  # False: still running when the time was up
    value: T | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event, repr=False)

    def wait_more(self, timeout_s: float) -> bool:
        """Give an overrunning call more time (e.g. to wind down after a cancel); True once it ended."""
        self.finished = self.done.wait(timeout_s)
        return self.finished

    def result(self) -> T:
        """The value; re-raises the call's own error."""
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[return-value]


def run_within(fn: Callable[[], T], timeout_s: float, name: str) -> Outcome[T]:
    outcome: Outcome[T] = Outcome(finished=False)

    def run() -> None:
        try:
            outcome.value = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the calling thread
            outcome.error = e
        outcome.done.set()

    worker = threading.Thread(target=run, name=name, daemon=True)
    worker.start()
    outcome.finished = outcome.done.wait(timeout_s)
    return outcome
