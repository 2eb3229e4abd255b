"""CPU time and memory of every Ray process (and of the simulated upstream), sampled in a thread.

Ray processes are found as the session of the `serve run` process (started with
start_new_session=True): gcs_server, raylet, dashboard and its agents, the Serve controller and
proxy, every replica worker, idle workers. Each is classified by its process title. A process's
last CPU reading is kept after it exits, so a replica that is scaled down mid-phase still counts.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import statistics
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

try:
    import psutil
except ImportError:  # Ray vendors psutil; use its copy rather than add a dependency
    sys.path.append(os.path.join(os.path.dirname(importlib.util.find_spec("ray").origin), "thirdparty_files"))
    import psutil

from bench.service import session_pids

DEPLOYMENTS = ("Ingress", "Thinker", "Validator", "Fuser", "LocalLLM")
_REPLICA = re.compile(r"ray::ServeReplica:[^:]+:(\w+)")


def classify(cmdline: list[str]) -> str:
    text = " ".join(cmdline)
    if m := _REPLICA.search(text):
        return m.group(1)
    for needle, name in (
        ("ray::ServeController", "controller"),
        ("ray::ProxyActor", "proxy"),
        ("ray::HAProxyManager", "haproxy"),  # through HAProxy: the manager actor and the binary
        ("bin/haproxy", "haproxy"),
        ("gcs_server", "gcs_server"),
        ("raylet/raylet", "raylet"),
        ("ray::DashboardAgent", "dashboard"),
        ("ray::RuntimeEnvAgent", "runtime_env_agent"),
        ("dashboard", "dashboard"),  # dashboard.py, its forkserver and ray-dashboard-*Head modules
        ("serve run", "serve_run_driver"),
        ("monitor.py", "monitors"),  # autoscaler monitor, log_monitor
        ("ray::IDLE", "idle_worker"),
    ):
        if needle in text:
            return name
    return "other"


class Sampler:
    """Samples every `interval` s: per-process CPU seconds (kept after exit), RSS, replica counts."""

    def __init__(self, ray_sid: int, upstream_pid: int | None, interval: float = 0.5) -> None:
        self.ray_sid = ray_sid
        self.upstream_pid = upstream_pid
        self.interval = interval
        self.cpu: dict[int, float] = {}  # pid -> latest CPU seconds (user + system)
        self.category: dict[int, str] = {}
        self.timeline: list[dict] = []  # {t, rss_mb, [pss_mb], replicas: {deployment: n}}
        self.marks: dict[str, dict] = {}
        self._procs: dict[int, psutil.Process] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self.t0 = time.time()

    def start(self) -> Sampler:
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def set_upstream(self, pid: int) -> None:
        with self._lock:
            self.upstream_pid = pid

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        with self._lock:
            pids = set(session_pids(self.ray_sid))
            if self.upstream_pid is not None:
                pids.add(self.upstream_pid)
            rss = pss = 0
            rss_by: dict[str, float] = {}
            # PSS (shared pages split between the processes sharing them) is dearer to read: every 2 s.
            with_pss = len(self.timeline) % 4 == 0
            replicas = dict.fromkeys(DEPLOYMENTS, 0)
            for pid in pids:
                try:
                    proc = self._procs.get(pid) or self._procs.setdefault(pid, psutil.Process(pid))
                    with proc.oneshot():
                        times = proc.cpu_times()
                        mem = proc.memory_info().rss
                        shared = proc.memory_full_info().pss if with_pss else 0
                        # Workers change title when they become actors; re-read until settled.
                        if self.category.get(pid) in (None, "idle_worker", "other"):
                            name = classify(proc.cmdline())
                            self.category[pid] = "upstream" if pid == self.upstream_pid else name
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                self.cpu[pid] = times.user + times.system
                if self.category[pid] != "upstream":
                    rss += mem
                    pss += shared
                    rss_by[self.category[pid]] = rss_by.get(self.category[pid], 0) + mem
                    if self.category[pid] in replicas:
                        replicas[self.category[pid]] += 1
            sample = {"t": round(time.time() - self.t0, 2), "rss_mb": round(rss / 2**20, 1), "replicas": replicas}
            if with_pss:  # and RSS by process kind, to see who holds the memory
                sample["pss_mb"] = round(pss / 2**20, 1)
                sample["rss_mb_by_category"] = {k: round(v / 2**20) for k, v in sorted(rss_by.items())}
            self.timeline.append(sample)

    def mark(self, name: str) -> None:
        """Snapshot CPU per process and the machine's CPU times, at the start/end of a phase."""
        self.sample()
        with self._lock:
            self.marks[name] = {
                "t": time.time() - self.t0,
                "cpu": dict(self.cpu),
                "machine": psutil.cpu_times()._asdict(),
                "timeline_index": len(self.timeline),
            }

    def between(self, start: str, end: str) -> dict:
        """CPU seconds by category between two marks, peak RSS and replica counts seen."""
        a, b = self.marks[start], self.marks[end]
        by_category: dict[str, float] = {}
        new = 0.0  # CPU of processes started within the window (mostly new replicas starting up)
        for pid, seconds in b["cpu"].items():
            used = seconds - a["cpu"].get(pid, 0.0)
            category = self.category.get(pid, "other")
            by_category[category] = by_category.get(category, 0.0) + used
            if pid not in a["cpu"] and category != "upstream":
                new += used
        ray_s = sum(v for k, v in by_category.items() if k != "upstream")
        window = self.timeline[a["timeline_index"] - 1 : b["timeline_index"]]
        wall = b["t"] - a["t"]
        busy = _machine_busy(a["machine"], b["machine"])
        return {
            "wall_s": round(wall, 3),
            "ray_cpu_s": round(ray_s, 3),
            "upstream_cpu_s": round(by_category.get("upstream", 0.0), 3),
            "ray_cpu_of_new_processes_s": round(new, 3),
            "ray_cpu_by_category_s": {k: round(v, 3) for k, v in sorted(by_category.items()) if k != "upstream"},
            "ray_cores_busy": round(ray_s / wall, 3) if wall > 0 else None,
            "machine_cores_busy": busy,
            "peak_ray_rss_mb": max((s["rss_mb"] for s in window), default=None),
            "peak_ray_pss_mb": max((s["pss_mb"] for s in window if "pss_mb" in s), default=None),
            "rss_mb_by_category_at_peak": max(
                (s for s in window if "pss_mb" in s), key=lambda s: s["rss_mb"], default={}
            ).get("rss_mb_by_category"),
            "rss_mb_by_category_at_end": next(
                (s["rss_mb_by_category"] for s in reversed(window) if "pss_mb" in s), None
            ),
            "max_replicas": {d: max((s["replicas"][d] for s in window), default=0) for d in DEPLOYMENTS},
        }

    def pids_of(self, category: str) -> list[int]:
        with self._lock:
            live = set(session_pids(self.ray_sid))
            return [p for p, c in self.category.items() if c == category and p in live]


def _machine_busy(a: dict, b: dict) -> float:
    """Cores busy on the whole machine between two psutil.cpu_times() readings."""
    total = sum(b.values()) - sum(a.values())
    idle = (b["idle"] + b.get("iowait", 0)) - (a["idle"] + a.get("iowait", 0))
    cores = psutil.cpu_count() or 1
    return round(cores * (total - idle) / total, 3) if total > 0 else 0.0


_SCALE = re.compile(
    r"^\w+ (?P<ts>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+) .*?(?P<dir>Upscaling|Downscaling) "
    r"Deployment\(name='(?P<name>\w+)'.*?from (?P<old>\d+) to (?P<new>\d+) replicas"
)


def ray_log_dir(ray_sid: int) -> Path | None:
    """The Ray session's log directory, from the gcs_server command line."""
    for pid in session_pids(ray_sid):
        try:
            cmdline = psutil.Process(pid).cmdline()
        except psutil.Error:
            continue
        for arg in cmdline:
            if arg.startswith("--log_dir=") and "gcs_server" in " ".join(cmdline):
                return Path(arg.split("=", 1)[1])
    return None


def autoscaling_decisions(log_dir: Path | None, t0: float) -> list[dict]:
    """Serve's own up/downscaling decisions from the controller log (seconds since t0)."""
    if log_dir is None:
        return []
    events = []
    for path in sorted((log_dir / "serve").glob("controller_*.log")):
        for line in path.read_text(errors="replace").splitlines():
            if m := _SCALE.search(line):
                ts = datetime.strptime(m["ts"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                events.append(
                    {"t": round(ts - t0, 2), "deployment": m["name"], "from": int(m["old"]), "to": int(m["new"])}
                )
    return events


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds by thread name. Python threads keep the process's name (the Ray worker title,
    cut to 15 characters); Ray's C++ threads (gRPC, core worker io) have names of their own."""
    by_name: dict[str, float] = {}
    try:
        for t in psutil.Process(pid).threads():
            try:
                name = Path(f"/proc/{pid}/task/{t.id}/comm").read_text().strip()
            except OSError:
                continue
            by_name[name] = by_name.get(name, 0.0) + t.user_time + t.system_time
    except psutil.Error:
        pass
    return by_name


def request_log(path: Path, start: float, end: float) -> dict:
    """Medians of the service's own `request_complete` lines (epoch window [start, end])."""
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        if '"request_complete"' not in line:
            continue
        try:
            event = json.loads(line[line.index("{") :])
            ts = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()
        except (ValueError, KeyError):
            continue
        if start <= ts <= end and event.get("outcome") == "ok":
            rows.append(event)
    if not rows:
        return {}
    return {
        "n": len(rows),
        **{k: round(statistics.median(r[k] for r in rows), 3) for k in ("elapsed_s", "thinking_s", "fusion_s")},
    }
