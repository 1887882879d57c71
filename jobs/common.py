"""What every command shares: its argument parser (errors become a usage error, exit 2), the
settings arguments, logging set-up, and the contract of the last stdout line: one JSON summary,
whatever the exit path.

Exit codes: 0 done (FINISHED, OK, or KILLED: stopped by a signal after its current batch), 1 failed,
2 usage or configuration error (the message names the option or key).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from streamscore.conf.settings import Settings, load_settings
from streamscore.errors import EXIT_FAILED, JobFailed, JobStatus, StreamscoreError, UsageError
from streamscore.logs import setup_logging

log = logging.getLogger("streamscore.jobs")

Summary = dict[str, Any]


class ArgumentParser(argparse.ArgumentParser):
    """Raises :class:`UsageError` instead of printing usage and exiting, so that a wrong command
    line still ends with the JSON summary line (``--help`` still prints help and exits 0)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def add_settings_args(p: argparse.ArgumentParser, default_profile: str = "local", config_file: bool = True) -> None:
    """``--profile``, ``--config`` (unless ``config_file`` is false), ``--set`` and ``--verbose``."""
    p.add_argument(
        "--profile",
        default=os.environ.get("STREAMSCORE_PROFILE") or default_profile,
        help=f"conf/profiles/<name>.yaml (env STREAMSCORE_PROFILE; default {default_profile})",
    )
    if config_file:
        p.add_argument(
            "--config",
            default=os.environ.get("STREAMSCORE_CONFIG"),
            help="extra YAML file layered over the profile (env STREAMSCORE_CONFIG)",
        )
    else:
        p.set_defaults(config=None)
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one key, e.g. --set trigger.max_batches=3 (repeatable; beats env STREAMSCORE_<SECTION>__<KEY>)",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="all logs on the console (default: the project's own; the rest in <home>/logs/)",
    )


def prepare(args: argparse.Namespace, command: str, extra: list[str] | None = None) -> Settings:
    """Load the settings of a command run and set up its logging."""
    settings = load_settings(args.profile, args.config, list(args.overrides) + list(extra or []))
    setup_logging(settings.app.log_level, verbose=args.verbose, home=settings.home, command=command)
    return settings


def prepare_remote(args: argparse.Namespace, command: str) -> Settings:
    """Settings of a job that runs elsewhere (``submit``, ``bundle``): their ``app.home`` is the
    remote one, so this command logs to the console only."""
    settings = load_settings(args.profile, args.config, list(args.overrides))
    setup_logging(settings.app.log_level, verbose=args.verbose, home=None, command=command)
    return settings


def emit(summary: Summary) -> None:
    """The command's last stdout line: one JSON object."""
    sys.stdout.flush()
    print(json.dumps(summary, default=str), flush=True)


def _report(command: str, message: str) -> None:
    sys.stderr.flush()
    print(f"streamscore {command}: {message}", file=sys.stderr, flush=True)


def run_command(
    command: str,
    build_parser: Callable[[argparse.ArgumentParser | None], argparse.ArgumentParser],
    run: Callable[[argparse.Namespace], Summary],
    argv: Sequence[str] | None = None,
) -> int:
    """Parse ``argv``, run the command, print its summary last; returns the exit code."""
    summary: Summary
    try:
        args = build_parser(None).parse_args(argv)
        summary = run(args)
        code = JobStatus(summary.get("status", JobStatus.OK)).exit_code
    except JobFailed as e:
        cause = e.__cause__
        if cause is not None and not isinstance(cause, StreamscoreError):
            log.error("%s failed", command, exc_info=cause)
        _report(command, str(cause if isinstance(cause, StreamscoreError) else e))
        summary, code = e.summary, e.exit_code
    except StreamscoreError as e:
        _report(command, f"{type(e).__name__}: {e}")
        summary, code = {"job": command, "status": JobStatus.FAILED.value, "error": str(e)}, e.exit_code
    except Exception as e:
        log.exception("%s failed", command)
        _report(command, f"{type(e).__name__}: {e}")
        summary, code = {"job": command, "status": JobStatus.FAILED.value, "error": f"{type(e).__name__}: {e}"}, 1
    summary.setdefault("job", command)
    emit(summary)
    return code if code is not None else EXIT_FAILED
