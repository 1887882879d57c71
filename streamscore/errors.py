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


class JobFailed(StreamscoreError):
    """A job ended FAILED. ``summary`` is the JSON summary it printed; ``__cause__`` the error."""

    def __init__(self, message: str, summary: dict[str, Any], exit_code: int = EXIT_FAILED):
        super().__init__(message)
        self.summary = summary
        self.exit_code = exit_code
