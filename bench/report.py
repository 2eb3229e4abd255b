"""Summaries, targets, and the outputs: latest.json (everything raw), BENCHMARKS.md, the PNG plot."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ANALYSIS = Path(__file__).resolve().parent / "analysis.md"  # hand-written findings, included verbatim
SECTION = "## Load, CPU and memory"


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (q in 0..100)."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)


def summarize(entry: dict, idle_cores: float | None = None) -> dict:
    """Latency percentiles of successful requests, errors by kind, throughput, CPU per call.

    `idle_cores`: Ray's CPU use with no load (controller, dashboard, GCS loops); given, the CPU
    per call is also reported with that baseline taken out (`..._net`).
    """
    records = entry["records"]
    ok = [r for r in records if r["status"] == 200 and not r["error"]]
    errors = Counter(
        f"{r['status']}:{r['error']}" if r["status"] else str(r["error"])
        for r in records
        if not (r["status"] == 200 and not r["error"])
    )
    lat = [r["latency"] for r in ok]
    calls = sum(r.get("calls", 0) for r in ok)
    res = entry.get("resources") or {}
    summary = {
        "requests": len(records),
        "status_200": sum(1 for r in records if r["status"] == 200),  # a stream may still end in an error
        "ok": len(ok),
        "errors": sum(errors.values()),
        "errors_by_kind": dict(errors),
        "p50_s": _r(percentile(lat, 50)),
        "p90_s": _r(percentile(lat, 90)),
        "p99_s": _r(percentile(lat, 99)),
        "min_s": _r(min(lat, default=None)),
        "max_s": _r(max(lat, default=None)),
        "req_per_s": _r(len(ok) / entry["wall_s"], 2) if entry["wall_s"] else None,
        "upstream_calls": calls,
        "calls_per_request": _r(calls / len(ok), 2) if ok else None,
        # Threads a successful answer was fused from (fewer than configured: some were lost).
        "threads_kept": dict(sorted(Counter(r.get("threads_kept") for r in ok).items(), key=lambda kv: str(kv[0]))),
        "steps_validated_mean": _r(sum(r.get("steps_validated") or 0 for r in ok) / len(ok), 2) if ok else None,
        "ray_cpu_ms_per_call": _r(1000 * res["ray_cpu_s"] / calls, 3) if calls and res else None,
        "ray_cpu_ms_per_request": _r(1000 * res["ray_cpu_s"] / len(ok), 1) if ok and res else None,
        "ray_cpu_ms_per_call_net": _r(1000 * (res["ray_cpu_s"] - idle_cores * res["wall_s"]) / calls, 3)
        if calls and res and idle_cores is not None
        else None,
        "upstream_cpu_ms_per_call": _r(1000 * res["upstream_cpu_s"] / calls, 3) if calls and res else None,
    }
    if entry.get("stream"):
        for key in ("ttfb", "t_reasoning", "ttfc"):
            values = [r[key] for r in ok if key in r]
            summary[f"{key}_p50_s"] = _r(percentile(values, 50))
            summary[f"{key}_p90_s"] = _r(percentile(values, 90))
    return summary


def summarize_profile(path: Path, top: int = 10) -> dict:
    """py-spy raw (collapsed) stacks -> share of GIL-holding samples by package and by function.

    `self`: the innermost frame (where the time is spent); `inclusive`: any frame on the stack
    (what the time is spent for), leaving out the generic frames every stack goes through.
    """
    if not path.exists():
        return {"error": "no profile written"}
    by_package: Counter = Counter()
    by_self: Counter = Counter()
    inclusive: Counter = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f for f in stack.split(";") if f]
        if not frames:
            continue
        by_package[_package(frames[-1])] += n
        by_self[_frame(frames[-1])] += n
        for name in {_frame(f) for f in frames if _package(f) not in _GENERIC}:
            inclusive[name] += n

    def share(counter: Counter) -> list:
        return [(k, round(100 * v / total, 1)) for k, v in counter.most_common(top)]

    return {
        "samples": total,
        "self_by_package_pct": share(by_package),
        "self_pct": share(by_self),
        "inclusive_pct": share(inclusive),
    }


_GENERIC = {
    "threading",
    "asyncio",
    "concurrent",
    "ray/_private/worker.py",
    "ray/serve/_private/replica.py",
    "ray/_private/workers",
    "contextlib",
}


def _frame(frame: str) -> str:
    """'func (path/to/file.py:123)' -> 'func (file.py)'."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit('/', 1)[-1].split(':')[0]})" if where else name


def _package(frame: str) -> str:
    """Top-level package of a frame's file (ray split one or two levels further: it is big)."""
    parts = frame.partition(" (")[2].split(":")[0].split("/")
    if parts[0] == "ray":
        return "/".join(parts[:3]) if len(parts) > 2 and parts[1] in ("serve", "_private") else "/".join(parts[:2])
    if parts[0] in ("actors", "deployments"):
        return f"{parts[0]} (ours)"
    return parts[0].removesuffix(".py") or "?"


# --- targets -----------------------------------------------------------------------------------


def _level(results: dict, concurrency: int, stream: bool) -> dict | None:
    return next(
        (lv for lv in results.get("levels", []) if lv["concurrency"] == concurrency and lv["stream"] == stream), None
    )


REPLICA_KINDS = ("Ingress", "Thinker", "Validator", "Fuser")


def targets(results: dict) -> list[dict]:
    """Each target with its measured figure, the ratio to the bound, and whether it is met."""
    cfg = results.get("config", {})
    cp = cfg.get("critical_path_s")
    rows = []

    def row(name, bound, measured, unit, lower_is_better=True, note=""):
        if measured is None:
            rows.append(
                {
                    "target": name,
                    "bound": bound,
                    "measured": None,
                    "unit": unit,
                    "met": None,
                    "ratio": None,
                    "miss": "not run",
                    "note": note,
                }
            )
            return
        met = measured <= bound if lower_is_better else measured >= bound
        ratio = measured / bound if bound else None
        if met:
            miss = ""
        elif ratio is None:  # a bound of 0 (errors): the count is the miss
            miss = f"{measured} {unit}"
        else:
            miss = f"{measured - bound:+.3g} {unit} ({100 * (ratio - 1):+.0f}%)"
        rows.append(
            {
                "target": name,
                "bound": round(bound, 3),
                "measured": measured,
                "unit": unit,
                "met": met,
                "ratio": _r(ratio),
                "miss": miss,
                "note": note,
            }
        )

    c1 = _level(results, 1, False)
    if cp:
        row(
            "concurrency 1: p50 ≤ 1.05 × critical path",
            1.05 * cp,
            c1 and c1["summary"]["p50_s"],
            "s",
            note=f"critical path {cp:g} s"
            + (f"; p50 / critical path = {c1['summary']['p50_s'] / cp:.3f}" if c1 else ""),
        )
    c64 = _level(results, 64, False)
    s64 = c64["summary"] if c64 else {}
    row("concurrency 64: ≥ 30 req/s", 30, s64.get("req_per_s"), "req/s", lower_is_better=False)
    if cp:
        row("concurrency 64: p50 ≤ 2 × critical path", 2 * cp, s64.get("p50_s"), "s")
    row("concurrency 64: zero errors", 0, s64.get("errors"), "errors")
    row("≤ 1.0 ms CPU per upstream call, every Ray process (c64 non-stream)", 1.0, s64.get("ray_cpu_ms_per_call"), "ms")
    s64s = (_level(results, 64, True) or {}).get("summary", {})
    row("≤ 1.0 ms CPU per upstream call, every Ray process (c64 stream)", 1.0, s64s.get("ray_cpu_ms_per_call"), "ms")
    burst = results.get("burst")
    n = burst["concurrency"] if burst else 1000
    row(f"{n} in flight, 2 s upstream: no errors", 0, burst and burst["summary"]["errors"], "errors")
    peak = burst and burst["resources"]["peak_ray_rss_mb"]
    pss = burst and burst["resources"].get("peak_ray_pss_mb")
    row(
        f"{n} in flight: total Ray RSS ≤ 3 GB",
        3.0,
        peak and round(peak / 1024, 2),
        "GB",
        note=f"PSS (shared pages split): {pss / 1024:.2f} GB" if pss else "",
    )
    idle_rss = (results.get("idle_baseline") or {}).get("rss_mb_by_category_at_end") or {}
    after = (burst or {}).get("after") or {}
    end_rss = after.get("rss_mb_by_category_at_end") or {}
    ratios = {d: end_rss[d] / idle_rss[d] for d in REPLICA_KINDS if end_rss.get(d) and idle_rss.get(d)}
    worst = max(ratios, key=ratios.get) if ratios else None
    row(
        f"{after.get('wall_s', 60):.0f} s after the burst: every replica's RSS ≤ 1.2 × its idle RSS",
        1.2,
        worst and round(ratios[worst], 2),
        "× idle",
        note=", ".join(f"{d} {end_rss[d]:.0f}/{idle_rss[d]:.0f} MB" for d in ratios),
    )
    for entry in results.get("faults") or ():
        if not entry["stream"]:
            row(
                f"under upstream faults: all {entry['summary']['requests']} answered 200",
                entry["summary"]["requests"],
                entry["summary"]["status_200"],
                "answered",
                lower_is_better=False,
            )
    emb = results.get("embedded")
    row("embedded default: one request < 30 s", 30, emb and emb["non_stream"]["latency"], "s")
    return rows


# --- markdown ----------------------------------------------------------------------------------


def _faults_section(results: dict) -> list[str]:
    entries = results["faults"]
    rates = entries[0]["fault_rates"]
    served = results.get("faults_upstream") or {}
    calls, faults = served.get("calls"), served.get("faults") or {}
    lines = [
        "### Under upstream faults",
        "",
        f"The simulated upstream restarted at {results['config']['upstream_latency_s']} s per call with "
        + ", ".join(f"{100 * rate:g}% `{kind}`" for kind, rate in rates.items())
        + " (`reset`: the connection closed mid-body, plain and streamed calls alike; `hang`: never "
        f"answers, so the call's {results['config']['app']['models']['thinker']['timeout_s']} s timeout "
        f"ends it); {entries[0]['summary']['requests']} requests at concurrency {entries[0]['concurrency']}, "
        "non-stream then stream."
        + (
            f" Over both runs the upstream served {calls} calls, of them "
            + ", ".join(f"{n} `{kind}`" for kind, n in sorted(faults.items()))
            + "."
            if calls
            else ""
        ),
        "",
    ]
    rows = []
    for e in entries:
        s = e["summary"]
        rows.append(
            [
                "stream" if e["stream"] else "json",
                s["requests"],
                s["status_200"],
                s["ok"],
                ", ".join(f"{k}: {v}" for k, v in s["errors_by_kind"].items()) or "none",
                s["p50_s"],
                s["p90_s"],
                s["max_s"],
                s["calls_per_request"],
            ]
        )
    lines += _table(
        ["mode", "requests", "status 200", "complete answers", "errors", "p50 s", "p90 s", "max s", "calls/req"],
        rows,
    )
    lines += [
        "",
        "Complete answers: status 200 and, for a stream, `[DONE]` without an error event (a fuser reset "
        "after its first token ends a stream with the OpenAI error event, by design). Calls per request "
        "count what the upstreams billed, retries included.",
        "",
    ]
    return lines


def _fmt(x, nd=3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{nd}g}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return out


def _phase_at(results: dict, t: float) -> str:
    for ph in results.get("phases", []):
        if ph["start_s"] <= t <= ph.get("end_s", float("inf")):
            return ph["name"]
    return "between phases"


def replica_changes(results: dict) -> list[list]:
    """The sampled timeline, kept only where a replica count changed."""
    rows, last = [], None
    for s in results.get("timeline", []):
        key = (s["replicas"]["Thinker"], s["replicas"]["Validator"], s["replicas"]["Ingress"], s["replicas"]["Fuser"])
        if key != last:
            rows.append([s["t"], _phase_at(results, s["t"]), *key, s["rss_mb"]])
            last = key
    return rows


def markdown(results: dict, source: str = "bench/results/latest.json") -> str:
    meta, cfg = results["meta"], results.get("config", {})
    m = meta["machine"]
    cp = cfg.get("critical_path_s")
    lines = [
        SECTION,
        "",
        f"Generated by `bench/run.py` from `{source}` (every raw number, per request; not committed). Reproduce:",
        "",
        "```bash",
        meta["command"],
        "```",
        "",
        f"Run {meta['started']} → {meta.get('finished')}, commit `{m['git_commit']}`"
        + (" (service code modified in the work tree)" if m["service_code_modified"] else "")
        + f"; {m['cores']} cores ({m['cpu']}), {m['memory_gb']} GB, {m['os']}, Python {m['python']}, "
        f"Ray {m['ray']}. The machine is shared and noisy; load average at start "
        f"{', '.join(f'{x:.2f}' for x in m['load_before_start'])}.",
        "",
    ]
    if cfg:
        app = cfg["app"]
        t, v = app["thinking"], app["validation"]
        lines += [
            "### Set-up",
            "",
            f"- Upstream: `python -m tests.simulated_upstream --latency {cfg['upstream_latency_s']} --scenario "
            f"{cfg.get('scenario')}` (its own process), every role on it, replying by role (critics raise "
            "counterexamples, voters keep every step), so validation takes its full path.",
            f"- App config (`bench/work/bench_app.yaml`), profile `{cfg.get('model')}` (no economy mechanism): "
            f"{t['num_threads']} threads × {t['max_steps']} steps, {v['num_counterexamples']} counterexamples + "
            f"{v['num_voters']} voters per step (pass threshold {v['pass_threshold']}), failed steps: "
            f"`{v.get('on_fail', 'revise')}`, LLM fusion; `limits.max_in_flight: {app['limits']['max_in_flight']}`: "
            f"**{cfg['calls_per_request']} upstream calls per request** (checked against each response's "
            "`usage_by_role`).",
            "- Serve config (`bench/work/bench_serve.yaml`): `serve_config.yaml` unchanged but for the HTTP "
            "port and without the `local` app; started with `serve run` (RAY_ADDRESS=local), dashboard on, "
            + (
                "with `ray.env` as `make run` starts it (HTTP through HAProxy)."
                if cfg.get("haproxy")  # results from before HAProxy was the default have no such key
                else "without `ray.env` (HTTP through Serve's Python proxy)."
            ),
            f"- Critical path at {cfg['upstream_latency_s']} s per call: **{cp:g} s** = ({t['max_steps']} thinker "
            "steps + the last step's validation, 2 calls deep (counterexamples, then voters) + 1 fuser call) × "
            "latency: each step's validation overlaps the next step's thinking (`critical_path()` in "
            "`bench/service.py`).",
            "- CPU: user+system time of every process in the `serve run` session (GCS, raylet, dashboard "
            "and agents, controller, HAProxy and its manager, Serve's proxy, every replica, idle workers, the "
            "`serve run` driver), sampled "
            "every 0.5 s, a process's last reading kept after it exits; divided by the upstream calls the "
            "responses report. RSS is the sum over those processes (shared pages counted in each process); "
            "PSS splits shared pages between the processes sharing them. GB = 1,024 MB.",
            "",
        ]
    if cfg.get("haproxy") is False:
        lines += ["**Experiment: `serve run` without `ray.env`: HTTP through Serve's Python proxy.**", ""]
    if cfg.get("serve_overrides"):
        lines += [f"**Experiment: serve_config.yaml changed by `{'`, `'.join(cfg['serve_overrides'])}`.**", ""]
    rows = targets(results)
    lines += ["### Targets", ""]
    lines += _table(
        ["target", "bound", "measured", "ratio", "met", "missed by", "note"],
        [
            [
                r["target"],
                f"{r['bound']:g} {r['unit']}",
                r["measured"],
                r["ratio"],
                {True: "✅ yes", False: "❌ no", None: "–"}[r["met"]],
                r["miss"],
                r["note"],
            ]
            for r in rows
        ],
    )
    lines.append("")
    if results.get("levels"):
        lines += [
            "### Results by concurrency",
            "",
            f"Closed loop: each client sends its next request when the last one ends, "
            f"{meta['duration_per_level_s']:g} s per level. Latencies of successful requests; req/s = "
            "successful requests ÷ wall time of the level.",
            "",
        ]
        latency, resources = [], []
        for lv in results["levels"]:
            s, res = lv["summary"], lv["resources"]
            svc = res.get("service_log") or {}
            mode = "stream" if lv["stream"] else "json"
            latency.append(
                [
                    lv["concurrency"],
                    mode,
                    s["requests"],
                    s["p50_s"],
                    s["p90_s"],
                    s["p99_s"],
                    s["req_per_s"],
                    s["errors"],
                    s.get("ttfb_p50_s"),
                    s.get("ttfc_p50_s"),
                    svc.get("elapsed_s"),
                    svc.get("thinking_s"),
                    svc.get("fusion_s"),
                ]
            )
            resources.append(
                [
                    lv["concurrency"],
                    mode,
                    s["calls_per_request"],
                    s["ray_cpu_ms_per_call"],
                    s["ray_cpu_ms_per_call_net"],
                    s["ray_cpu_ms_per_request"],
                    res["ray_cores_busy"],
                    res["machine_cores_busy"],
                    res["ray_cpu_of_new_processes_s"],
                    res["peak_ray_rss_mb"],
                    res["peak_ray_pss_mb"],
                    f"{res['max_replicas']['Thinker']}/{res['max_replicas']['Validator']}",
                    "yes" if res["pytest_running"] else "",
                ]
            )
        lines += _table(
            [
                "conc.",
                "mode",
                "requests",
                "p50 s",
                "p90 s",
                "p99 s",
                "req/s",
                "errors",
                "TTFB p50 s",
                "first answer token p50 s",
                "service: elapsed p50 s",
                "thinking p50 s",
                "fusion p50 s",
            ],
            latency,
        )
        lines += [
            "",
            "TTFB: the first SSE chunk (the role chunk, sent at once); first answer token: the first "
            "`content` delta (fusion). `service:` medians of the Ingress's own `request_complete` log "
            "lines for the same requests (thinking = threads, fusion = the fuser call).",
            "",
        ]
        lines += _table(
            [
                "conc.",
                "mode",
                "calls/req",
                "Ray CPU ms/call",
                "… less idle baseline",
                "Ray CPU ms/request",
                "Ray cores busy",
                "machine cores busy",
                "CPU s of processes started in the level",
                "peak Ray RSS MB",
                "peak Ray PSS MB",
                "max Thinker/Validator",
                "pytest running",
            ],
            resources,
        )
        errs = {lv["name"]: lv["summary"]["errors_by_kind"] for lv in results["levels"] if lv["summary"]["errors"]}
        if errs:
            lines += ["", f"Errors by kind: `{json.dumps(errs)}`"]
        lines += ["", "![latency and throughput](bench/results/latency_throughput.png)", ""]
        top = max(results["levels"], key=lambda lv: lv["concurrency"] * 2 + (not lv["stream"]))
        idle = results.get("idle_baseline", {})
        lines += [
            f"Ray CPU by process kind at concurrency {top['concurrency']} "
            f"({'stream' if top['stream'] else 'json'}), seconds over {top['resources']['wall_s']:.1f} s "
            f"(idle baseline: {idle.get('ray_cores_busy')} cores busy with no load):",
            "",
        ]
        lines += _table(
            ["process", "CPU s", "share"],
            [
                [k, v, f"{100 * v / top['resources']['ray_cpu_s']:.0f}%"]
                for k, v in sorted(top["resources"]["ray_cpu_by_category_s"].items(), key=lambda kv: -kv[1])
                if v > 0.005
            ],
        )
        lines.append("")
    if results.get("faults"):
        lines += _faults_section(results)
    if results.get("burst"):
        b = results["burst"]
        s, res = b["summary"], b["resources"]
        lines += [
            "### 1,000 in flight" if b["concurrency"] == 1000 else f"### {b['concurrency']} in flight",
            "",
            f"The simulated upstream restarted with {cfg['burst_upstream_latency_s']} s latency "
            f"(critical path {cfg['burst_critical_path_s']:g} s); after waiting "
            f"{b['settle']['wall_s']:.0f} s for Thinker/Validator to be back at one replica, "
            f"{b['concurrency']} non-stream requests fired at once.",
            "",
        ]
        full = cfg["app"]["thinking"]["num_threads"]
        degraded = sum(v for k, v in s["threads_kept"].items() if k is not None and int(k) < full)
        lines += _table(
            [
                "requests",
                "ok",
                "errors",
                f"ok but from < {full} threads",
                "p50 s",
                "p90 s",
                "max s",
                "wall s",
                "calls/req",
                "steps validated / req (of 6)",
                "peak Ray RSS MB",
                "peak Ray PSS MB",
                "Ray CPU ms/call",
                "Ray cores busy",
                "max Thinker/Validator",
            ],
            [
                [
                    s["requests"],
                    s["ok"],
                    s["errors"],
                    degraded,
                    s["p50_s"],
                    s["p90_s"],
                    s["max_s"],
                    b["wall_s"],
                    s["calls_per_request"],
                    s["steps_validated_mean"],
                    res["peak_ray_rss_mb"],
                    res["peak_ray_pss_mb"],
                    s["ray_cpu_ms_per_call"],
                    res["ray_cores_busy"],
                    f"{res['max_replicas']['Thinker']}/{res['max_replicas']['Validator']}",
                ]
            ],
        )
        if s["errors"]:
            lines += ["", f"Errors by kind: `{json.dumps(s['errors_by_kind'])}`"]
        peak, end = res.get("rss_mb_by_category_at_peak"), (b.get("after") or {}).get("rss_mb_by_category_at_end")
        if peak:
            kinds = sorted(peak, key=lambda k: -peak[k])
            lines += ["", "RSS by process kind (MB) at the burst's peak and at the end of the watch after it:", ""]
            lines += _table(
                ["", *kinds], [["peak", *(peak[k] for k in kinds)], ["after", *((end or {}).get(k) for k in kinds)]]
            )
        lines.append("")
    if results.get("timeline"):
        lines += [
            "### Replica counts over time",
            "",
            "Live replica processes (sampled every 0.5 s; a row whenever a count changes), and Serve's "
            "own autoscaling decisions from the controller log. t = seconds since the service was ready.",
            "",
        ]
        lines += _table(
            ["t s", "phase", "Thinker", "Validator", "Ingress", "Fuser", "Ray RSS MB"], replica_changes(results)
        )
        decisions = results.get("autoscaling_decisions") or []
        lines += ["", "Serve autoscaling decisions:", ""]
        lines += (
            _table(
                ["t s", "phase", "deployment", "from", "to"],
                [[d["t"], _phase_at(results, d["t"]), d["deployment"], d["from"], d["to"]] for d in decisions],
            )
            if decisions
            else ["(none logged)"]
        )
        lines.append("")
    if results.get("profile"):
        p = results["profile"]
        lines += [
            "### Profile (py-spy, concurrency 64, non-stream)",
            "",
            f"`py-spy record --nonblocking --gil --rate 100 --format raw` for {p['seconds']} s on one replica of each; "
            "raw collapsed stacks in `bench/results/profile/` (not committed). `--gil`: only samples of the thread "
            "holding the GIL, i.e. where Python CPU time goes.",
            "",
        ]
        threads = p.get("thread_cpu_s") or {}
        if threads:
            lines += [
                "CPU seconds by thread during the profile (Python threads all carry the process title; "
                "the other names are Ray's C++ threads, invisible to py-spy's Python stacks):",
                "",
            ]
            for dep, by_name in threads.items():
                shown = [(k, v) for k, v in by_name.items() if v >= 0.05][:6]
                lines += [f"- {dep}: " + ", ".join(f"`{k}` {v:.2f}" for k, v in shown)]
            lines.append("")
        for dep, summ in p["summary"].items():
            if "error" in summ:
                lines += [f"- {dep}: {summ['error']}"]
                continue
            lines += [
                f"**{dep}** ({summ['samples']} samples holding the GIL)",
                "",
                "- self time by package: " + ", ".join(f"{k} {v}%" for k, v in summ["self_by_package_pct"][:8]),
                "- self time by function: " + ", ".join(f"`{k}` {v}%" for k, v in summ["self_pct"][:8]),
                "- inclusive: " + ", ".join(f"`{k}` {v}%" for k, v in summ["inclusive_pct"][:8]),
                "",
            ]
    if results.get("embedded"):
        e = results["embedded"]
        lines += [
            "### Embedded default",
            "",
            f"`serve run` of the shipped `serve_config.yaml` with `ray.env`, as `make run` starts it (with the "
            f"`local` llama.cpp app; HTTP port "
            f"changed, `configs/default.yaml` pointed at it): ready in {e['startup_s']} s; one request "
            f"{e['non_stream']['latency']} s non-stream (status {e['non_stream']['status']}), "
            f"{e['stream']['latency']} s stream (first answer token at {e['stream'].get('ttfc')} s).",
            "",
        ]
    if ANALYSIS.exists():
        lines += [ANALYSIS.read_text().strip(), ""]
    return "\n".join(lines)


# --- plot --------------------------------------------------------------------------------------


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    levels = results.get("levels") or []
    if not levels:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for stream, style in ((False, "-"), (True, "--")):
        lv = [x for x in levels if x["stream"] == stream]
        xs = [x["concurrency"] for x in lv]
        label = "stream" if stream else "json"
        ax1.plot(xs, [x["summary"]["p50_s"] for x in lv], "o" + style, label=f"p50 {label}")
        ax1.plot(xs, [x["summary"]["p90_s"] for x in lv], "s" + style, label=f"p90 {label}")
        ax2.plot(xs, [x["summary"]["req_per_s"] for x in lv], "o" + style, label=label)
    cp = results["config"]["critical_path_s"]
    ax1.axhline(cp, color="grey", lw=0.8, ls=":", label=f"critical path {cp:g} s")
    ax1.axhline(2 * cp, color="red", lw=0.8, ls=":", label=f"c64 target p50 ≤ {2 * cp:g} s")
    ax2.axhline(30, color="red", lw=0.8, ls=":", label="target 30 req/s")
    for ax, title, ylabel in ((ax1, "Latency", "seconds"), (ax2, "Throughput", "requests / s")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({x["concurrency"] for x in levels}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set_ylim(bottom=0)
    ax2.set_ylim(bottom=0)
    fig.suptitle(
        f"Token Killer, simulated upstream {results['config']['upstream_latency_s']} s/call, "
        f"{results['config']['calls_per_request']} calls/request",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(results: dict, out: Path, markdown_path: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    results["targets"] = targets(results)
    path = out / "latest.json"
    path.write_text(json.dumps(results, indent=1))
    plotted = plot(results, out / "latency_throughput.png")
    text = markdown(results, str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path))
    if not plotted:
        text = text.replace(
            "![latency and throughput](bench/results/latency_throughput.png)", "(no plot: matplotlib is not installed)"
        )
    elif markdown_path.parent != ROOT:  # a report beside its plot links to it directly
        text = text.replace("(bench/results/latency_throughput.png)", "(latency_throughput.png)")
    if markdown_path == ROOT / "BENCHMARKS.md":
        replace_section(markdown_path, SECTION, text)
    else:
        markdown_path.write_text(text)
    return path


def publish(name: str, results: dict, heading: str, text: str, *, write: bool) -> None:
    """Raw results to bench/results/NAME.json (not committed); the section to BENCHMARKS.md, or
    printed when not `write`."""
    out = ROOT / "bench" / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    if not write:
        print(text)
        return
    replace_section(ROOT / "BENCHMARKS.md", heading, text)
    print(f"[{name}] wrote {out.relative_to(ROOT)} and its section of BENCHMARKS.md")


def replace_section(path: Path, heading: str, text: str) -> None:
    """BENCHMARKS.md holds one section per benchmark: replace this one (or append it)."""
    current = path.read_text() if path.exists() else "# Benchmarks\n"
    if heading in current:
        before, _, rest = current.partition(heading)
        after = rest[rest.find("\n## ") + 1 :] if "\n## " in rest else ""
        current = before + text.rstrip("\n") + "\n" + ("\n" + after if after else "")
    else:
        current = current.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n"
    path.write_text(current)


def main() -> None:
    """Re-render a report from its JSON (after editing bench/analysis.md or this module):
    python -m bench.report bench/results/latest.json BENCHMARKS.md"""
    import sys

    source, markdown_path = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
    results = json.loads(source.read_text())
    idle = (results.get("idle_baseline") or {}).get("ray_cores_busy")
    for entry in [
        *results.get("levels", []),
        *results.get("faults", []),
        *([results["burst"]] if results.get("burst") else []),
    ]:
        entry["summary"] = summarize(entry, idle)
    write(results, source.parent, markdown_path)


if __name__ == "__main__":
    main()
