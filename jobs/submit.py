"""``streamscore submit {stream|backfill}``: run a job on Databricks with the project's wheel.

The job runs ``streamscore <command> --profile <profile> --set ...`` (this command's profile and
``--set`` options), plus the job's own arguments given after ``--`` (e.g. ``-- --delta PATH``).
Without ``--once`` a named job ``<databricks.job_name_prefix>-<command>-<model.name>`` is created or
updated (the stream as a continuous job on a job cluster, which Databricks starts by itself; a
backfill job is then run now). With ``--once`` a one-time run is submitted with an idempotency
token derived from the request, so a retried submit starts one run. ``--wait`` follows the run to
its end; ``--dry-run`` builds the wheel and prints the exact requests, sending nothing.
Authentication is the Databricks SDK's own (environment, ~/.databrickscfg profile, Azure)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from streamscore.errors import JobStatus
from streamscore.jobs.common import ArgumentParser, Summary, add_settings_args, prepare_remote, run_command


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or ArgumentParser(prog="streamscore submit", description=__doc__)
    p.add_argument("command", choices=["stream", "backfill"], help="the job to run on Databricks")
    # the job gets the same profile and --set options (no --config: the file would not be there)
    add_settings_args(p, default_profile="databricks", config_file=False)
    p.add_argument("--once", action="store_true", help="a one-time run (jobs/runs/submit) instead of a named job")
    p.add_argument("--wait", action="store_true", help="follow the run until it ends")
    p.add_argument("--timeout", type=float, help="--wait: give up following after this many seconds")
    p.add_argument("--dry-run", action="store_true", help="print the requests, send nothing")
    p.add_argument("--wheel", type=Path, help="the project's wheel (default: built from this checkout)")
    p.set_defaults(job_args=[])
    return p


def _check_job_args(command: str, job_args: list[str]) -> None:
    """The job's own arguments fail here, not on the cluster."""
    if command == "backfill":
        from streamscore.jobs.backfill import build_parser as backfill_parser
        from streamscore.jobs.backfill import request_from_args

        request_from_args(backfill_parser(None).parse_args(job_args))
    else:
        from streamscore.jobs.stream import build_parser as stream_parser

        stream_parser(None).parse_args(job_args)


def _run(args: argparse.Namespace) -> Summary:
    from streamscore import databricks as db

    _check_job_args(args.command, args.job_args)
    settings = prepare_remote(args, "submit")
    spec = db.JobSpec(args.command, args.profile, tuple(args.overrides), tuple(args.job_args))
    wheel = args.wheel or db.build_wheel(db.temp_dir())
    if not wheel.is_file():
        from streamscore.errors import UsageError

        raise UsageError(f"submit: --wheel {wheel}: no such file")
    target = db.wheel_target(settings, wheel)
    summary: Summary = {"job": "submit", "command": args.command, "once": args.once, "wheel": target}
    summary["locations"] = db.job_locations(settings, args.command, args.job_args)
    if args.once:
        body = db.submit_body(settings, spec, target)
        requests = [{"method": "POST", "path": "/api/2.2/jobs/runs/submit", "body": body}]
        summary["idempotency_token"] = body["idempotency_token"]
    else:
        job = db.job_settings(settings, spec, target)
        requests = [{"method": "POST", "path": "/api/2.2/jobs/create or /api/2.2/jobs/reset", "body": job.as_dict()}]
        summary["job_name"] = job.name
    if args.dry_run:
        print(json.dumps({"upload": {"from": str(wheel), "to": target}, "requests": requests}, indent=2))
        return {**summary, "status": JobStatus.OK.value, "dry_run": True}

    w = db.workspace_client()
    db.upload_wheel(w, wheel, target)
    run_id = None
    if args.once:
        run_id = db.submit_once(w, body)
    else:
        job_id, action = db.create_or_reset(w, job)
        summary.update(job_id=job_id, job_action=action)
        if args.command == "backfill":
            run_id = db.run_now(w, job_id)
    if run_id is None:  # a continuous stream job: Databricks starts (and restarts) its run itself
        return {**summary, "status": JobStatus.OK.value}
    state = (
        db.wait_for_run(w, run_id, settings.databricks.poll_interval_s, args.timeout)
        if args.wait
        else db.run_state(w, run_id)
    )
    summary.update(state)
    if args.wait and not state.get("timed_out"):
        ok = state["result_state"] == "SUCCESS"
        summary["status"] = (JobStatus.FINISHED if ok else JobStatus.FAILED).value
        if not ok:
            summary["error"] = f"run {run_id} ended {state['result_state']}: {state['state_message']}"
    else:
        summary["status"] = JobStatus.OK.value
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(argv or [])
    job_args = []
    if "--" in argv:
        cut = argv.index("--")
        argv, job_args = argv[:cut], argv[cut + 1 :]

    def parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
        built = build_parser(p)
        built.set_defaults(job_args=job_args)
        return built

    return run_command("submit", parser, _run, argv)
