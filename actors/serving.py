"""Serving chat completions: from request bytes to an OpenAI reply, JSON or SSE.

The one place that knows how a reply is built (as vLLM's `serving_chat.py`): the request is
checked before any upstream call (`prepare`), the pipeline runs (`actors/pipeline.py`), and its
events become the answer, the live reasoning, the usage and the `token_killer` extension field.
For a stream, the first event is awaited (up to one keepalive interval) before choosing between
an HTTP error and SSE, so failures that come early get their real status. No Ray, no HTTP
framework here: `deployments/ingress.py` binds the pipeline to handles and serves the result.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from actors.config import ServiceConfig, SettingsError, request_settings
from actors.fusion import MIN_ANSWER_TOKENS, FusionBroken, FusionUnavailable, merge_tool_calls
from actors.model_client import DEFAULT_TOKENS_PER_CHAR, prompt_chars
from actors.pipeline import DeepThinkingRun, Fuse, NothingToFuse, RunPlan, Think
from actors.prompts import PromptSet, fuser_messages, render_tools, role_messages
from actors.protocol import (
    APIError,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    CompletionTokensDetails,
    Delta,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    ResponseMessage,
    Usage,
    answer_params,
    parse_request,
)
from actors.schemas import (
    AnswerSpec,
    Conversation,
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

log = structlog.get_logger(__name__)

FUSER_ROLE = "fuser"
# SSE writes less than this apart are merged (each is a message to the HTTP proxy); the first
# write of a quiet spell goes at once.
SSE_SPACING_S = 0.02
# Events a client sees as the stream's start: a step, its tokens, or the answer.
_SHOWS = (StepWritten, ThinkingTokens, FusionDelta)


@dataclass
class Prepared:
    """A request that passed every check, with what its reply needs."""

    request_id: str
    chat: ChatCompletionRequest
    profile: str
    plan: RunPlan
    show_reasoning: bool
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.id = f"chatcmpl-{self.request_id}"


Finished = Callable[[Prepared, DeepThinkingRun, str], None]


class ChatServing:
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
            raise self._unknown_model(model_id)
        return ModelCard(id=model_id)

    def _unknown_model(self, model_id: str) -> APIError:
        available = ", ".join(f"'{name}'" for name in self.config.profiles)
        return APIError(
            404,
            f"The model '{model_id}' does not exist. Available: {available}.",
            param="model",
            code="model_not_found",
        )

    # --- checking a request ------------------------------------------------------------------

    def prepare(self, raw: bytes, request_id: str) -> Prepared:
        """Everything that can fail fast fails here, before any upstream call."""
        limits = self.config.limits
        chat = parse_request(raw)
        profile = self.config.profile_settings.get(chat.model)
        if profile is None:
            raise self._unknown_model(chat.model)
        self._enforce_limits(chat)
        try:
            settings = request_settings(profile, chat.token_killer, limits)
        except SettingsError as exc:
            raise APIError(400, str(exc), param=exc.param) from None
        answer = AnswerSpec(answer_params(chat))
        if settings.fusion.strategy != "intelligent" and answer.structured:
            param = "tool_choice" if answer.tools_required else "response_format"
            raise APIError(
                400,
                f"The '{chat.model}' profile answers without the fuser model (fusion.strategy: "
                f"{settings.fusion.strategy}), which cannot call tools or write JSON; use another profile.",
                param=param,
            )
        conversation = self._conversation(chat)
        fusion_tokens = self._check_budget(settings, conversation, answer)
        seconds = min(chat.deadline_s or limits.deadline_s, limits.deadline_s)
        deadline = time.time() + seconds
        plan = RunPlan(
            request_id=request_id,
            conversation=conversation,
            settings=settings,
            answer=answer,
            deadline=deadline,
            thinking_stop_at=deadline - min(limits.fusion_reserve_s, seconds / 2),  # a short one still thinks
            fusion_budget_tokens=fusion_tokens,
            can_restart_fusion=not chat.stream,
        )
        show = self.config.show_reasoning if chat.include_reasoning is None else chat.include_reasoning
        return Prepared(request_id, chat, chat.model, plan, show)

    def _enforce_limits(self, chat: ChatCompletionRequest) -> None:
        limits = self.config.limits
        if len(chat.messages) > limits.max_messages:
            raise APIError(
                400,
                f"Too many messages: {len(chat.messages)}; this service takes at most {limits.max_messages}.",
                param="messages",
                code="too_many_messages",
            )
        total = sum(len(m.text()) for m in chat.messages)
        if total > limits.max_total_chars:
            raise APIError(
                400,
                f"The messages hold {total} characters; this service takes at most {limits.max_total_chars}.",
                param="messages",
                code="context_length_exceeded",
            )

    def _conversation(self, chat: ChatCompletionRequest) -> Conversation:
        """Every message counts: system/developer text, earlier turns, tool calls and results."""
        system = "\n\n".join(m.text() for m in chat.messages if m.role in ("system", "developer") and m.text())
        turns: list[tuple[str, str]] = []
        question_at = 0
        for message in chat.messages:
            if message.role in ("system", "developer"):
                continue
            text = message.text()
            if message.role == "user":
                question_at = len(turns)
                turns.append(("user", text))
            elif message.role == "assistant":
                calls = "".join(
                    f"\n[called tool {c.function.name} with {c.function.arguments}]" for c in message.tool_calls or ()
                )
                turns.append(("assistant", (text + calls).strip()))
            else:
                turns.append(("user", f"[result of tool call {message.tool_call_id}] {text}"))
        tools = ""
        if chat.tools and chat.tool_choice != "none":
            tools = render_tools(self.prompts.tools_header, [t.model_dump() for t in chat.tools])
        return Conversation(
            question=turns[question_at][1],
            system=system,
            turns=tuple(turns),
            question_at=question_at,
            tools=tools,
            messages=tuple(m.wire() for m in chat.messages),
        )

    def _check_budget(self, settings, conversation: Conversation, answer: AnswerSpec) -> int | None:
        """Tokens kept aside for fusion; a budget too small for one thinking call and the least
        fusion is refused, saying the minimum."""
        budget = settings.budget_tokens
        if budget is None:
            return None
        models = self.config.models

        def estimate(messages: list[dict]) -> int:
            return int(prompt_chars(messages) * DEFAULT_TOKENS_PER_CHAR) + 8

        cache_friendly = settings.economy.cache_friendly_prompts
        thinker = role_messages(
            self.prompts,
            conversation,
            self.prompts.thinker_system,
            self.prompts.thinker_task.format(context="", step_number=1),
            cache_friendly=cache_friendly,
        )
        thinking = estimate(thinker) + models["thinker"].max_tokens
        fusion = 0
        if settings.fusion.strategy == "intelligent":
            conclusion = "x" * int(models["thinker"].max_tokens / DEFAULT_TOKENS_PER_CHAR)
            brief = fuser_messages(
                self.prompts,
                conversation,
                self.prompts.fuser_brief_task.format(conclusion=conclusion),
                cache_friendly=cache_friendly,
            )
            answer_tokens = min(
                answer.params.get("max_tokens") or models["fuser"].max_tokens, models["fuser"].max_tokens
            )
            fusion = estimate(brief) + answer_tokens
            floor = estimate(brief) + min(MIN_ANSWER_TOKENS, answer_tokens)
        else:
            floor = 0
        minimum = thinking + floor
        if budget < minimum:
            raise APIError(
                400,
                f"'token_killer.budget_tokens' is {budget}; this request needs at least {minimum} "
                f"(one thinking call and the fusion).",
                param="token_killer.budget_tokens",
                code="budget_too_small",
            )
        return min(fusion, budget - thinking)

    # --- replying ----------------------------------------------------------------------------

    def run(self, prepared: Prepared) -> DeepThinkingRun:
        if prepared.chat.stream:
            return DeepThinkingRun(prepared.plan, self.think_stream, self.fuse_stream)
        return DeepThinkingRun(prepared.plan, self.think_whole, self.fuse_whole)

    async def complete(self, prepared: Prepared) -> ChatCompletion:
        """A JSON reply: the whole run, then one body."""
        run = self.run(prepared)
        reply = _Reply(prepared, live=False)
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
        return reply.completion(run, self._extension(prepared, run))

    async def stream(self, prepared: Prepared) -> AsyncIterator[str]:
        """SSE lines. The first events are awaited here (an error before them raises APIError,
        for a real status code); the returned iterator sends them and the rest."""
        run = self.run(prepared)
        reply = _Reply(prepared, live=True)
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
        return self._sse(prepared, run, reply, first, events)

    async def _sse(self, prepared, run, reply: _Reply, first: list, events: AsyncIterator[list]) -> AsyncIterator[str]:
        # One write per batch of events: each write is a message from this replica to the HTTP
        # proxy, so the role chunk goes with the first events and the end in one piece.
        outcome = "cancelled"
        opening = reply.sse(Delta(role="assistant", content=""))
        ending = ""
        try:
            batch: list | None = first
            while batch is not None:
                text = opening + ("".join(reply.sse_batch(batch)) if batch else ": keepalive\n\n")
                opening = ""
                if text:
                    yield text
                batch = await anext(events, None)
            ending = reply.sse(Delta(), finish_reason=reply.finish_reason)
            if prepared.chat.include_usage:
                ending += reply.usage_chunk(run, self._extension(prepared, run))
            outcome = "ok"
        except Exception as exc:  # noqa: BLE001 - the status is sent; report in-band
            outcome = "failed"
            ending = opening + "data: " + self.error_for(exc, prepared.request_id).response().model_dump_json() + "\n\n"
        finally:
            await events.aclose()
            self._finish(prepared, run, outcome)
        yield ending + "data: [DONE]\n\n"

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

    def _extension(self, prepared: Prepared, run: DeepThinkingRun) -> dict[str, Any]:
        stats = run.stats
        fusion = stats.fusion or FusionDelta()
        return {
            "profile": prepared.profile,
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
            outcome=outcome,
            stream=prepared.chat.stream,
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
            user=prepared.chat.user or prepared.chat.safety_identifier,
            metadata=prepared.chat.metadata,
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


def usage_of(usage: UsageLedger) -> Usage:
    """Exact sums of what the upstreams reported. Reasoning = every completion but the fuser's."""
    fuser = usage.roles.get(FUSER_ROLE)
    completion = usage.completion_tokens
    return Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=completion,
        total_tokens=usage.prompt_tokens + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=usage.cached_tokens),
        completion_tokens_details=CompletionTokensDetails(
            reasoning_tokens=completion - (fuser.completion_tokens if fuser else 0)
        ),
    )


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


class _Reply:
    """One response being built: answer, reasoning, tool calls, logprobs, finish reason."""

    def __init__(self, prepared: Prepared, *, live: bool) -> None:
        self.prepared = prepared
        self.live = live
        self.show_reasoning = prepared.show_reasoning
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.tool_calls: list[dict[str, Any]] = []
        self.logprobs: list[dict[str, Any]] = []
        self.finish_reason = "stop"
        self._live_step: tuple[int, int] | None = None  # the step whose tokens streamed last
        self._streamed: set[tuple[int, int]] = set()

    # --- events to text ----------------------------------------------------------------------

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

    # --- JSON --------------------------------------------------------------------------------

    def completion(self, run: DeepThinkingRun, extension: dict[str, Any]) -> ChatCompletion:
        """Dumped with exclude_unset: fields OpenAI always sends are set (null or not); the
        reasoning and tool calls only when there are any."""
        prepared = self.prepared
        content = "".join(self.content)
        message = ResponseMessage(
            role="assistant", content=content if content or not self.tool_calls else None, refusal=None
        )
        if self.show_reasoning:
            message.reasoning_content = "".join(self.reasoning)
        if self.tool_calls:
            message.tool_calls = self.tool_calls
        choice = Choice(
            index=0,
            message=message,
            finish_reason=self.finish_reason,
            logprobs={"content": self.logprobs} if self.logprobs else None,
        )
        return ChatCompletion(
            id=prepared.id,
            object="chat.completion",
            created=prepared.created,
            model=prepared.profile,
            choices=[choice],
            usage=usage_of(run.stats.usage),
            token_killer=extension,
        )

    # --- SSE ---------------------------------------------------------------------------------

    def sse(self, delta: Delta, *, finish_reason: str | None = None, logprobs: list | None = None) -> str:
        # Dumped with exclude_unset: a delta carries only what it sets ({"content": "x"}), while
        # finish_reason, logprobs and (with include_usage) usage are always there, null or not.
        prepared = self.prepared
        choice = ChunkChoice(
            index=0, delta=delta, finish_reason=finish_reason, logprobs={"content": logprobs} if logprobs else None
        )
        fields: dict[str, Any] = {
            "id": prepared.id,
            "object": "chat.completion.chunk",
            "created": prepared.created,
            "model": prepared.profile,
            "choices": [choice],
        }
        if prepared.chat.include_usage:
            fields["usage"] = None  # only the final usage chunk carries it
        return f"data: {ChatCompletionChunk(**fields).model_dump_json(exclude_unset=True)}\n\n"

    def sse_batch(self, batch: list) -> list[str]:
        """A batch of events as at most two chunks: reasoning first, then the answer (never both
        in one chunk, as reasoning APIs do)."""
        reasoning, text, calls, logprobs = [], [], [], []
        for event in batch:
            said, delta = self.add(event)
            if said:
                reasoning.append(said)
            if delta is not None:
                text.append(delta.text)
                if delta.tool_calls:
                    calls = merge_tool_calls(calls, delta.tool_calls)
                if delta.logprobs:
                    logprobs += delta.logprobs
        lines = []
        if reasoning:
            lines.append(self.sse(Delta(reasoning_content="".join(reasoning))))
        content = "".join(text)
        if content or calls or logprobs:
            delta = Delta(content=content) if content else Delta()
            if calls:
                delta.tool_calls = calls
            lines.append(self.sse(delta, logprobs=logprobs))
        return lines

    def usage_chunk(self, run: DeepThinkingRun, extension: dict[str, Any]) -> str:
        prepared = self.prepared
        chunk = ChatCompletionChunk(
            id=prepared.id,
            created=prepared.created,
            model=prepared.profile,
            choices=[],
            usage=usage_of(run.stats.usage),
            token_killer=extension,
        )
        return f"data: {chunk.model_dump_json()}\n\n"


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
