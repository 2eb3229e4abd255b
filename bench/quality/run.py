"""Does the thinking pay? Accuracy against spend, one direct call against each service profile.

    .venv/bin/python -m bench.quality                       # starts the service itself (serve run)
    .venv/bin/python -m bench.quality --n 6 --levels 1      # a quick look
    .venv/bin/python -m bench.quality --base-url http://127.0.0.1:8000 --model token-killer
    TOKEN_KILLER_CONFIG=configs/examples/openai.yaml .venv/bin/python -m bench.quality

Writes bench/results/quality/<timestamp>.json (every reply), bench/results/quality/accuracy_vs_tokens.png,
and appends a section to BENCHMARKS.md (unless --no-append).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.quality import report
from bench.quality.arms import (
    Arm,
    api_root,
    direct_arm,
    listed_models,
    load_app_config,
    requested_models,
    service_arms,
    service_key,
)
from bench.quality.ask import ask_arm
from bench.quality.problems import LEVELS, Problem, generate
from bench.quality.progress import Progress
from bench.quality.stats import summarize_arm
from bench.service import ROOT, start_service

DEFAULT_OUT = ROOT / "bench" / "results" / "quality"


def log(message: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.quality", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--base-url",
        help="a running service (e.g. http://127.0.0.1:8000); without it, "
        "the harness runs `serve run serve_config.yaml` on a free port",
    )
    p.add_argument(
        "--model",
        action="append",
        help="service profile(s) to ask (repeat or comma-separate); default: every id GET /v1/models lists",
    )
    p.add_argument("--n", type=int, default=30, help="problems (default 30)")
    p.add_argument("--seed", type=int, default=0, help="problem seed (default 0)")
    p.add_argument("--concurrency", type=int, default=4, help="requests at once per arm (default 4)")
    p.add_argument("--levels", default="1,2,3", help="difficulty levels, comma-separated (default 1,2,3)")
    p.add_argument(
        "--config",
        type=Path,
        default=Path(os.environ.get("TOKEN_KILLER_CONFIG", "configs/default.yaml")),
        help="the service's app config (default: $TOKEN_KILLER_CONFIG, else configs/default.yaml)",
    )
    p.add_argument("--direct-base-url", help="the direct arm's base URL (default: models.thinker.base_url)")
    p.add_argument("--direct-model", help="the direct arm's model (default: models.thinker.model)")
    p.add_argument(
        "--direct-max-tokens",
        type=int,
        help="the direct arm's max_tokens (default: thinker max_tokens × thinking.max_steps)",
    )
    p.add_argument("--no-append", action="store_true", help="do not append a section to BENCHMARKS.md")
    p.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {report.shown_path(DEFAULT_OUT)})"
    )
    args = p.parse_args(argv)
    try:
        args.levels = tuple(int(x) for x in args.levels.split(",") if x.strip())
    except ValueError:
        p.error(f"--levels: comma-separated integers among {LEVELS}")
    if not args.levels or set(args.levels) - set(LEVELS):
        p.error(f"--levels: comma-separated integers among {LEVELS}")
    if args.n < 1 or args.concurrency < 1:
        p.error("--n and --concurrency must be at least 1")
    if not args.config.is_absolute():
        args.config = (Path.cwd() / args.config) if (Path.cwd() / args.config).exists() else ROOT / args.config
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    problems = generate(args.n, args.seed, args.levels)
    app_config = load_app_config(args.config)
    direct_options = {
        "base_url": args.direct_base_url,
        "model": args.direct_model,
        "max_tokens": args.direct_max_tokens,
    }
    direct_arm(app_config, None, **direct_options)  # a missing key or model fails now, before any start-up
    from bench.run import machine_info  # imports Ray: only once the arguments are known to be good

    started, t0 = datetime.now(UTC), time.monotonic()
    machine = machine_info()
    own = None
    try:
        if args.base_url:
            root = api_root(args.base_url)
        else:
            log(f"starting the service: serve run serve_config.yaml, app config {report.shown_path(args.config)}")
            own, root, _ = start_service(args.config)
            log(f"service ready at {root} ({time.monotonic() - t0:.0f} s)")
        key = service_key()
        requested = requested_models(args.model)
        listed = None if requested else listed_models(root, key)
        arms = [
            direct_arm(app_config, urlsplit(root).port, **direct_options),
            *service_arms(root, requested or listed, key),
        ]
        records = asyncio.run(_ask_all(arms, problems, args.concurrency))
    finally:
        if own is not None:
            log("stopping the service")
            own.stop()

    results = _results(
        args,
        argv,
        problems,
        app_config,
        arms,
        records,
        machine,
        started,
        time.monotonic() - t0,
        {
            "root": root,
            "started_by_harness": own is not None,
            "port": urlsplit(root).port,
            "listed_models": listed,
            "log": report.shown_path(own.log) if own else None,
        },
    )
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    results["json_path"] = str(args.out / f"{stamp}.json")
    plot_path = args.out / report.PLOT_NAME
    results["plot_path"] = str(plot_path) if report.plot(results, plot_path) else None
    if results["plot_path"] is None:
        log("matplotlib is not installed (pip install -e '.[bench]'): no plot")
    section = report.markdown(results)
    results["markdown"] = section
    report.write_json(results, Path(results["json_path"]))
    if not args.no_append:
        report.append_section(section)
        log(f"appended to {report.shown_path(report.BENCHMARKS)}")
    print("\n".join(report.summary_table(results)))
    log(f"results: {report.shown_path(results['json_path'])}; plot: {report.shown_path(results['plot_path'])}")
    return results


async def _ask_all(arms: list[Arm], problems: list[Problem], concurrency: int) -> list[dict[str, Any]]:
    """Arm after arm, so each arm's latency is measured without the others' load."""
    progress = Progress(len(arms) * len(problems), "quality")
    records = []
    try:
        for arm in arms:
            records += await ask_arm(arm, problems, concurrency, progress)
    finally:
        progress.close()
    return records


def _results(
    args: argparse.Namespace,
    argv: list[str],
    problems: list[Problem],
    app_config: dict[str, Any],
    arms: list[Arm],
    records: list[dict[str, Any]],
    machine: dict[str, Any],
    started: datetime,
    wall_s: float,
    service: dict[str, Any],
) -> dict[str, Any]:
    return {
        "started": started.isoformat(timespec="seconds"),
        "wall_s": round(wall_s, 1),
        "command": " ".join([_python(), "-m", "bench.quality", *map(shlex.quote, argv)]),
        "options": {"n": args.n, "seed": args.seed, "levels": list(args.levels), "concurrency": args.concurrency},
        "config_path": report.shown_path(args.config),
        "config": app_config,
        "thinker_model": arms[0].model,
        "service": service,
        "machine": machine,
        "arms": [arm.public() for arm in arms],
        "summaries": {arm.name: summarize_arm([r for r in records if r["arm"] == arm.name]) for arm in arms},
        "problems": [p.as_dict() for p in problems],
        "records": records,
    }


def _python() -> str:
    """The interpreter as typed from the repo (.venv/bin/python), not its resolved symlink."""
    executable = Path(sys.executable)
    return str(executable.relative_to(ROOT)) if executable.is_relative_to(ROOT) else str(executable)
