"""``streamscore model register-demo|promote``: the demo model, and moving an alias with a timestamp."""

from __future__ import annotations

import argparse

from jobs.common import add_settings_args, run_job, settings_from, setup_logging


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="streamscore model", description=__doc__)
    p.add_argument("action", choices=["register-demo", "promote"])
    add_settings_args(p)
    p.add_argument("--variant", default="v1", choices=["v1", "v2"], help="register-demo: which demo model")
    p.add_argument("--version", help="promote: the version to point the alias at")
    p.add_argument("--alias", default="champion", help="alias to set (default champion; '' for none)")
    return p


def _run(args) -> dict:
    from streamscore.demo import promote, train_and_register
    from streamscore.tracking import configure_mlflow

    s = settings_from(args)
    configure_mlflow(s)
    if args.action == "register-demo":
        v = train_and_register(s.model.name, args.variant, args.alias or None)
        return {"job": "model", "action": "register-demo", "status": "OK", "model_name": s.model.name,
                "model_version": v, "alias": args.alias or None}
    if not args.version:
        raise SystemExit("promote needs --version")
    at = promote(s.model.name, args.version, args.alias)
    return {"job": "model", "action": "promote", "status": "OK", "model_name": s.model.name,
            "model_version": args.version, "alias": args.alias, "alias_set_at": at}


def main(argv=None) -> int:
    setup_logging()
    return run_job(_run, build_parser().parse_args(argv))
