"""Argument parsing, logging and the one-line JSON summary shared by the job entry points."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Optional

from conf.settings import ConfigError, Settings, load_settings


def add_settings_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default=os.environ.get("STREAMSCORE_PROFILE"),
                   help="conf/profiles/<name>.yaml (env STREAMSCORE_PROFILE; default local)")
    p.add_argument("--config", default=os.environ.get("STREAMSCORE_CONFIG"),
                   help="extra YAML file layered over the profile (env STREAMSCORE_CONFIG)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key, e.g. --set trigger.max_batches=3 (repeatable; beats env "
                        "STREAMSCORE_<SECTION>__<KEY>)")


def settings_from(args, extra: Optional[list[str]] = None) -> Settings:
    return load_settings(args.profile, args.config, list(args.overrides) + list(extra or []))


def setup_logging(level: str = "INFO") -> None:
    """Entry points configure logging (library modules never do): plain lines on stderr."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.WARNING)
    for name in ("streamscore", "scoring", "registry_watch", "jobs", "infra", "conf"):
        logging.getLogger(name).setLevel(level)
    logging.getLogger("py4j").setLevel(logging.WARNING)


def emit(summary: dict) -> None:
    """The job's last stdout line: one JSON object."""
    sys.stdout.flush()
    print(json.dumps(summary, default=str), flush=True)


def run_job(fn, args) -> int:
    try:
        summary = fn(args)
    except ConfigError as e:
        print(f"streamscore: configuration error: {e}", file=sys.stderr)
        emit({"status": "FAILED", "error": f"configuration error: {e}"})
        return 2
    except Exception as e:  # noqa: BLE001 - report and exit non-zero with a summary line
        logging.getLogger("jobs").exception("job failed")
        emit({"status": "FAILED", "error": f"{type(e).__name__}: {e}"})
        return 1
    emit(summary)
    return 0 if summary.get("status", "FINISHED") in ("FINISHED", "KILLED", "OK") else 1
