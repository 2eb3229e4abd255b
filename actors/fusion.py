"""Fusion: many threads in, one answer out — the call that writes what the client reads.

Strategies (`fusion.strategy`): `intelligent` asks the fuser model to merge the threads (challenged
steps marked), with the client's answer-shaping fields (max_tokens, stop, response_format, tools,
logprobs, ...); `concat` joins the threads' conclusions and `majority` answers with the conclusion
most threads reached, both without a call.

When every thread reached the same `ANSWER:` (economy `agreement_shortcut`), `brief` fuses from
the conclusions only and `no_call` answers with the agreed conclusion itself (only for plain-text
answers: a shaped answer always needs the call). A budget too small for the full fusion uses the
brief one, then the best thread.

Failures: before any text, the best thread's conclusion is the answer (unless the answer must be
a tool call or JSON, which only the fuser can write). After text has been sent, a stream ends
with an error; a whole answer (`answer`, for JSON replies) is redone once, then falls back.
At the deadline the answer is cut (`finish_reason: "length"`), or if nothing was written yet the
best thread answers.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import structlog

from actors.model_client import ModelClient, describe_error
from actors.parsing import final_answer
from actors.prompts import PromptSet, fuser_messages
from actors.schemas import AnswerSpec, FusionDelta, FusionJob, ThreadResult, UsageLedger

log = structlog.get_logger(__name__)

# A fusion that would have fewer answer tokens than this under the budget is not worth the call.
MIN_ANSWER_TOKENS = 16


class FusionUnavailable(Exception):
    """The answer must come from the fuser model (a required tool call, JSON) and it could not."""


class FusionBroken(Exception):
    """The fuser failed after part of the answer was out."""

    def __init__(self, message: str, usage: UsageLedger | None = None) -> None:
        super().__init__(message)
        self.usage = usage or UsageLedger()


class Fuser:
    def __init__(self, prompts: PromptSet, client: ModelClient) -> None:
        self.prompts = prompts
        self.client = client

    async def fuse(self, job: FusionJob) -> AsyncIterator[FusionDelta]:
        """The answer as it is written; the last delta is `final`."""
        threads = [t for t in job.threads if t.steps]
        if not threads:
            raise ValueError("fusion needs at least one thread with a step")
        strategy = job.settings.fusion.strategy
        if strategy == "concat":
            yield _whole(concat_conclusions(threads), "concat")
            return
        if strategy == "majority":
            chosen = majority_thread(threads)
            yield _whole(chosen.conclusion, "majority", chosen.thread)
            return
        plan = self._plan(job, threads)
        if isinstance(plan, FusionDelta):
            yield plan
            return
        messages, params, mode = plan
        usage = UsageLedger()
        said = False
        finish: str | None = None
        pieces = self.client.stream(messages, usage, tag=job.request_id, params=params).__aiter__()
        try:
            while True:
                # Which timer fired tells a deadline cut from an upstream timeout: reading the wall
                # clock after an asyncio (monotonic) timer fires can land a hair before the deadline.
                cut = asyncio.timeout(_left(job.deadline))
                try:
                    async with cut:
                        piece = await pieces.__anext__()
                except StopAsyncIteration:
                    break
                finish = piece.finish_reason or finish
                if piece.text or piece.tool_calls or piece.logprobs:
                    said = said or bool(piece.text or piece.tool_calls)
                    yield FusionDelta(piece.text, piece.tool_calls, piece.logprobs)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the upstream's failure: degrade or report
            if isinstance(exc, TimeoutError) and cut.expired():
                log.warning("fusion_cut_at_deadline", said_anything=said)
                if said:
                    yield FusionDelta(finish_reason="length", usage=usage, final=True, mode=mode, reason="deadline")
                else:
                    yield self._fallback(job, threads, usage, "deadline")
                return
            if said:
                raise FusionBroken(f"the fuser failed mid-answer: {describe_error(exc)}", usage) from exc
            log.warning("fusion_failed_using_best_thread", error=describe_error(exc))
            yield self._fallback(job, threads, usage, describe_error(exc))
            return
        finally:
            await pieces.aclose()
        yield FusionDelta(finish_reason=finish or "stop", usage=usage, final=True, mode=mode)

    async def answer(self, job: FusionJob) -> FusionDelta:
        """The whole answer in one delta (for JSON replies): a fusion that fails midway is redone
        once, then the best thread answers."""
        spent = UsageLedger()
        restarted = False
        while True:
            whole = FusionDelta()
            try:
                async for delta in self.fuse(job):
                    merge_delta(whole, delta)
            except FusionBroken as exc:
                spent.merge(exc.usage)
                if not restarted and job.can_restart and _left(job.deadline) != 0:
                    log.warning("fusion_failed_midway_restarting", error=str(exc))
                    restarted = True
                    continue
                threads = [t for t in job.threads if t.steps]
                whole = self._fallback(job, threads, UsageLedger(), str(exc))
            spent.merge(whole.usage)
            whole.usage, whole.restarted = spent, restarted
            return whole

    def _plan(self, job: FusionJob, threads: list[ThreadResult]) -> tuple[list, dict[str, Any], str] | FusionDelta:
        """The fuser call to make (messages, request fields, mode), or an answer without one."""
        economy = job.settings.economy
        answer = job.answer
        agreed = agreed_thread(threads) if economy.agreement_shortcut != "off" else None
        if agreed is not None and economy.agreement_shortcut == "no_call" and not answer.constrained:
            return _whole(agreed.conclusion, "agreed", agreed.thread)
        cache_friendly = economy.cache_friendly_prompts
        configured = self.client.model.max_tokens
        max_tokens = min(answer.params.get("max_tokens") or configured, configured)
        candidates = []
        if agreed is None:
            candidates.append(("fused", self.prompts.fuser_task.format(threads=self.render_threads(threads))))
        brief = agreed or max(threads, key=ThreadResult.quality)
        candidates.append(("brief", self.prompts.fuser_brief_task.format(conclusion=brief.conclusion)))
        for mode, task in candidates:
            messages = fuser_messages(self.prompts, job.conversation, task, cache_friendly=cache_friendly)
            tokens = max_tokens
            if job.budget_tokens is not None:
                tokens = min(max_tokens, job.budget_tokens - self.client.estimate_prompt(messages))
                if tokens < min(MIN_ANSWER_TOKENS, max_tokens):
                    continue
            return messages, {**answer.params, "max_tokens": tokens}, mode
        return self._fallback(job, threads, UsageLedger(), "budget")

    def _fallback(self, job: FusionJob, threads: list[ThreadResult], usage: UsageLedger, reason: str) -> FusionDelta:
        return best_thread_answer(threads, job.answer, usage, reason)

    def render_threads(self, threads: list[ThreadResult]) -> str:
        p = self.prompts
        blocks = []
        for number, thread in enumerate(threads, start=1):
            steps = "\n".join(
                p.fuser_step.format(
                    step_number=s.index + 1, challenged=p.challenged_label if s.flagged else "", text=s.text
                )
                for s in thread.steps
            )
            blocks.append(p.fuser_thread.format(thread_number=number, steps=steps))
        return "\n\n".join(blocks)


def best_thread_answer(threads, answer: AnswerSpec, usage: UsageLedger, reason: str) -> FusionDelta:
    """The best thread's conclusion as the answer: what fusion falls back to."""
    if answer.structured:
        raise FusionUnavailable(
            "the answer must be written by the fuser model (a required tool call or JSON), "
            f"which could not answer ({reason})"
        )
    best = max(threads, key=ThreadResult.quality)
    return FusionDelta(
        text=best.conclusion,
        finish_reason="stop",
        usage=usage,
        final=True,
        mode="best_thread",
        thread=best.thread,
        reason=reason,
    )


def _whole(text: str, mode: str, thread: int | None = None) -> FusionDelta:
    return FusionDelta(text=text, finish_reason="stop", usage=UsageLedger(), final=True, mode=mode, thread=thread)


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.time())


def concat_conclusions(threads: list[ThreadResult]) -> str:
    if len(threads) == 1:
        return threads[0].conclusion
    return "\n\n".join(f"[{n}] {t.conclusion}" for n, t in enumerate(threads, start=1))


def _answer_key(thread: ThreadResult) -> str:
    return final_answer(thread.conclusion) or " ".join(thread.conclusion.split()).casefold()


def agreed_thread(threads: list[ThreadResult]) -> ThreadResult | None:
    """The best thread, if every thread stated the same `ANSWER:` in its last step."""
    answers = {final_answer(t.conclusion) for t in threads}
    if len(answers) != 1 or None in answers:
        return None
    return max(threads, key=ThreadResult.quality)


def majority_thread(threads: list[ThreadResult]) -> ThreadResult:
    """The best of the threads whose answer most threads share."""
    counts = Counter(_answer_key(t) for t in threads)
    return max(threads, key=lambda t: (counts[_answer_key(t)], t.quality()))


def merge_delta(into: FusionDelta, delta: FusionDelta) -> None:
    """Fold `delta` into `into` (pieces that travel or are returned together)."""
    into.text += delta.text
    if delta.tool_calls:
        into.tool_calls = merge_tool_calls(into.tool_calls or [], delta.tool_calls)
    if delta.logprobs:
        into.logprobs = (into.logprobs or []) + delta.logprobs
    if delta.final:
        into.final, into.finish_reason, into.mode = True, delta.finish_reason, delta.mode
        into.thread, into.reason, into.restarted = delta.thread, delta.reason, delta.restarted
        into.usage = delta.usage


def merge_tool_calls(calls: list[dict[str, Any]], pieces: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stream pieces of tool calls, merged by `index`: id, type and name from the first piece of
    a call, `arguments` concatenated in order."""
    merged = [dict(c, function=dict(c.get("function") or {})) for c in calls]
    by_index = {c.get("index", i): c for i, c in enumerate(merged)}
    for piece in pieces:
        index = piece.get("index", 0)
        call = by_index.get(index)
        function = piece.get("function") or {}
        if call is None:
            call = {k: v for k, v in piece.items() if k != "function"}
            call["function"] = {"name": function.get("name", ""), "arguments": function.get("arguments") or ""}
            by_index[index] = call
            merged.append(call)
            continue
        for key in ("id", "type"):
            if piece.get(key) and not call.get(key):
                call[key] = piece[key]
        if function.get("name") and not call["function"].get("name"):
            call["function"]["name"] = function["name"]
        call["function"]["arguments"] = (call["function"].get("arguments") or "") + (function.get("arguments") or "")
    return merged
