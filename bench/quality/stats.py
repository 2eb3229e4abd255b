"""Per-arm figures from per-problem records: accuracy with its interval, tokens, cost, latency."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from bench.report import percentile

Z_95 = 1.959963984540054


def wilson(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a proportion: sane at 0/n and n/n, unlike the normal one."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def accuracy(records: list[dict[str, Any]]) -> dict[str, Any]:
    correct = sum(bool(r["correct"]) for r in records)
    low, high = wilson(correct, len(records))
    return {
        "n": len(records),
        "correct": correct,
        "accuracy": correct / len(records) if records else None,
        "ci95": [low, high],
    }


def summarize_arm(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Errors count as wrong answers; token, cost and latency means are over answered problems
    (a failed call reports no usage). Cost is None unless every answered problem has one."""
    answered = [r for r in records if r["error"] is None]
    summary = accuracy(records)
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        summary[f"mean_{key}"] = _mean([r[key] for r in answered if r[key] is not None])
    costs = [r["cost_usd"] for r in answered]
    summary["mean_cost_usd"] = _mean(costs) if costs and None not in costs else None
    summary["p50_latency_s"] = percentile([r["latency_s"] for r in answered], 50)
    summary["errors"] = len(records) - len(answered)
    summary["no_answer_found"] = sum(r["extracted"] is None for r in answered)
    tokens = summary["mean_total_tokens"]
    # Accuracy divided by the thousands of tokens a problem costs on average.
    summary["accuracy_per_1k_tokens"] = (
        summary["accuracy"] / (tokens / 1000) if tokens and summary["accuracy"] is not None else None
    )
    summary["by_level"] = _grouped(records, "level")
    summary["by_kind"] = _grouped(records, "kind")
    return summary


def _grouped(records: list[dict[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    groups: dict[Any, list] = defaultdict(list)
    for record in records:
        groups[record[key]].append(record)
    return {str(k): accuracy(v) for k, v in sorted(groups.items())}
