"""Cost in USD of one answer: the service reports it; a direct call is priced from the config."""

from __future__ import annotations

from typing import Any


def service_cost_usd(extension: dict[str, Any] | None) -> float | None:
    """`token_killer.cost.total_usd` of a service response; None when no prices are configured
    (or the service is older than cost reporting)."""
    cost = (extension or {}).get("cost")
    return float(cost["total_usd"]) if isinstance(cost, dict) and cost.get("total_usd") is not None else None


def direct_cost_usd(usage: Any, price: dict[str, float] | None) -> float | None:
    """From `models.thinker.price: {input, cached_input, output}`, USD per million tokens.
    Cached prompt tokens are billed at `cached_input` (at `input` if that is not given)."""
    if not price or usage is None:
        return None
    details = getattr(usage, "prompt_tokens_details", None)
    cached = (getattr(details, "cached_tokens", None) or 0) if details is not None else 0
    fresh = usage.prompt_tokens - cached
    cached_rate = price.get("cached_input", price["input"])
    return (fresh * price["input"] + cached * cached_rate + usage.completion_tokens * price["output"]) / 1e6
