"""Errors with one root, job statuses and exit codes.

Every error the project raises on purpose is a :class:`StreamscoreError`; its ``exit_code`` is what
the CLI returns for it. Anything else that escapes a job is a bug or an outage of a service the job
depends on, and exits with 1.

=========================  ====  ==========================================================
error                      exit  raised when
=========================  ====  ==========================================================
``UsageError``             2     a command line is wrong (unknown option, missing value)
``ConfigError``            2     a setting is unknown or invalid (the message names the key)
``RegistryError``          1     a model reference does not resolve, or its files cannot be read
``SignatureError``         1     a model's signature cannot feed the stream or its output table
``GateRefused``            1     a model version failed the validation gate (``.version``, ``.reason``)
``SourceError``            1     the input cannot be read (broker, table, offsets)
``SinkError``              1     an output table cannot be written
``CheckpointInUse``        1     another job holds the stream's checkpoint (the message names it)
``StreamFailed``           1     the streaming query ended with an error (``.detail``: Spark's text)
``JobFailed``              1     a job ended FAILED; ``.summary`` is its JSON summary
=========================  ====  ==========================================================
"""

from __future__ import annotations

import enum
from typing import Any


class JobStatus(str, enum.Enum):
    """How a job ended. The first three are MLflow run statuses; ``OK`` is for commands that open
    no MLflow run (``services``, ``produce``, ``model``, ``bench``)."""

    FINISHED = "FINISHED"
    FAILED = "FAILED"
    KILLED = "KILLED"  # stopped by SIGTERM / SIGINT after its current batch
    OK = "OK"

    def __str__(self) -> str:
        return self.value

    @property
    def exit_code(self) -> int:
        return EXIT_FAILED if self is JobStatus.FAILED else EXIT_OK


EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class StreamscoreError(Exception):
    """Root of the project's errors."""

    exit_code = EXIT_FAILED


class UsageError(StreamscoreError):
    """The command line is wrong."""

    exit_code = EXIT_USAGE


class ConfigError(StreamscoreError, ValueError):
    """The configuration is invalid; the message names the offending key(s)."""

    exit_code = EXIT_USAGE


class RegistryError(StreamscoreError, LookupError):
    """A model reference does not resolve to a version, or the version's files cannot be read."""


class SignatureError(StreamscoreError, ValueError):
    """A model's signature cannot be used by the stream, or does not match the stream's schema."""


class GateRefused(StreamscoreError):
    """A candidate model version failed the validation gate; ``reason`` says why."""

    def __init__(self, version: str, reason: str, model_name: str | None = None, ref: str | None = None):
        where = f"model {model_name!r} {ref} -> " if model_name else ""
        super().__init__(f"{where}version {version} refused: {reason}")
        self.version = version
        self.reason = reason
        self.model_name = model_name
        self.ref = ref


class SourceError(StreamscoreError):
    """The job's input cannot be read."""


class SinkError(StreamscoreError):
    """An output table cannot be written."""


class CheckpointInUse(StreamscoreError):
    """Another running job holds the checkpoint this job was given."""


class StreamFailed(StreamscoreError):
    """The streaming query ended with an error. The message is one line: the cause as the user can
    act on it (another job on the checkpoint, or the last error of the Python traceback Spark
    wraps); ``detail`` keeps Spark's whole text (it is logged)."""

    def __init__(self, message: str, detail: str):
        super().__init__(message)
        self.detail = detail

    @classmethod
    def from_query_error(cls, error: object, checkpoint: str | None = None) -> StreamFailed:
        text = str(error)
        if "ConcurrentTransactionException" in text or "DELTA_CONCURRENT_TRANSACTION" in text:
            where = f" {checkpoint}" if checkpoint else ""
            return cls(
                f"another job is running on the checkpoint{where}: Delta refused this job's write of a batch the "
                "other one wrote (nothing was written twice); stop one of them, or give each job its own "
                "sink.checkpoint_path",
                text,
            )
        return cls(f"streaming query failed: {_last_error_line(text)}", text)


def _last_error_line(text: str) -> str:
    """The line that says what went wrong: the last ``SomeError: ...`` of a Python traceback that
    Spark wraps (a batch's own error), else Spark's first line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    start = text.find("Traceback (most recent call last)")
    if start >= 0:
        body = text[start:].split("=== Streaming Query ===", 1)[0]
        for ln in reversed([x.strip() for x in body.splitlines() if x.strip()]):
            head = ln.split(":", 1)[0]
            if ":" in ln and head and " " not in head and head[0].isalpha():
                return ln[:2000]
    return (lines[0] if lines else text)[:2000]


class JobFailed(StreamscoreError):
    """A job ended FAILED. ``summary`` is the JSON summary it printed; ``__cause__`` the error."""

    def __init__(self, message: str, summary: dict[str, Any], exit_code: int = EXIT_FAILED):
        super().__init__(message)
        self.summary = summary
        self.exit_code = exit_code
