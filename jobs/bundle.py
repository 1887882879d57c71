"""``streamscore bundle``: write the Databricks Asset Bundle's job resources
(``resources/streamscore.jobs.yml``) from the same definition ``streamscore submit`` uses.
``--check`` compares instead of writing and fails when the committed file differs."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import yaml

from streamscore.conf.settings import Settings
from streamscore.errors import JobStatus, StreamscoreError
from streamscore.jobs.common import ArgumentParser, Summary, add_settings_args, prepare_remote, run_command

RESOURCE_FILE = Path("resources") / "streamscore.jobs.yml"
HEADER = "# Written by `streamscore bundle` from the settings (profile databricks); do not edit by hand.\n"
BACKFILL_DEFAULT_ARGS = ("--kafka",)  # override per run: databricks bundle run ... --python-params


def render(settings_profile: str, settings: Settings) -> str:
    from streamscore import databricks as db

    resources = {}
    for command, job_args in (("stream", ()), ("backfill", BACKFILL_DEFAULT_ARGS)):
        spec = db.JobSpec(command, settings_profile, (), job_args)
        resources[f"streamscore_{command}"] = db.job_settings(settings, spec, db.BUNDLE_WHEEL).as_dict()
    return HEADER + yaml.safe_dump({"resources": {"jobs": resources}}, sort_keys=True, width=100)


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or ArgumentParser(prog="streamscore bundle", description=__doc__)
    add_settings_args(p, default_profile="databricks")
    p.add_argument("--root", type=Path, default=Path("."), help="the bundle's root folder (default .)")
    p.add_argument("--check", action="store_true", help="fail if the written file differs from a fresh render")
    return p


def _run(args: argparse.Namespace) -> Summary:
    settings = prepare_remote(args, "bundle")
    text = render(args.profile, settings)
    path = args.root / RESOURCE_FILE
    if args.check:
        if not path.is_file() or path.read_text() != text:
            raise StreamscoreError(f"{path} differs from a fresh render: run `streamscore bundle` and commit it")
        return {"job": "bundle", "status": JobStatus.OK.value, "file": str(path), "up_to_date": True}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return {
        "job": "bundle",
        "status": JobStatus.OK.value,
        "file": str(path),
        "jobs": ["streamscore_stream", "streamscore_backfill"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("bundle", build_parser, _run, argv)
