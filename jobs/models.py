"""``streamscore model register-demo|promote``: the demo model, and moving an alias with a timestamp."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from streamscore.errors import ConfigError, UsageError
from streamscore.jobs.common import ArgumentParser, Summary, add_settings_args, prepare, run_command


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or ArgumentParser(prog="streamscore model", description=__doc__)
    p.add_argument("action", choices=["register-demo", "promote"])
    add_settings_args(p)
    p.add_argument("--variant", default="v1", choices=["v1", "v2"], help="register-demo: which demo model")
    p.add_argument("--version", help="promote: the version to point the alias at")
    p.add_argument("--alias", default="champion", help="alias to set (default champion; '' for none)")
    return p


def _run(args: argparse.Namespace) -> Summary:
    from streamscore.demo import promote, train_and_register
    from streamscore.tracking import configure_mlflow

    if args.action == "promote" and not args.version:
        raise UsageError("streamscore model promote: --version is required")
    s = prepare(args, "model")
    tracking_uri, _ = configure_mlflow(s)
    if args.action == "register-demo" and tracking_uri.startswith("azureml://"):
        raise ConfigError(
            "tracking.uri: register-demo logs the model through MLflow 3's logged-models API, which Azure "
            "ML's MLflow server does not implement; register it where that API exists (e.g. --set "
            "tracking.uri=databricks --set tracking.registry_uri=databricks-uc, or any MLflow 3 server). "
            "The stream and backfill jobs track to Azure ML without it."
        )
    if args.action == "register-demo":
        v = train_and_register(s.model.name, args.variant, args.alias or None)
        return {
            "job": "model",
            "action": "register-demo",
            "status": "OK",
            "model_name": s.model.name,
            "model_version": v,
            "alias": args.alias or None,
        }
    at = promote(s.model.name, args.version, args.alias)
    return {
        "job": "model",
        "action": "promote",
        "status": "OK",
        "model_name": s.model.name,
        "model_version": args.version,
        "alias": args.alias,
        "alias_set_at": at,
    }


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("model", build_parser, _run, argv)
