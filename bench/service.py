"""The system under test: bench configs, the simulated upstream and `serve run`, as subprocesses.

Everything here is derived from the repo's own files (serve_config.yaml for the Serve side, the
README's config schema for the app side) so the benchmark measures the shipped shape.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from tests.support import answers_ok, free_port, ray_env, shipped_serve_config, sim_config_dict

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
WORK = ROOT / "bench" / "work"  # generated configs and logs (git-ignored)


# --- configs -----------------------------------------------------------------------------------


# The profile every load level runs: the original's behaviour (no economy mechanism), so every
# request makes every call of the original's shape.
MODEL = "token-killer-classic"
# The simulated upstream's replies: critics raise counterexamples, voters keep every step, so
# validation takes its full path (counterexamples, then votes) and no step is redone.
SCENARIO = "challenged-pass"


def app_config(base_url: str) -> dict[str, Any]:
    """The original pipeline shape, every role on the simulated upstream: 3 threads × 2 steps,
    3 counterexamples + 3 voters (pass threshold 2), LLM fusion."""
    config = sim_config_dict(
        base_url,
        thinking={"num_threads": 3, "max_steps": 2},
        validation={"num_counterexamples": 3, "num_voters": 3, "pass_threshold": 2, "on_fail": "revise"},
        upstream={"max_attempts": 3, "backoff_initial_s": 0.2, "backoff_max_s": 5, "max_connections": 0},
        limits={"max_in_flight": 1100, "deadline_s": 600},
    )
    for model in config["models"].values():
        model["timeout_s"] = 30
    return config


def calls_per_request(app: dict[str, Any]) -> int:
    """threads × steps × (1 thinker + counterexamples + voters) + 1 fuser (no summary below 4 steps),
    for the classic profile, which asks every call separately."""
    t, v = app["thinking"], app["validation"]
    per_step = 1 + (v["num_counterexamples"] + v["num_voters"] if v.get("enabled", True) else 0)
    return t["num_threads"] * t["max_steps"] * per_step + (
        app.get("fusion", {}).get("strategy", "intelligent") == "intelligent"
    )


def critical_path(app: dict[str, Any], latency: float) -> float:
    """Minimum wall time of one request when every upstream call takes `latency` seconds.

    Threads run in parallel, so one thread's path is the request's. With speculation
    (actors/thinking.py) each written step starts its own validation and the next step at once,
    so validations overlap the following steps' thinking and only the LAST step's validation is
    on the path:

        steps × thinker  +  validation (counterexamples ∥, THEN voters ∥: 2 calls deep)  +  fuser
        = (2 + 2 + 1) × 0.2 s = 1.0 s   for the bench shape

    (Smart context summarises middle steps only from the 4th step on: no summarizer call here.)
    """
    steps = app["thinking"]["max_steps"]
    validation = 2 if app["validation"].get("enabled", True) else 0
    fusion = 1 if app.get("fusion", {}).get("strategy", "intelligent") == "intelligent" else 0
    return (steps + validation + fusion) * latency


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# --- processes ---------------------------------------------------------------------------------


def _wait_ready(url: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not answers_ok(url):
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited early; end of {log}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} not ready after {timeout:.0f} s; see {log}")
        time.sleep(0.5)


class Proc:
    """A subprocess in a session of its own; `stop()` ends its whole process group."""

    def __init__(
        self, args: list[str], log: Path, env: dict[str, str] | None = None, scratch: Path | None = None
    ) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log = log
        self.scratch = scratch  # a directory of the process's files, removed by stop()
        self._log_file = open(log, "w")
        self.popen = subprocess.Popen(
            args,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pid = self.popen.pid

    def stop(self, grace: float = 60.0) -> None:
        """SIGINT to the leader (`serve run` then shuts Serve and its Ray instance down), then
        SIGKILL whatever of its session is left (Ray workers run in process groups of their own)."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        for pid in session_pids(self.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()
        self._log_file.close()
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)


def session_pids(sid: int) -> list[int]:
    """Every live process of session `sid` (what a start_new_session subprocess started)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def start_upstream(
    port: int,
    latency: float,
    token_interval: float = 0.0,
    scenario: str | None = None,
    prefix_cache: bool = False,
    supports_n: bool = True,
    faults: dict[str, float] | None = None,
) -> Proc:
    """The simulated upstream's CLI; `scenario` names role-aware replies (tests/scenarios.py),
    None keeps "Simulated answer." for every call."""
    args = [sys.executable, "-m", "tests.simulated_upstream", "--port", str(port), "--latency", str(latency)]
    if token_interval:
        args += ["--token-interval", str(token_interval)]
    if scenario is not None:
        args += ["--scenario", scenario]
    if prefix_cache:
        args.append("--prefix-cache")
    if not supports_n:
        args.append("--no-n")
    for kind, rate in (faults or {}).items():
        args += ["--fault", f"{kind}={rate}"]
    proc = Proc(args, WORK / f"upstream-{port}.log")
    _wait_ready(f"http://127.0.0.1:{port}/v1/models", proc.popen, proc.log, 30)
    return proc


def start_serve(
    serve_yaml: Path,
    app_yaml: Path | None,
    port: int,
    timeout: float = 240.0,
    check_local: bool = False,
    haproxy: bool = True,
    ready_path: str = "/v1/models",
) -> Proc:
    """`serve run` in a Ray instance of its own, with ray.env as `make run` starts it (HTTP
    through HAProxy); `haproxy=False`: plain `serve run`, HTTP through Serve's Python proxy."""
    env = {"RAY_ADDRESS": "local", "RAY_USAGE_STATS_ENABLED": "0"}
    haproxy_files = None
    if haproxy:
        ray_settings, haproxy_files = ray_env()
        env.update(ray_settings)
    if app_yaml is not None:
        env["TOKEN_KILLER_CONFIG"] = str(app_yaml)
    proc = Proc([str(BIN / "serve"), "run", str(serve_yaml)], WORK / f"serve-{port}.log", env, haproxy_files)
    try:
        _wait_ready(f"http://127.0.0.1:{port}{ready_path}", proc.popen, proc.log, timeout)
        if check_local:
            _wait_ready(f"http://127.0.0.1:{port}/local/v1/models", proc.popen, proc.log, timeout)
    except BaseException:
        proc.stop()
        raise
    return proc


# Roles of the shipped configs reach the embedded model through the service's own port 8000.
_LOCAL_8000 = re.compile(r"(127\.0\.0\.1|localhost):8000\b")


def start_service(app_config_path: Path, timeout: float = 240.0) -> tuple[Proc, str, Path]:
    """`serve run` of the shipped serve_config.yaml on a free port, with an app config whose
    roles, where they call the embedded model at :8000, call it at that port instead. Returns
    the process, the service's root URL and the app config it runs."""
    port = free_port()
    text = app_config_path.read_text()
    # The `local` app (the embedded model) is needed only when some role calls it.
    embedded = any("/local/" in url for url in _base_urls(yaml.safe_load(text)))
    app_yaml = WORK / f"app-{port}.yaml"
    app_yaml.parent.mkdir(parents=True, exist_ok=True)
    app_yaml.write_text(_LOCAL_8000.sub(lambda m: f"{m[1]}:{port}", text))
    serve_yaml = write_yaml(WORK / f"serve-{port}.yaml", shipped_serve_config(port, embedded=embedded))
    proc = start_serve(serve_yaml, app_yaml, port, timeout=timeout, check_local=embedded)
    return proc, f"http://127.0.0.1:{port}", app_yaml


def _base_urls(node: Any) -> list[str]:
    """Every `base_url` of a config, at any depth (roles, fallbacks, profiles)."""
    if isinstance(node, dict):
        own = [node["base_url"]] if isinstance(node.get("base_url"), str) else []
        return own + [url for value in node.values() for url in _base_urls(value)]
    if isinstance(node, list):
        return [url for value in node for url in _base_urls(value)]
    return []
