"""Driving a reply: one run of the pipeline, whatever wire format the client speaks.

Chat completions and the Responses API are two renderings of the same run (as vLLM's
`serving_chat.py` and `serving_responses.py` share `serving_engine.py`). This module holds what
they share: the request checked before any upstream call (`actors/checking.py`), the run
(`actors/pipeline.py`) driven to a JSON body or an SSE stream, its events turned into the answer
and the reasoning text (`Reply`), the usage, the `token_killer` extension field, the errors and
the `request_complete` log line. A wire format supplies a `Render`; it decides only how things look.

For a stream, the first event is awaited (up to one keepalive interval) before choosing between
an HTTP error and SSE, so failures that come early get their real status. No Ray, no HTTP
framework here: `deployments/ingress.py` binds the pipeline to handles and serves the result.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from actors.checking import Ask, plan_run, unknown_model
from actors.config import ServiceConfig
from actors.fusion import FusionBroken, FusionUnavailable, merge_tool_calls
from actors.pipeline import DeepThinkingRun, Fuse, NothingToFuse, RunPlan, Think
from actors.prompts import PromptSet
from actors.protocol import APIError, ModelCard, ModelList
from actors.schemas import (
    FusionDelta,
    Skipped,
    StepChecked,
    StepDropped,
    StepWritten,
    ThinkingTokens,
    ThreadEnded,
    UsageLedger,
    VerdictStatus,
)
from actors.streams import batches

if TYPE_CHECKING:
    from actors.admission import Grant

log = structlog.get_logger(__name__)

FUSER_ROLE = "fuser"
# SSE writes less than this apart are merged (each is a message to the HTTP proxy); the first
# write of a quiet spell goes at once.
SSE_SPACING_S = 0.02
# Events a client sees as the stream's start: a step, its tokens, or the answer.
_SHOWS = (StepWritten, ThinkingTokens, FusionDelta)
KEEPALIVE = ": keepalive\n\n"


@dataclass
class Prepared:
    """A request that passed every check, with what its reply needs."""

    request_id: str
    ask: Ask
    request: Any  # the request as its wire format parsed it, for the rendering
    plan: RunPlan
    show_reasoning: bool
    key_id: str | None = None  # the client key's id (never the key), when the service has keys
    created: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.monotonic)

    @property
    def profile(self) -> str:
        return self.ask.model


Finished = Callable[[Prepared, DeepThinkingRun, str], None]


@dataclass
class Said:
    """What one batch of events adds to the reply a client sees."""

    reasoning: str = ""
    text: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # pieces, merged
    logprobs: list[dict[str, Any]] = field(default_factory=list)


class Render(Protocol):
    """How one wire format writes a streamed reply (its JSON body is its own affair)."""

    def opening(self) -> str:
        """What goes before the first events (sent together with them)."""

    def said(self, said: Said) -> str:
        """The SSE events for what one batch added."""

    def ending(self, reply: Reply, run: DeepThinkingRun, extension: dict[str, Any]) -> str:
        """The last SSE events of a stream that ended well."""

    def failure(self, error: APIError) -> str:
        """The last SSE events of a stream that failed after it began."""


class Serving:
    """One request from checks to a reply. A wire format subclasses it: it parses its body into
    an `Ask` and renders the `Reply`."""

    def __init__(
        self,
        config: ServiceConfig,
        prompts: PromptSet,
        *,
        think_stream: Think,
        think_whole: Think,
        fuse_stream: Fuse,
        fuse_whole: Fuse,
        on_finish: Finished | None = None,
    ) -> None:
        """`*_stream` report as they go (SSE replies); `*_whole` report once (JSON replies)."""
        self.config = config
        self.prompts = prompts
        self.think_stream = think_stream
        self.think_whole = think_whole
        self.fuse_stream = fuse_stream
        self.fuse_whole = fuse_whole
        self.on_finish = on_finish
        self.priced = any(m.price is not None for m in config.models.values())

    # --- models ------------------------------------------------------------------------------

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=name) for name in self.config.profiles])

    def model(self, model_id: str) -> ModelCard:
        if model_id not in self.config.profiles:
            raise unknown_model(self.config, model_id)
        return ModelCard(id=model_id)

    # --- checking a request ------------------------------------------------------------------

    def check(self, ask: Ask, request_id: str, request: Any, grant: Grant | None = None) -> Prepared:
        """Everything that can fail fast fails here, before any upstream call. `grant`: what the
        client's key allows."""
        plan = plan_run(self.config, self.prompts, ask, request_id, grant)
        show = self.config.show_reasoning if ask.include_reasoning is None else ask.include_reasoning
        return Prepared(request_id, ask, request, plan, show, key_id=grant.key_id if grant else None)

    # --- replying ----------------------------------------------------------------------------

    def run(self, prepared: Prepared) -> DeepThinkingRun:
        if prepared.ask.stream:
            return DeepThinkingRun(prepared.plan, self.think_stream, self.fuse_stream)
        return DeepThinkingRun(prepared.plan, self.think_whole, self.fuse_whole)

    async def whole(self, prepared: Prepared) -> tuple[Reply, DeepThinkingRun]:
        """A JSON reply's run: every event, then the wire format writes one body."""
        run = self.run(prepared)
        reply = Reply(prepared.show_reasoning, live=False)
        outcome = "cancelled"
        try:
            async for event in run.events():
                reply.add(event)
            outcome = "ok"
        except Exception as exc:
            outcome = "failed"
            raise self.error_for(exc, prepared.request_id) from exc
        finally:
            self._finish(prepared, run, outcome)
        return reply, run

    async def sse(self, prepared: Prepared, render: Render) -> AsyncIterator[str]:
        """SSE text. The first events are awaited here (an error before them raises APIError,
        for a real status code); the returned iterator sends them and the rest."""
        run = self.run(prepared)
        reply = Reply(prepared.show_reasoning, live=True)
        events = batches([run.events()], idle_s=self.config.stream_keepalive_s, spacing_s=SSE_SPACING_S)
        first: list = []
        try:
            # Until a step or the answer shows (or a keepalive is due), an error can still be a
            # real HTTP status: threads that fail at once are a 502, not an error event.
            while not any(isinstance(e, _SHOWS) for e in first):
                batch = await events.__anext__()
                if not batch:
                    break
                first += batch
        except StopAsyncIteration:
            pass
        except BaseException as exc:
            await events.aclose()
            self._finish(prepared, run, "failed" if isinstance(exc, Exception) else "cancelled")
            if isinstance(exc, Exception):
                raise self.error_for(exc, prepared.request_id) from exc
            raise
        return self._sse(prepared, run, reply, render, first, events)

    async def _sse(
        self, prepared, run, reply: Reply, render: Render, first: list, events: AsyncIterator[list]
    ) -> AsyncIterator[str]:
        # One write per batch of events: each write is a message from this replica to the HTTP
        # proxy, so the opening goes with the first events and the end in one piece.
        outcome = "cancelled"
        opening = render.opening()
        ending = ""
        try:
            batch: list | None = first
            while batch is not None:
                text = opening + (render.said(reply.take(batch)) if batch else KEEPALIVE)
                opening = ""
                if text:
                    yield text
                batch = await anext(events, None)
            ending = render.ending(reply, run, self.extension(prepared, run))
            outcome = "ok"
        except Exception as exc:  # noqa: BLE001 - the status is sent; report in-band
            outcome = "failed"
            ending = opening + render.failure(self.error_for(exc, prepared.request_id))
        finally:
            await events.aclose()
            self._finish(prepared, run, outcome)
        yield ending

    def error_for(self, exc: BaseException, request_id: str) -> APIError:
        """The client's view of a failure: real causes named, internal detail never."""
        if isinstance(exc, APIError):
            return exc
        no_retry = {"x-should-retry": "false"}  # every upstream call was already retried
        if isinstance(exc, NothingToFuse):
            if exc.deadline:
                return APIError(504, str(exc), type="timeout", code="deadline_exceeded", headers=no_retry)
            if exc.capacity:
                return APIError(
                    503,
                    f"The service is short of capacity right now, please retry: {exc}",
                    type="service_unavailable",
                    code="overloaded",
                    headers={"Retry-After": str(self.config.limits.retry_after_s)},
                )
            return APIError(502, str(exc), type="upstream_error", code="upstream_failed", headers=no_retry)
        if isinstance(exc, (FusionUnavailable, FusionBroken)):
            return APIError(502, str(exc), type="upstream_error", code="fusion_failed", headers=no_retry)
        log.error("request_failed_unexpectedly", request_id=request_id, exc_info=exc)
        return internal_error(request_id)

    # --- bookkeeping -------------------------------------------------------------------------

    def extension(self, prepared: Prepared, run: DeepThinkingRun) -> dict[str, Any]:
        """The `token_killer` field: what the run did and spent."""
        stats = run.stats
        fusion = stats.fusion or FusionDelta()
        return {
            "profile": prepared.profile,
            "key_id": prepared.key_id,
            "usage_by_role": usage_by_role(stats.usage),
            "calls_aborted": stats.usage.aborted_calls,
            "cost": cost(stats.usage) if self.priced else None,
            "budget_tokens": prepared.plan.settings.budget_tokens,
            "threads_kept": stats.threads_kept,
            "threads_failed": sorted(t + 1 for t in stats.threads_failed),
            "steps_validated": stats.steps_validated,
            "steps_failed": stats.steps_failed,
            "steps_revised": stats.steps_revised,
            "steps_flagged": stats.steps_flagged,
            "steps_unchallenged": stats.steps_unchallenged,
            "skipped": [{"what": s.what, "reason": s.reason} for s in stats.skipped],
            "fusion": {
                "mode": fusion.mode,
                "thread": None if fusion.thread is None else fusion.thread + 1,
                "restarted": fusion.restarted,
                "reason": fusion.reason or None,
            },
            "fusion_fallback_thread": fusion.thread + 1 if fusion.mode == "best_thread" else None,
        }

    def _finish(self, prepared: Prepared, run: DeepThinkingRun, outcome: str) -> None:
        stats = run.stats
        log.info(
            "request_complete",
            request_id=prepared.request_id,
            profile=prepared.profile,
            key_id=prepared.key_id,
            outcome=outcome,
            stream=prepared.ask.stream,
            elapsed_s=round(time.monotonic() - prepared.started, 3),
            thinking_s=round(stats.thinking_s, 3),
            fusion_s=round(stats.fusion_s, 3),
            upstream_calls=stats.usage.calls,
            calls_aborted=stats.usage.aborted_calls,
            prompt_tokens=stats.usage.prompt_tokens,
            completion_tokens=stats.usage.completion_tokens,
            cost_usd=round(stats.usage.cost_usd, 6) if self.priced else None,
            by_role=usage_by_role(stats.usage),
            threads_kept=stats.threads_kept,
            threads_failed=len(stats.threads_failed),
            steps_validated=stats.steps_validated,
            steps_failed=stats.steps_failed,
            steps_revised=stats.steps_revised,
            fusion_mode=(stats.fusion or FusionDelta()).mode,
            user=prepared.ask.user,
            metadata=prepared.ask.metadata,
        )
        if self.on_finish is not None:
            self.on_finish(prepared, run, outcome)


def internal_error(request_id: str) -> APIError:
    return APIError(
        500,
        f"The server had an error while processing your request (request id {request_id}).",
        type="server_error",
        code="internal_error",
        headers={"x-should-retry": "false"},
    )


def reasoning_tokens(usage: UsageLedger) -> int:
    """Every completion token but the fuser's (the answer's)."""
    fuser = usage.roles.get(FUSER_ROLE)
    return usage.completion_tokens - (fuser.completion_tokens if fuser else 0)


def usage_by_role(usage: UsageLedger) -> dict[str, dict[str, Any]]:
    return {
        role: {
            "calls": u.calls,
            "failed_calls": u.failed_calls,
            "aborted_calls": u.aborted_calls,
            "prompt_tokens": u.prompt_tokens,
            "completion_tokens": u.completion_tokens,
            "cached_tokens": u.cached_tokens,
            "seconds": round(u.seconds, 3),
        }
        for role, u in sorted(usage.roles.items())
    }


def cost(usage: UsageLedger) -> dict[str, Any]:
    return {
        "total_usd": round(usage.cost_usd, 8),
        "by_role": {role: round(u.cost_usd, 8) for role, u in sorted(usage.roles.items())},
    }


class Reply:
    """One reply being built from the run's events: answer, reasoning, tool calls, logprobs,
    finish reason. No wire format: the renderings read it."""

    def __init__(self, show_reasoning: bool, *, live: bool) -> None:
        self.live = live
        self.show_reasoning = show_reasoning
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.tool_calls: list[dict[str, Any]] = []
        self.logprobs: list[dict[str, Any]] = []
        self.finish_reason = "stop"
        self._live_step: tuple[int, int] | None = None  # the step whose tokens streamed last
        self._streamed: set[tuple[int, int]] = set()

    @property
    def text(self) -> str:
        return "".join(self.content)

    @property
    def reasoning_text(self) -> str:
        return "".join(self.reasoning)

    def add(self, event) -> tuple[str, FusionDelta | None]:
        """Record one event; return the reasoning text it adds and the answer delta, if any."""
        if isinstance(event, FusionDelta):
            self.content.append(event.text)
            if event.tool_calls:
                self.tool_calls = merge_tool_calls(self.tool_calls, event.tool_calls)
            if event.logprobs:
                self.logprobs += event.logprobs
            if event.final and event.finish_reason:
                self.finish_reason = event.finish_reason
            return "", event
        if not self.show_reasoning:
            return "", None
        text = self._reasoning(event)
        if text:
            self.reasoning.append(text)
        return text, None

    def take(self, batch: list) -> Said:
        """Record a batch of events; return what they add, reasoning and answer apart."""
        said = Said()
        reasoning, text = [], []
        for event in batch:
            words, delta = self.add(event)
            if words:
                reasoning.append(words)
            if delta is not None:
                text.append(delta.text)
                if delta.tool_calls:
                    said.tool_calls = merge_tool_calls(said.tool_calls, delta.tool_calls)
                if delta.logprobs:
                    said.logprobs += delta.logprobs
        said.reasoning = "".join(reasoning)
        said.text = "".join(text)
        return said

    def _reasoning(self, event) -> str:
        if isinstance(event, ThinkingTokens):
            if not self.live:
                return ""
            key = (event.thread, event.index)
            self._streamed.add(key)
            if self._live_step != key:
                self._live_step = key
                return f"\n[thread {event.thread + 1} · step {event.index + 1}] {event.text}"
            return event.text
        self._live_step = None
        if isinstance(event, StepWritten):
            if (event.thread, event.index) in self._streamed:
                self._streamed.discard((event.thread, event.index))
                return "\n"
            revision = " · revision" if event.revision else ""
            return f"[thread {event.thread + 1} · step {event.index + 1}{revision}] {event.text}\n"
        if isinstance(event, StepChecked):
            return _verdict_line(event)
        if isinstance(event, StepDropped):
            return f"[thread {event.thread + 1} · step {event.index + 1} · dropped: {event.reason}]\n"
        if isinstance(event, Skipped):
            return f"[skipped {event.what}: {event.reason}]\n"
        if isinstance(event, ThreadEnded) and event.result.error:
            return f"[thread {event.result.thread + 1} · stopped: {event.result.error}]\n"
        return ""


def _verdict_line(event: StepChecked) -> str:
    verdict = event.verdict
    label = f"[thread {event.thread + 1} · step {event.index + 1}"
    if event.revising:
        text = f"{label} · failed validation, revising]\n"
        return text + "".join(f"  counterexample: {c}\n" for c in verdict.counterexamples)
    if event.flagged:
        return f"{label} · challenged (kept)]\n"
    status = verdict.status
    if status is VerdictStatus.PASSED:
        return f"{label} · {'passed, no counterexample found' if verdict.unchallenged else 'passed'}]\n"
    return f"{label} · {status.value}{f': {verdict.reason}' if verdict.reason else ''}]\n"
