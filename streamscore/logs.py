"""Logging for the command line (library modules only log through ``logging.getLogger(__name__)``
and never configure anything on import).

By default the console shows the project's own lines (loggers under ``streamscore``) on stderr, and
everything else (MLflow, py4j, Kafka clients, and the JVM's own output: Spark, Delta, the Kafka
connector) goes to one file per command run, ``<app.home>/logs/<command>-<time>.log``, named in the
first console line. ``--verbose`` sends everything to the console instead.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

PROJECT_LOGGER = "streamscore"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass
class LogSetup:
    """How this process logs (set by :func:`setup_logging`). Process-wide by nature: the root
    logger's handlers and file descriptors 1 and 2 belong to the process, and one command runs per
    process (a test that runs commands in-process saves and restores it: :func:`current`,
    :func:`restore`)."""

    log_file: Path | None = None  # where third-party and JVM output goes (None: the console)
    quiet: bool = False  # MLflow's own console prints go to the log file


_setup = LogSetup()


def current() -> LogSetup:
    return replace(_setup)


def restore(setup: LogSetup) -> None:
    global _setup
    _setup = replace(setup)


class _OwnLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name == PROJECT_LOGGER or record.name.startswith(PROJECT_LOGGER + ".")


def setup_logging(
    level: str = "INFO", *, verbose: bool = False, home: Path | None = None, command: str = "streamscore"
) -> Path | None:
    """Configure the root logger for a command run; returns the log file (None when verbose or
    when there is no state folder yet)."""
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")  # mlflow would add its own console handler
    # stdout carries the command's JSON summary only (the summary names the run and its server)
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    quiet = not verbose
    if not verbose:
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # download bars on stderr
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_streamscore", False):
            root.removeHandler(h)
            h.close()
    console = _Console()
    console.setFormatter(logging.Formatter(_FORMAT))
    console.setLevel(level if not verbose else logging.DEBUG)
    _mark(console)
    log_file: Path | None = None
    if not verbose:
        console.addFilter(_OwnLines())
        if home is not None:
            logs = home / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            log_file = logs / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
            file_handler = logging.FileHandler(log_file)
            file_handler.setFormatter(logging.Formatter(_FORMAT))
            file_handler.setLevel(logging.INFO)
            _mark(file_handler)
            root.addHandler(file_handler)
    root.addHandler(console)
    root.setLevel(logging.INFO if not verbose else logging.DEBUG)
    logging.getLogger(PROJECT_LOGGER).setLevel(level)
    logging.getLogger("py4j").setLevel(logging.WARNING)
    logging.captureWarnings(True)
    restore(LogSetup(log_file, quiet))
    if log_file is not None:
        logging.getLogger(PROJECT_LOGGER).info("library and JVM logs: %s", log_file)
    return log_file


def quiet_mlflow() -> None:
    """Send MLflow's own console prints (``Created version '3' of model ...``) to the log file
    unless verbose; called once MLflow is imported anyway."""
    if not _setup.quiet:
        return
    from mlflow.utils import logging_utils

    # not under "mlflow": a handler MLflow installed on its own logger (when it was imported before
    # logging was set up) writes to the very stream patched here, which would loop
    prints = logging.getLogger("mlflow_prints")

    def write(text: str) -> None:
        if text.strip():
            prints.info(text.rstrip())

    logging_utils.MLFLOW_LOGGING_STREAM.write = write  # type: ignore[method-assign]
    logging_utils.MLFLOW_LOGGING_STREAM.flush = lambda: None  # type: ignore[method-assign]


class _Console(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (a caller may have replaced it
    since, e.g. a test harness capturing output), never to a stream closed meanwhile."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _mark(handler: logging.Handler) -> None:
    handler._streamscore = True  # type: ignore[attr-defined]


def log_file() -> Path | None:
    """Where third-party and JVM output goes in this command run (None: the console)."""
    return _setup.log_file


class redirect_fds_to_log:  # noqa: N801 - used as a context manager, reads as a function
    """While active, file descriptors 1 and 2 point at the log file, so that a child process started
    meanwhile (the Spark JVM, and the Python workers it starts) writes there; this process's own
    ``sys.stdout`` / ``sys.stderr`` get their descriptors back on exit."""

    def __init__(self) -> None:
        self._saved: list[tuple[int, int]] = []

    def __enter__(self) -> redirect_fds_to_log:
        if _setup.log_file is None:
            return self
        sys.stdout.flush()
        sys.stderr.flush()
        target = os.open(_setup.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            for fd in (1, 2):
                self._saved.append((fd, os.dup(fd)))
                os.dup2(target, fd)
        finally:
            os.close(target)
        return self

    def __exit__(self, *exc: object) -> None:
        for fd, saved in self._saved:
            os.dup2(saved, fd)
            os.close(saved)
        self._saved.clear()
