"""One running job per checkpoint: a stream claims its checkpoint before anything starts.

Two queries on one checkpoint would each write every batch; Delta's transaction guard refuses the
second writer of a batch (no harm to the data), but only once both are running, and with Spark's
whole error. The claim says it in one line at start instead, naming the job that holds the
checkpoint: an exclusive ``flock`` on ``<checkpoint>/streamscore/owner.lock`` held by the job's
process for as long as it runs. The kernel drops the lock when the process ends, however it ends
(a ``kill -9`` leaves no stale claim). A checkpoint on a URI (``dbfs:/``, ``abfss://``, ...) has
no such lock: there the failure is reported in one line when it happens
(:meth:`~streamscore.errors.StreamFailed.from_query_error`).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from streamscore.errors import CheckpointInUse

log = logging.getLogger(__name__)


def is_local(checkpoint: str) -> bool:
    return "://" not in checkpoint and not checkpoint.startswith("dbfs:")


class CheckpointClaim:
    def __init__(self, checkpoint: str, job: str):
        self.checkpoint = checkpoint
        self.job = job
        self.path = Path(checkpoint) / "streamscore" / "owner.lock"
        self._fd: int | None = None
        self._owner: dict[str, Any] = {}

    def __enter__(self) -> CheckpointClaim:
        if not is_local(self.checkpoint):
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise CheckpointInUse(
                f"the checkpoint {self.checkpoint} is in use by another job ({_describe(holder)}): stop that job "
                "first, or give this one a checkpoint of its own (sink.checkpoint_path)"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._owner = {
            "job": self.job,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        self._write()
        return self

    def note(self, **info: Any) -> None:
        """Add to what a job refused by this claim is told about its holder (e.g. the MLflow run)."""
        if self._fd is not None:
            self._owner.update(info)
            self._write()

    def _write(self) -> None:
        assert self._fd is not None
        data = json.dumps(self._owner).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
                self._fd = None


def _read(fd: int) -> dict[str, Any]:
    try:
        raw = os.pread(fd, 65536, 0)
        value = json.loads(raw) if raw.strip() else {}
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(owner: dict[str, Any]) -> str:
    if not owner:
        return "it has not said which"
    parts = [f"streamscore {owner.get('job', '?')}", f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}"]
    if owner.get("since"):
        parts.append(f"since {owner['since']}")
    if owner.get("run_id"):
        parts.append(f"MLflow run {owner['run_id']}")
    return ", ".join(parts)
