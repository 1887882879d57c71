"""The one helper for a call with a time limit."""

from __future__ import annotations

import threading
import time

import pytest

from streamscore.deadline import run_within


def test_a_call_within_its_time_hands_back_its_value_or_its_error():
    assert run_within(lambda: 41 + 1, 5, "t").result() == 42
    outcome = run_within(lambda: 1 / 0, 5, "t")
    assert outcome.finished and isinstance(outcome.error, ZeroDivisionError)
    with pytest.raises(ZeroDivisionError):
        outcome.result()


def test_an_overrunning_call_is_abandoned_at_its_limit_and_may_be_given_more_time():
    release = threading.Event()
    started = time.monotonic()
    outcome = run_within(lambda: release.wait(30) and "late", 0.3, "t")
    assert not outcome.finished and 0.25 < time.monotonic() - started < 5
    assert not outcome.wait_more(0.1)
    release.set()
    assert outcome.wait_more(5) and outcome.result() == "late"
