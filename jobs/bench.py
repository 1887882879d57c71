"""``streamscore bench``: end-to-end figures on this machine in one run, beside a plain
single-process consumer and the model's compute ceiling (see ``bench/benchmark.py``).

Starts the local services if needed, registers the models it uses, runs the real jobs in their own
processes, and writes ``results.json`` and ``results.md`` (the README's table) under ``--out``.

The benchmark is a folder of the source checkout (``bench/``), not part of the wheel: a cluster
that installs the wheel to score never loads it. This command runs it from the checkout the
package is installed from (``make setup`` installs it editable)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from streamscore.errors import ConfigError
from streamscore.jobs.common import ArgumentParser, Summary, add_settings_args, prepare, run_command

BENCH_FILE = Path(__file__).resolve().parents[1] / "bench" / "benchmark.py"  # jobs/ sits beside bench/
_MODULE = "streamscore_bench"


def load_benchmark() -> ModuleType:
    """The checkout's ``bench/benchmark.py`` (loaded once), or a ConfigError naming the fix."""
    if _MODULE in sys.modules:
        return sys.modules[_MODULE]
    if not BENCH_FILE.exists():
        raise ConfigError(
            "streamscore bench runs from a source checkout (bench/ is not in the wheel): clone the repository "
            "and run `make bench` there"
        )
    spec = importlib.util.spec_from_file_location(_MODULE, BENCH_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[_MODULE] = module  # its dataclasses look their module up while they are built
    spec.loader.exec_module(module)
    return module


def _default(sizes: object, name: str) -> str:
    return f" (default {getattr(sizes, name)})" if sizes is not None else ""


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    benchmark = load_benchmark() if BENCH_FILE.exists() else None
    scenarios: tuple[str, ...] = benchmark.SCENARIOS if benchmark else ()  # without the checkout, _run says so
    full = benchmark.Sizes() if benchmark else None
    p = p or ArgumentParser(prog="streamscore bench", description=__doc__)
    add_settings_args(p)
    p.add_argument(
        "--only",
        default=",".join(scenarios),
        help=f"scenarios, comma-separated (default: all of {', '.join(scenarios)})",
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny sizes: a smoke run of every scenario (figures meaningless)"
    )
    p.add_argument("--backlog", type=int, help=f"events in the throughput backlog{_default(full, 'backlog')}")
    p.add_argument("--swaps", type=int, help=f"alias moves during the loaded stream{_default(full, 'swaps')}")
    p.add_argument("--restarts", type=int, help=f"stop-and-restart swaps to compare with{_default(full, 'restarts')}")
    p.add_argument(
        "--backfill-rows", type=int, help=f"rows of the backfill's input table{_default(full, 'backfill_rows')}"
    )
    p.add_argument("--memory-swaps", type=int, help=f"versions in the memory check{_default(full, 'memory_swaps')}")
    p.add_argument(
        "--out", help="folder for results.json / results.md and the jobs' logs (default <home>/bench/<time>)"
    )
    return p


def _run(args: argparse.Namespace) -> Summary:
    benchmark = load_benchmark()

    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(benchmark.SCENARIOS))
    if unknown:
        raise SystemExit(f"streamscore bench: unknown scenario(s) {', '.join(unknown)}")
    sizes = benchmark.Sizes.quick() if args.quick else benchmark.Sizes()
    for name in ("backlog", "swaps", "restarts", "backfill_rows", "memory_swaps"):
        if getattr(args, name) is not None:
            setattr(sizes, name, getattr(args, name))
    settings = prepare(args, "bench")
    out = Path(args.out) if args.out else settings.home / "bench" / time.strftime("%Y%m%d-%H%M%S")
    base = ["--profile", settings.profile] + (["--config", str(Path(args.config).resolve())] if args.config else [])
    results = benchmark.run(settings, list(args.overrides), sizes, only, out.resolve(), base)
    t, sw, bf = results.get("throughput") or {}, results.get("swap") or {}, results.get("backfill") or {}
    return {
        "job": "bench",
        "status": "OK",
        "quick": args.quick,
        "scenarios": only,
        "results_json": str(out / "results.json"),
        "results_table": str(out / "results.md"),
        "rows_per_s": (t.get("streamscore") or {}).get("rows_per_s"),
        "ratio_vs_plain_consumer": t.get("ratio_vs_plain_consumer"),
        "ratio_vs_identity_model": t.get("ratio_vs_identity_model"),
        "start_to_first_commit_s": (t.get("streamscore") or {}).get("start_to_first_commit_s"),
        "hot_swap_p50_s": (sw.get("hot_swap_s") or {}).get("p50"),
        "hot_swap_with_shadow_p50_s": (sw.get("hot_swap_with_shadow_s") or {}).get("p50"),
        "ratio_shadow_vs_none": t.get("ratio_shadow_vs_none"),
        "restart_over_hot_swap_p50": sw.get("restart_over_hot_swap_p50"),
        "backfill_rows_per_s": bf.get("rows_per_s_after_startup"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("bench", build_parser, _run, argv)
