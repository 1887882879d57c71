"""Fault injection for the crash tests: kill the job at a named point of a batch.

``STREAMSCORE_FAILPOINT=<name>[@<n>]`` makes the job kill itself with SIGKILL (its whole process
group: the Python driver and its JVM, as ``kill -9`` of a job started in a session of its own does)
the ``n``-th time (default: the first) it reaches :func:`failpoint` ``name``. The points sit where a
crash is hardest to recover from:

* ``after-ledger-write``: the batch's version is in the ledger, nothing is written yet;
* ``between-writes``: the scored rows are committed to Delta, the dead letters are not;
* ``before-kafka-write``: both tables are committed, no message of the batch is written (with
  ``sink.kafka.topic``);
* ``after-writes``: both tables (and the batch's messages) are committed, the checkpoint does not
  know the batch is done.

Without the variable (always, outside the tests) a point costs one comparison. The armed point is
read from the environment once per process, on purpose: a failpoint sits deep inside a batch, where
no job object reaches, and the crash tests arm each job process they start through its environment.
"""

from __future__ import annotations

import logging
import os
import signal
from collections import Counter

log = logging.getLogger(__name__)

POINTS = ("after-ledger-write", "between-writes", "before-kafka-write", "after-writes")
_SPEC = os.environ.get("STREAMSCORE_FAILPOINT", "")
_reached: Counter[str] = Counter()


def _parse(spec: str) -> tuple[str, int] | None:
    if not spec:
        return None
    name, _, nth = spec.partition("@")
    if name not in POINTS or (nth and not nth.isdigit()):
        raise ValueError(f"STREAMSCORE_FAILPOINT={spec!r}: expected one of {', '.join(POINTS)}, optionally @<n>")
    return name, int(nth or 1)


_ARMED = _parse(_SPEC)


def failpoint(name: str) -> None:
    if _ARMED is None or _ARMED[0] != name:
        return
    _reached[name] += 1
    if _reached[name] == _ARMED[1]:
        log.warning("failpoint %s reached (time %d): killing the job with SIGKILL", name, _reached[name])
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.killpg(os.getpgrp(), signal.SIGKILL)
