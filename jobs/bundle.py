"""``streamscore bundle``: write the Databricks Asset Bundle's resources from the same definition
``streamscore submit`` uses: the jobs (``resources/streamscore.jobs.yml``) and, when
``monitor.problem_type`` is set, a Lakehouse Monitoring ``quality_monitors`` resource for the output
table (``resources/streamscore.monitors.yml``). The Unity Catalog location comes from the bundle's
variables ``catalog_name`` and ``schema_name`` (set per target in ``databricks.yml``). ``--check``
compares instead of writing and fails when a committed file differs."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from streamscore.conf.settings import Settings
from streamscore.errors import JobStatus, StreamscoreError
from streamscore.jobs.common import ArgumentParser, Summary, add_settings_args, prepare_remote, run_command

RESOURCE_FILE = Path("resources") / "streamscore.jobs.yml"
MONITOR_FILE = Path("resources") / "streamscore.monitors.yml"
HEADER = "# Written by `streamscore bundle` from the settings (profile databricks); do not edit by hand.\n"
BACKFILL_DEFAULT_ARGS = ("--kafka",)  # override per run: databricks bundle run ... --python-params
# the jobs run in the target's catalog and schema (the bundle's variables, mlops-stacks' convention)
UC_VARIABLES = ("databricks.catalog_name=${var.catalog_name}", "databricks.schema_name=${var.schema_name}")
UC_SCHEMA = "${var.catalog_name}.${var.schema_name}"


def render(settings_profile: str, settings: Settings) -> str:
    from streamscore import databricks as db

    resources = {}
    for command, job_args in (("stream", ()), ("backfill", BACKFILL_DEFAULT_ARGS)):
        spec = db.JobSpec(command, settings_profile, UC_VARIABLES, job_args)
        resources[f"streamscore_{command}"] = db.job_settings(settings, spec, db.BUNDLE_WHEEL).as_dict()
    return HEADER + yaml.safe_dump({"resources": {"jobs": resources}}, sort_keys=True, width=100)


def monitor_resource(settings: Settings) -> dict[str, Any] | None:
    """The ``quality_monitors`` resource of the stream's output table (the fields of the SDK's
    ``QualityMonitorsAPI.create``): an ``inference_log`` profile on the columns the job writes."""
    from databricks.sdk.service import catalog

    m = settings.monitor
    if m.problem_type is None:
        return None
    table = settings.sink.output_table or f"{UC_SCHEMA}.scored"
    profile = catalog.MonitorInferenceLog(
        problem_type=catalog.MonitorInferenceLogProblemType(f"PROBLEM_TYPE_{m.problem_type.upper()}"),
        timestamp_col=m.timestamp_col,
        granularities=list(m.granularities),
        prediction_col="prediction",
        model_id_col="model_version",
        label_col=m.label_col,
    )
    resource: dict[str, Any] = {
        "table_name": table,
        "output_schema_name": ".".join(table.split(".")[:-1]),
        "assets_dir": m.assets_dir or "/Workspace/Users/${workspace.current_user.userName}/streamscore/monitoring",
        "inference_log": profile.as_dict(),
    }
    if m.schedule:
        resource["schedule"] = catalog.MonitorCronSchedule(
            quartz_cron_expression=m.schedule, timezone_id="UTC"
        ).as_dict()
    return resource


def render_monitors(settings: Settings) -> str | None:
    resource = monitor_resource(settings)
    if resource is None:
        return None
    body = {"resources": {"quality_monitors": {"streamscore_scored": resource}}}
    return HEADER + yaml.safe_dump(body, sort_keys=True, width=100)


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or ArgumentParser(prog="streamscore bundle", description=__doc__)
    add_settings_args(p, default_profile="databricks")
    p.add_argument("--root", type=Path, default=Path("."), help="the bundle's root folder (default .)")
    p.add_argument("--check", action="store_true", help="fail if the written file differs from a fresh render")
    return p


def _run(args: argparse.Namespace) -> Summary:
    settings = prepare_remote(args, "bundle")
    files = {RESOURCE_FILE: render(args.profile, settings), MONITOR_FILE: render_monitors(settings)}
    if args.check:
        for rel, text in files.items():
            path = args.root / rel
            current = path.read_text() if path.is_file() else None
            if current != text:
                raise StreamscoreError(f"{path} differs from a fresh render: run `streamscore bundle` and commit it")
        return {"job": "bundle", "status": JobStatus.OK.value, "files": [str(p) for p in files], "up_to_date": True}
    for rel, text in files.items():
        path = args.root / rel
        if text is None:
            path.unlink(missing_ok=True)  # no monitor configured: none in the bundle
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return {
        "job": "bundle",
        "status": JobStatus.OK.value,
        "files": [str(args.root / p) for p, t in files.items() if t is not None],
        "jobs": ["streamscore_stream", "streamscore_backfill"],
        "quality_monitors": ["streamscore_scored"] if files[MONITOR_FILE] else [],
    }


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("bundle", build_parser, _run, argv)
