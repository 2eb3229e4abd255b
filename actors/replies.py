"""Building one reply from pipeline events: answer, reasoning, chunk envelope, stats.

Plain Python (no Ray, no HTTP framework), used by the ingress for JSON and SSE replies alike.
"""

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import structlog

from actors.config import ServiceConfig
from actors.pipeline import AllThreadsFailed, DeepThinkingRun
from actors.protocol import APIError, ChatCompletionRequest, chunk_body, usage_by_role
from actors.reasoning import reasoning_text
from actors.schemas import FusionDelta, StepEvent

log = structlog.get_logger(__name__)


class Reply:
    """Accumulates one response: the answer, the reasoning, and the chunk envelope."""

    def __init__(self, request_id: str, chat: ChatCompletionRequest, config: ServiceConfig) -> None:
        self.id = f"chatcmpl-{request_id}"
        self.created = int(time.time())
        self.model = config.served_model_name
        self.stream = chat.stream
        self.include_usage = chat.include_usage
        self.show_reasoning = config.show_reasoning if chat.include_reasoning is None else chat.include_reasoning
        self.started = time.monotonic()
        self.content: list[str] = []
        self.reasoning: list[str] = []

    def add(self, event: StepEvent | FusionDelta) -> str:
        """Record an event; return the text a client should see now (may be empty)."""
        if isinstance(event, FusionDelta):
            self.content.append(event.text)
            return event.text
        if not self.show_reasoning:
            return ""
        text = reasoning_text(event)
        self.reasoning.append(text)
        return text

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return chunk_body(
            id=self.id,
            created=self.created,
            model=self.model,
            delta=delta,
            finish_reason=finish_reason,
            include_usage=self.include_usage,
        )


async def with_keepalives(events: AsyncIterator, interval: float) -> AsyncIterator:
    """Yield the events, and None whenever `interval` passes without one."""
    iterator = events.__aiter__()
    pending: asyncio.Future | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(iterator.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield None
                continue
            finished, pending = pending, None
            try:
                event = finished.result()
            except StopAsyncIteration:
                return
            yield event
    finally:
        if pending is not None:
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        await iterator.aclose()


def request_failed(exc: AllThreadsFailed, *, capacity: bool, retry_after_s: int) -> APIError:
    """The error for a request that produced no thread at all.

    `capacity`: the threads failed because our own replicas were lost or saturated, not because
    of the upstreams; retrying soon can help, so say so (503 + Retry-After).
    """
    if exc.deadline:
        return APIError(504, str(exc), type="timeout", code="deadline_exceeded", headers={"x-should-retry": "false"})
    if capacity:
        return APIError(
            503,
            f"The service is short of capacity right now, please retry: {exc}",
            type="service_unavailable",
            code="overloaded",
            headers={"Retry-After": str(retry_after_s)},
        )
    return APIError(
        502,
        str(exc),
        type="upstream_error",
        code="upstream_failed",
        # The SDK would retry a 502 twice; this request already retried its upstream calls.
        headers={"x-should-retry": "false"},
    )


def extension(run: DeepThinkingRun) -> dict[str, Any]:
    stats = run.stats
    return {
        "usage_by_role": usage_by_role(stats.usage),
        "threads_kept": stats.threads_kept,
        "threads_failed": [f.thread_index for f in stats.threads_failed],
        "steps_validated": stats.steps_validated,
        "steps_failed": stats.steps_failed,
        "steps_revised": stats.steps_revised,
        "fusion_fallback_thread": stats.fusion_fallback_thread,
    }


def log_request_complete(run: DeepThinkingRun, reply: Reply, outcome: str) -> None:
    stats = run.stats
    log.info(
        "request_complete",
        request_id=run.request_id,
        outcome=outcome,
        stream=reply.stream,
        elapsed_s=round(time.monotonic() - reply.started, 3),
        thinking_s=round(stats.thinking_s, 3),
        fusion_s=round(stats.fusion_s, 3),
        upstream_calls=stats.usage.calls,
        prompt_tokens=stats.usage.prompt_tokens,
        completion_tokens=stats.usage.completion_tokens,
        by_role=usage_by_role(stats.usage),
        threads_kept=stats.threads_kept,
        threads_failed=len(stats.threads_failed),
        steps_validated=stats.steps_validated,
        steps_failed=stats.steps_failed,
        steps_revised=stats.steps_revised,
    )
