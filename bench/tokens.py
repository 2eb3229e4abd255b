"""Token benchmark: what the economy mechanisms save, at the same decisions.

    .venv/bin/python -m bench.tokens                # writes the "Tokens" section of BENCHMARKS.md
    .venv/bin/python -m bench.tokens --requests 5 --no-write

One `serve run` of the shipped serve_config.yaml with the original's pipeline shape (3 threads ×
2 steps, 3 counterexamples + 3 voters, pass threshold 2, revise failed steps, LLM fusion) and
prices; the simulated upstream (0.2 s a call, prefix cache on) is restarted for each scripted
scenario (tests/scenarios.py). Every scenario runs with `token-killer-classic` (no economy
mechanism) and `token-killer` (all of them), one request at a time, and reports per request:
upstream calls, prompt / cached / completion tokens, cost, latency, and the decisions taken.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from datetime import UTC, datetime
from typing import Any

import openai

from bench.report import replace_section
from bench.service import ROOT, WORK, start_serve, start_upstream, write_yaml
from tests.support import free_port, shipped_serve_config, sim_config_dict

LATENCY_S = 0.2
PROFILES = ("token-killer-classic", "token-killer")
# The decisions a run takes; how a passed step passed (voted, or unchallenged) is shown beside.
DECISIONS = ("steps_validated", "steps_failed", "steps_revised", "steps_flagged", "threads_kept")
# A small provider's list prices, USD per million tokens (input, cached input, output).
PRICE = {"input": 0.15, "cached_input": 0.075, "output": 0.6}
# (name, simulated upstream scenario, what it shows, budget as a share of classic's spend).
SCENARIOS = [
    ("every step passes", "pass", "critics find nothing; voters would pass every step", None),
    ("steps challenged, then pass", "challenged-pass", "critics raise counterexamples; voters keep the step", None),
    ("every vote refutes", "refute", "each step fails, is revised once, fails again and is flagged", None),
    ("threads agree", "agree", "every thread answers 42 at step 2", None),
    ("tight budget", "challenged-pass", "budget_tokens = 60% of what classic spends unbounded", 0.6),
]
SECTION = "## Tokens: the economy mechanisms against the original's behaviour"


def app_config(base_url: str) -> dict[str, Any]:
    config = sim_config_dict(
        base_url,
        thinking={"num_threads": 3, "max_steps": 2},
        validation={"num_counterexamples": 3, "num_voters": 3, "pass_threshold": 2, "on_fail": "revise"},
        profiles={"token-killer": {}, "token-killer-classic": {"economy": False}},
        upstream={"max_attempts": 3, "backoff_initial_s": 0.2, "backoff_max_s": 5},
    )
    for model in config["models"].values():
        model["timeout_s"] = 30
        model["price"] = PRICE
    return config


async def one_request(client: openai.AsyncOpenAI, model: str, budget: int | None) -> dict:
    extra = {"token_killer": {"budget_tokens": budget}} if budget else None
    started = time.perf_counter()
    reply = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is six times seven?"}], extra_body=extra
    )
    ext = reply.model_extra["token_killer"]
    return {
        "latency_s": time.perf_counter() - started,
        "calls": sum(r["calls"] for r in ext["usage_by_role"].values()),
        "prompt_tokens": reply.usage.prompt_tokens,
        "cached_tokens": reply.usage.prompt_tokens_details.cached_tokens,
        "completion_tokens": reply.usage.completion_tokens,
        "total_tokens": reply.usage.total_tokens,
        "cost_usd": ext["cost"]["total_usd"],
        "decisions": {k: ext[k] for k in DECISIONS},
        "unchallenged": ext["steps_unchallenged"],
        "fusion": ext["fusion"]["mode"],
        "skipped": len(ext["skipped"]),
        "answer": reply.choices[0].message.content,
    }


def summarize(records: list[dict]) -> dict:
    mean = lambda key: statistics.fmean(r[key] for r in records)  # noqa: E731
    decisions = {json.dumps(r["decisions"], sort_keys=True) for r in records}
    return {
        "requests": len(records),
        "calls": mean("calls"),
        "prompt_tokens": mean("prompt_tokens"),
        "cached_tokens": mean("cached_tokens"),
        "completion_tokens": mean("completion_tokens"),
        "total_tokens": mean("total_tokens"),
        "max_total_tokens": max(r["total_tokens"] for r in records),
        "cost_usd": mean("cost_usd"),
        "p50_s": statistics.median(r["latency_s"] for r in records),
        "decisions": [json.loads(d) for d in sorted(decisions)],
        "fusion": sorted({r["fusion"] for r in records}),
        "skipped": mean("skipped"),
        "unchallenged": mean("unchallenged"),
    }


async def run_scenario(base: str, requests: int, budget: int | None) -> dict[str, dict]:
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
    results = {}
    for model in PROFILES:
        await one_request(client, model, budget)  # warm-up, not counted
        records = [await one_request(client, model, budget) for _ in range(requests)]
        results[model] = {"summary": summarize(records), "records": records}
    await client.close()
    return results


def measure(args: argparse.Namespace) -> dict:
    up_port, http_port = free_port(), free_port()
    app_yaml = write_yaml(WORK / "tokens_app.yaml", app_config(f"http://127.0.0.1:{up_port}/v1"))
    serve_yaml = write_yaml(WORK / "tokens_serve.yaml", shipped_serve_config(http_port, app_config=app_yaml))
    base = f"http://127.0.0.1:{http_port}"
    results: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "latency_s": LATENCY_S,
        "price": PRICE,
        "requests": args.requests,
        "scenarios": [],
    }
    upstream = start_upstream(up_port, LATENCY_S, scenario="pass", prefix_cache=True)
    serve = start_serve(serve_yaml, app_yaml, http_port)
    try:
        classic_spend: dict[str, float] = {}
        for name, scenario, what, budget_share in SCENARIOS:
            upstream.stop()
            upstream = start_upstream(up_port, LATENCY_S, scenario=scenario, prefix_cache=True)
            budget = None
            if budget_share is not None:
                budget = int(classic_spend[scenario] * budget_share)
            print(f"[tokens] {name}: {args.requests} requests per profile", flush=True)
            by_profile = asyncio.run(run_scenario(base, args.requests, budget))
            classic_spend.setdefault(scenario, by_profile["token-killer-classic"]["summary"]["total_tokens"])
            results["scenarios"].append(
                {"name": name, "scenario": scenario, "what": what, "budget_tokens": budget, "profiles": by_profile}
            )
    finally:
        serve.stop()
        upstream.stop()
    results["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    return results


def markdown(results: dict) -> str:
    lines = [
        SECTION,
        "",
        f"Generated by `python -m bench.tokens` ({results['started']} → {results['finished']}): "
        f"{results['requests']} requests per profile and scenario, one at a time, after one warm-up. "
        f"The original's shape — 3 threads × 2 steps, 3 counterexamples + 3 voters (pass threshold 2), "
        f"failed steps revised, LLM fusion — on the simulated upstream at {results['latency_s']} s a call "
        f"with its prefix cache on; prices ${results['price']['input']} / ${results['price']['cached_input']} / "
        f"${results['price']['output']} per million input / cached input / output tokens. "
        "`token-killer-classic` runs no economy mechanism; `token-killer` runs all of them.",
        "",
        "| scenario | profile | calls | prompt tok | cached | completion tok | total tok | vs classic | cost $ "
        "| p50 s | decisions per request (steps validated / failed / revised / flagged, threads kept) "
        "| passed unchallenged | skipped | fusion |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for entry in results["scenarios"]:
        classic = entry["profiles"]["token-killer-classic"]["summary"]
        for model in PROFILES:
            s = entry["profiles"][model]["summary"]
            ratio = s["total_tokens"] / classic["total_tokens"] if classic["total_tokens"] else float("nan")
            decided = "; ".join(
                f"{d['steps_validated']} / {d['steps_failed']} / {d['steps_revised']} / {d['steps_flagged']}, "
                f"{d['threads_kept']}"
                for d in s["decisions"]
            )
            name = entry["name"] + (f" ({entry['budget_tokens']} tokens)" if entry["budget_tokens"] else "")
            lines.append(
                f"| {name} | `{model}` | {s['calls']:.1f} | {s['prompt_tokens']:.0f} | {s['cached_tokens']:.0f} | "
                f"{s['completion_tokens']:.0f} | {s['total_tokens']:.0f} | {ratio:.0%} | {s['cost_usd']:.6f} | "
                f"{s['p50_s']:.2f} | {decided} | {s['unchallenged']:.1f} | {s['skipped']:.1f} | "
                f"{', '.join(s['fusion'])} |"
            )
        economy = entry["profiles"]["token-killer"]["summary"]
        same = economy["decisions"] == classic["decisions"]
        extra_calls = (economy["p50_s"] - classic["p50_s"]) / results["latency_s"]
        timing = (
            f"p50 {economy['p50_s']:.2f} s against {classic['p50_s']:.2f} s "
            f"({extra_calls:+.1f} upstream calls of {results['latency_s']} s)"
        )
        if entry["budget_tokens"]:
            # Under a budget the decisions differ by design (what does not fit is skipped): what
            # counts is that no request reported more than its budget and each still answered.
            budget = entry["budget_tokens"]
            most = {m: p["summary"]["max_total_tokens"] for m, p in entry["profiles"].items()}
            verdicts.append(
                f"- **{entry['name']}** ({entry['what']}): budget {budget} tokens; the most any request "
                "reported: "
                + ", ".join(f"`{m}` {n} ({n / budget:.0%} of the budget)" for m, n in most.items())
                + f"; every request answered; `token-killer` spends "
                f"{economy['total_tokens'] / classic['total_tokens']:.0%} of classic's tokens on average, "
                f"with {economy['skipped']:.1f} pieces of work skipped against {classic['skipped']:.1f}; {timing}."
            )
            continue
        verdicts.append(
            f"- **{entry['name']}** ({entry['what']}): `token-killer` spends "
            f"{economy['total_tokens'] / classic['total_tokens']:.0%} of classic's tokens; decisions "
            f"{'identical' if same else 'DIFFERENT'}; {timing}."
        )
    lines += ["", "Per scenario:", "", *verdicts, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=10, help="requests per profile and scenario")
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing BENCHMARKS.md")
    args = parser.parse_args(argv)
    results = measure(args)
    out = ROOT / "bench" / "results" / "tokens.json"  # raw results, not committed
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    text = markdown(results)
    if args.no_write:
        print(text)
    else:
        replace_section(ROOT / "BENCHMARKS.md", SECTION, text)
        print(f"[tokens] wrote {out.relative_to(ROOT)} and the Tokens section of BENCHMARKS.md")


if __name__ == "__main__":
    main()
