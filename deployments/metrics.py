"""Service metrics on Ray's metrics pipeline (exported with a `ray_` prefix).

One `ServiceMetrics` per replica, made in its constructor (Ray metrics need a running worker).
The role logic in actors/ never sees these: it reports through `CallObserver`, and the
deployments record what the roles return (verdicts, run statistics).
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram

from actors.pipeline import RunStats
from actors.schemas import Verdict

# The `key` label of requests to a service without keys.
NO_KEY = "none"
_LATENCY_BOUNDARIES_S = [0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60]
_PHASE_BOUNDARIES_S = [0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300]


class ServiceMetrics:
    def __init__(self) -> None:
        self.upstream_calls = Counter(
            "tk_upstream_calls", description="Upstream HTTP attempts by role and outcome.", tag_keys=("role", "outcome")
        )
        self.upstream_latency = Histogram(
            "tk_upstream_latency_s",
            description="Upstream attempt latency by role.",
            boundaries=_LATENCY_BOUNDARIES_S,
            tag_keys=("role",),
        )
        self.tokens = Counter(
            "tk_tokens",
            description="Tokens the upstreams reported, by role, kind and client key id.",
            tag_keys=("role", "kind", "key"),
        )
        self.cost = Counter(
            "tk_cost_usd",
            description="What the upstreams billed, in USD at the configured prices.",
            tag_keys=("profile", "key"),
        )
        self.key_requests = Counter(
            "tk_key_requests",
            description="Requests by client key id: admitted, or the error code that refused them.",
            tag_keys=("key", "outcome"),
        )
        self.verdicts = Counter(
            "tk_validation_verdicts", description="Step validation verdicts.", tag_keys=("verdict",)
        )
        self.threads = Counter("tk_threads", description="Reasoning threads by outcome.", tag_keys=("outcome",))
        self.phase = Histogram(
            "tk_phase_duration_s",
            description="Request phase durations.",
            boundaries=_PHASE_BOUNDARIES_S,
            tag_keys=("phase",),
        )
        self.in_flight = Gauge("tk_requests_in_flight", description="Requests being served by this ingress replica.")

    # CallObserver
    def upstream_attempt(self, role: str, outcome: str, seconds: float) -> None:
        self.upstream_calls.inc(tags={"role": role, "outcome": outcome})
        self.upstream_latency.observe(seconds, tags={"role": role})

    def verdict(self, verdict: Verdict) -> None:
        self.verdicts.inc(tags={"verdict": verdict.status.value})

    def key_request(self, key_id: str | None, outcome: str) -> None:
        self.key_requests.inc(tags={"key": key_id or NO_KEY, "outcome": outcome})

    def request_done(self, profile: str, stats: RunStats, key_id: str | None = None) -> None:
        key = key_id or NO_KEY
        for role, usage in stats.usage.roles.items():
            if usage.prompt_tokens:
                self.tokens.inc(usage.prompt_tokens, tags={"role": role, "kind": "prompt", "key": key})
            if usage.cached_tokens:
                self.tokens.inc(usage.cached_tokens, tags={"role": role, "kind": "cached_prompt", "key": key})
            if usage.completion_tokens:
                self.tokens.inc(usage.completion_tokens, tags={"role": role, "kind": "completion", "key": key})
        if stats.usage.cost_usd:
            self.cost.inc(stats.usage.cost_usd, tags={"profile": profile, "key": key})
        if stats.threads_kept:
            self.threads.inc(stats.threads_kept, tags={"outcome": "kept"})
        if stats.threads_failed:
            self.threads.inc(len(stats.threads_failed), tags={"outcome": "dropped"})
        if stats.thinking_s:
            self.phase.observe(stats.thinking_s, tags={"phase": "thinking"})
        if stats.fusion_s:
            self.phase.observe(stats.fusion_s, tags={"phase": "fusion"})
