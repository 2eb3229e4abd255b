"""Token Killer benchmark: one command, everything started and stopped by itself.

    .venv/bin/python -m bench.run                 # full run: bench/results/latest.json + BENCHMARKS.md
    .venv/bin/python -m bench.run --quick         # short dev run: bench/results/quick/
    .venv/bin/python -m bench.run --scenarios levels --levels 1,64 --profile
    .venv/bin/python -m bench.run --embedded      # also time one request on the real serve_config.yaml
    .venv/bin/python -m bench.run --scenarios burst --override Ingress.max_queued_requests=1000
                                                  # experiment: bench/results/experiments/...
    .venv/bin/python -m bench.run --scenarios levels --levels 64 --python-proxy   # without ray.env
    .venv/bin/python -m bench.report bench/results/latest.json BENCHMARKS.md   # re-render only

Scenarios: `levels` (closed-loop load at each concurrency, non-stream then stream, upstream
latency 0.2 s), `faults` (200 requests at concurrency 16, non-stream then stream, on an upstream
that fails 18% of its calls), `burst` (upstream restarted at 2.0 s latency, N requests fired at once, then
replicas watched while they scale back down). `--profile` adds a py-spy run of the Ingress,
Thinker and Validator replicas under concurrency-64 load (a separate phase: py-spy's sampling
would otherwise disturb the measured levels).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import yaml

from bench import report
from bench.procs import (
    Sampler,
    autoscaling_decisions,
    ray_log_dir,
    request_log,
    thread_cpu,
)
from bench.service import (
    BIN,
    MODEL,
    ROOT,
    SCENARIO,
    WORK,
    app_config,
    calls_per_request,
    critical_path,
    start_serve,
    start_service,
    start_upstream,
    write_yaml,
)
from tests.support import FAULT_MIX, free_port, shipped_serve_config

LATENCY_S = 0.2
BURST_LATENCY_S = 2.0
FAULT_REQUESTS, FAULT_CONCURRENCY = 200, 16


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def pytest_running() -> bool:
    return subprocess.run(["pgrep", "-f", "pytest"], capture_output=True, check=False).returncode == 0


def wait_for_quiet_machine(skip: bool) -> None:
    """The test suite shares this machine: measure only when it is not running."""
    if skip:
        return
    waited = 0
    while pytest_running():
        if waited % 60 == 0:
            log("pytest is running; waiting for it to finish before measuring")
        time.sleep(5)
        waited += 5


def run_load(
    url: str,
    concurrency: int,
    *,
    stream: bool = False,
    duration: float | None = None,
    requests: int | None = None,
    model: str = MODEL,
) -> dict:
    args = [sys.executable, "-m", "bench.load", "--url", url, "--concurrency", str(concurrency), "--model", model]
    args += ["--stream"] if stream else []
    args += ["--duration", str(duration)] if duration else []
    args += ["--requests", str(requests)] if requests else []
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.results: dict = {"phases": []}
        self.upstream = self.serve = self.sampler = None
        self.up_port = free_port()
        self.http_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"

    # --- phases ------------------------------------------------------------------------------

    def phase(self, name: str, fn, *args, **kwargs):
        """Run fn between two sampler marks; returns (fn's result, resources used)."""
        self.results["phases"].append({"name": name, "start_s": round(time.time() - self.sampler.t0, 2)})
        pytest_before = pytest_running()
        started = time.time()
        self.sampler.mark(name + ":start")
        result = fn(*args, **kwargs)
        self.sampler.mark(name + ":end")
        self.results["phases"][-1]["end_s"] = round(time.time() - self.sampler.t0, 2)
        used = self.sampler.between(name + ":start", name + ":end")
        used["pytest_running"] = pytest_before or pytest_running()
        # The service's own timing of the same requests (its `request_complete` log lines).
        used["service_log"] = request_log(self.serve.log, started, time.time())
        return result, used

    def start(self) -> None:
        app = app_config(f"http://127.0.0.1:{self.up_port}/v1")
        serve = shipped_serve_config(self.http_port)
        for override in self.args.override:  # experiments only: "Deployment.key=value"
            target, _, value = override.partition("=")
            deployment, _, key = target.partition(".")
            app_entry = next(a for a in serve["applications"] if a["name"] == "token-killer")
            next(d for d in app_entry["deployments"] if d["name"] == deployment)[key] = yaml.safe_load(value)
        self.results["config"] = {
            "app": app,
            "serve": serve,
            "upstream_latency_s": LATENCY_S,
            "burst_upstream_latency_s": BURST_LATENCY_S,
            "calls_per_request": calls_per_request(app),
            "model": MODEL,
            "scenario": SCENARIO,
            "critical_path_s": critical_path(app, LATENCY_S),
            "burst_critical_path_s": critical_path(app, BURST_LATENCY_S),
            "serve_overrides": self.args.override,
            "haproxy": not self.args.python_proxy,
        }
        log(f"simulated upstream on :{self.up_port} (latency {LATENCY_S} s)")
        self.upstream = start_upstream(self.up_port, LATENCY_S, scenario=SCENARIO)
        app_yaml = write_yaml(WORK / "bench_app.yaml", app)
        serve_yaml = write_yaml(WORK / "bench_serve.yaml", serve)
        log(f"serve run {serve_yaml.relative_to(ROOT)} on :{self.http_port}")
        started = time.monotonic()
        self.serve = start_serve(serve_yaml, app_yaml, self.http_port, haproxy=not self.args.python_proxy)
        self.results["startup_s"] = round(time.monotonic() - started, 2)
        log(f"service ready in {self.results['startup_s']} s")
        self.sampler = Sampler(self.serve.pid, self.upstream.pid).start()
        self.log_dir = ray_log_dir(self.serve.pid)
        log("warm-up, then idle baseline")
        run_load(self.url, 4, requests=8)
        run_load(self.url, 4, requests=8, stream=True)
        wait_for_quiet_machine(self.args.ignore_pytest)
        _, self.results["idle_baseline"] = self.phase("idle", time.sleep, self.args.idle)

    def stop(self) -> None:
        if self.sampler is not None:
            self.sampler.stop()
            self.results["timeline"] = self.sampler.timeline
            self.results["autoscaling_decisions"] = autoscaling_decisions(self.log_dir, self.sampler.t0)
        for proc in (self.serve, self.upstream):
            if proc is not None:
                proc.stop()
        self.serve = self.upstream = None

    def levels(self) -> None:
        a = self.args
        self.results["levels"] = []
        for concurrency in a.levels:
            for stream in (False, True):
                time.sleep(2)
                wait_for_quiet_machine(a.ignore_pytest)
                name = f"c{concurrency}{'-stream' if stream else ''}"
                load, used = self.phase(name, run_load, self.url, concurrency, stream=stream, duration=a.duration)
                entry = self._entry(name, load, used)
                s = entry["summary"]
                log(
                    f"{name}: {s['requests']} req, p50 {s['p50_s']} s, p90 {s['p90_s']} s, {s['req_per_s']} req/s, "
                    f"errors {s['errors']}, {s['ray_cpu_ms_per_call']} ms CPU/call"
                )
                self.results["levels"].append(entry)

    def profile(self) -> None:
        """py-spy on the busiest replicas under concurrency-64 load (not a measured phase)."""
        out = self.args.out / "profile"
        out.mkdir(parents=True, exist_ok=True)
        targets = {d: self.sampler.pids_of(d)[:1] for d in ("Ingress", "Thinker", "Validator")}
        seconds = max(5, int(self.args.duration * 0.75))
        spies = {
            d: subprocess.Popen(
                [
                    str(BIN / "py-spy"),
                    "record",
                    "--nonblocking",
                    "--gil",
                    "--format",
                    "raw",
                    "--rate",
                    "100",
                    "--duration",
                    str(seconds),
                    "--pid",
                    str(pids[0]),
                    "--output",
                    str(out / f"{d}.txt"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for d, pids in targets.items()
            if pids
        }
        log(f"profiling {', '.join(spies)} for {seconds} s under concurrency 64")
        threads_before = {d: thread_cpu(pids[0]) for d, pids in targets.items() if pids}
        _, used = self.phase("profile", run_load, self.url, 64, duration=self.args.duration)
        threads = {}
        for d, before in threads_before.items():
            after = thread_cpu(targets[d][0])
            threads[d] = {
                k: round(v - before.get(k, 0.0), 3)
                for k, v in sorted(after.items(), key=lambda kv: before.get(kv[0], 0.0) - kv[1])
            }
        for spy in spies.values():
            spy.wait(timeout=120)
        self.results["profile"] = {
            "seconds": seconds,
            "resources": used,
            "thread_cpu_s": threads,
            "summary": {d: report.summarize_profile(out / f"{d}.txt") for d in spies},
        }

    def _entry(self, name: str, load: dict, used: dict, **extra) -> dict:
        """One measured load: its records, the resources it used, and their summary."""
        entry = {
            "name": name,
            "concurrency": load["concurrency"],
            "stream": load["stream"],
            "wall_s": load["wall_s"],
            "resources": used,
            "records": load["records"],
            **extra,
        }
        entry["summary"] = report.summarize(entry, self.results["idle_baseline"]["ray_cores_busy"])
        return entry

    def faults(self) -> None:
        log(f"restarting the simulated upstream with faults {FAULT_MIX}")
        self._restart_upstream(LATENCY_S, faults=FAULT_MIX)
        self.results["faults"] = []
        for stream in (False, True):
            name = f"faults{'-stream' if stream else ''}"
            load, used = self.phase(name, run_load, self.url, FAULT_CONCURRENCY, stream=stream, requests=FAULT_REQUESTS)
            entry = self._entry(name, load, used, fault_rates=FAULT_MIX)
            s = entry["summary"]
            log(f"{name}: {s['ok']} of {s['requests']} answered, p50 {s['p50_s']} s, max {s['max_s']} s")
            self.results["faults"].append(entry)
        # What the upstream served over both runs: every call and the faults among them.
        with urllib.request.urlopen(f"http://127.0.0.1:{self.up_port}/stats", timeout=10) as reply:
            self.results["faults_upstream"] = json.loads(reply.read())
        self._restart_upstream(LATENCY_S)

    def _restart_upstream(self, latency: float, faults: dict[str, float] | None = None) -> None:
        self.upstream.stop()
        self.upstream = start_upstream(self.up_port, latency, scenario=SCENARIO, faults=faults)
        self.sampler.set_upstream(self.upstream.pid)

    def burst(self) -> None:
        a = self.args
        log(f"restarting the simulated upstream with latency {BURST_LATENCY_S} s")
        self._restart_upstream(BURST_LATENCY_S)
        # Start from the minimum replica counts, as a burst on an idle service would (and so the
        # fall after the levels' peak is on record too).
        _, settle = self.phase("settle", self._wait_for_min_replicas, a.settle)
        wait_for_quiet_machine(a.ignore_pytest)
        log(f"burst: {a.burst} requests at once")
        load, used = self.phase("burst", run_load, self.url, a.burst, requests=a.burst)
        entry = self._entry("burst", load, used, settle=settle)
        s = entry["summary"]
        log(
            f"burst: {s['requests']} req, errors {s['errors']}, p50 {s['p50_s']} s, max {s['max_s']} s, "
            f"peak Ray RSS {used['peak_ray_rss_mb']} MB"
        )
        log(f"watching replicas for {a.observe} s after the burst")
        _, entry["after"] = self.phase("after-burst", time.sleep, a.observe)
        self.results["burst"] = entry

    def _wait_for_min_replicas(self, limit: float) -> float:
        started = time.monotonic()
        while time.monotonic() - started < limit:
            last = self.sampler.timeline[-1]["replicas"]
            if last["Thinker"] <= 1 and last["Validator"] <= 1:
                break
            time.sleep(1)
        return round(time.monotonic() - started, 1)

    def embedded(self) -> None:
        """The shipped serve_config.yaml (with the `local` app) on a free port: one request."""
        wait_for_quiet_machine(self.args.ignore_pytest)
        log("embedded default: serve run on a free port")
        started = time.monotonic()
        proc, url, _ = start_service(ROOT / "configs" / "default.yaml", timeout=300)
        try:
            ready = time.monotonic() - started
            runs = [
                run_load(url, 1, requests=1, stream=stream, model="token-killer")["records"][0]
                for stream in (False, True)
            ]
        finally:
            proc.stop()
        self.results["embedded"] = {"startup_s": round(ready, 1), "non_stream": runs[0], "stream": runs[1]}
        log(f"embedded: ready in {ready:.1f} s, one request {runs[0]['latency']} s (stream {runs[1]['latency']} s)")


def machine_info() -> dict:
    from bench.procs import psutil

    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
        model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    # Others edit the service while benchmarks run: record what the measured tree differed in.
    dirty = subprocess.run(
        ["git", "diff", "--stat", "HEAD", "--", "actors", "deployments", "serve_config.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    import ray

    return {
        "cpu": model,
        "cores": psutil.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "ray": ray.__version__,
        "git_commit": commit.stdout.strip(),
        "service_code_modified": bool(dirty.stdout.strip()),
        "service_diff_stat": dirty.stdout.strip().splitlines(),
        "load_before_start": os.getloadavg(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short dev run (results in bench/results/quick/)")
    p.add_argument("--scenarios", default="levels,faults,burst", help="comma-separated: levels, faults, burst")
    p.add_argument("--levels", default=None, help="concurrency levels (default 1,4,16,64; quick 1,8)")
    p.add_argument("--duration", type=float, default=None, help="seconds per level (default 20; quick 4)")
    p.add_argument("--burst", type=int, default=None, help="requests fired at once (default 1000; quick 200)")
    p.add_argument("--observe", type=float, default=None, help="seconds of replica watching after the burst")
    p.add_argument("--settle", type=float, default=None, help="max seconds to wait for min replicas before the burst")
    p.add_argument("--idle", type=float, default=5.0, help="seconds of idle baseline measurement")
    p.add_argument("--profile", action="store_true", help="py-spy the replicas under concurrency-64 load")
    p.add_argument("--embedded", action="store_true", help="also time one request on the embedded default")
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="DEPLOYMENT.KEY=VALUE",
        help="experiment: change one deployment option of serve_config.yaml (repeatable)",
    )
    p.add_argument(
        "--python-proxy", action="store_true", help="experiment: `serve run` without ray.env (Serve's Python proxy)"
    )
    p.add_argument("--ignore-pytest", action="store_true", help="do not wait for a running pytest")
    p.add_argument("--out", type=Path, default=None, help="results directory")
    p.add_argument(
        "--markdown",
        type=Path,
        default=None,
        help="report path (default: BENCHMARKS.md for a full run, else report.md in --out)",
    )
    a = p.parse_args(argv)
    q = a.quick
    a.scenarios = [s for s in a.scenarios.split(",") if s]
    a.levels = [int(x) for x in (a.levels or ("1,8" if q else "1,4,16,64")).split(",")]
    a.duration = a.duration or (4.0 if q else 20.0)
    a.burst = a.burst or (200 if q else 1000)
    a.observe = a.observe if a.observe is not None else (15.0 if q else 75.0)
    a.settle = a.settle if a.settle is not None else (20.0 if q else 90.0)
    # BENCHMARKS.md is written only by a full, unmodified run into bench/results/ (the default);
    # quick runs, experiments (--override) and other --out directories get a report.md beside their JSON.
    official = not q and a.out is None and not a.override and not a.python_proxy
    results = ROOT / "bench" / "results"
    if a.out is None and (a.override or a.python_proxy):  # e.g. bench/results/experiments/python-proxy
        names = (["python-proxy"] if a.python_proxy else []) + [o.replace("/", "_") for o in a.override]
        a.out = results / "experiments" / "+".join(names)
    a.out = (a.out or results / ("quick" if q else "")).resolve()
    a.markdown = (a.markdown or (ROOT / "BENCHMARKS.md" if official else a.out / "report.md")).resolve()
    return a


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Run in the background, this process (and so `serve run`) would inherit SIGINT ignored, and
    # stopping the service would wait out the grace period: children get the default again.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    args.out.mkdir(parents=True, exist_ok=True)
    wait_for_quiet_machine(args.ignore_pytest)
    bench = Bench(args)
    bench.results["meta"] = {
        "command": " ".join([".venv/bin/python -m bench.run", *sys.argv[1:]]),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "scenarios": args.scenarios,
        "duration_per_level_s": args.duration,
        "machine": machine_info(),
    }
    try:
        if {"levels", "faults", "burst"} & set(args.scenarios) or args.profile:
            bench.start()
            if "levels" in args.scenarios:
                bench.levels()
            if args.profile:
                bench.profile()
            if "faults" in args.scenarios:
                bench.faults()
            if "burst" in args.scenarios:
                bench.burst()
    finally:
        bench.stop()
    if args.embedded:
        bench.embedded()
    bench.results["meta"]["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    path = report.write(bench.results, args.out, args.markdown)
    log(f"wrote {path.relative_to(ROOT)}, {args.markdown.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
