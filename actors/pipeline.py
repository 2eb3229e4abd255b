"""One deep-thinking request: its threads' thinking, then fusion, as one stream of events.

The pipeline knows nothing of Ray or HTTP. It receives two callables — `think` (an async iterator
of `ThinkUpdate`s for every thread of the request) and `fuse` (an async iterator of
`FusionDelta`s) — which the ingress binds to deployment handles and the unit tests bind to the
role classes directly.

Deadlines and usage: thinking stops itself at `stop_at` and reports every token it spent; the
pipeline only cuts a stream that overruns its own deadline by `GRACE_S` (a lost replica), and
counts that work as aborted. Leaving the iteration early (a client disconnect) cancels everything
still running.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace

import structlog

from actors.config import RunSettings
from actors.fusion import FusionBroken, FusionUnavailable, best_thread_answer
from actors.schemas import (
    AnswerSpec,
    Conversation,
    FusionDelta,
    FusionJob,
    Skipped,
    Step,
    StepChecked,
    StepDropped,
    StepWritten,
    ThinkEvent,
    ThinkJob,
    ThinkUpdate,
    ThreadEnded,
    ThreadResult,
    UsageLedger,
    VerdictStatus,
)

log = structlog.get_logger(__name__)

Think = Callable[[ThinkJob], AsyncIterator[ThinkUpdate]]
Fuse = Callable[[FusionJob], AsyncIterator[FusionDelta]]

# How long past its own deadline a stage may take to report before it is cut from here.
GRACE_S = 1.0


class NothingToFuse(Exception):
    """No thread produced a step; the message names the cause."""

    def __init__(self, message: str, *, deadline: bool = False, capacity: bool = False) -> None:
        super().__init__(message)
        self.deadline = deadline  # the deadline came before any step was written
        self.capacity = capacity  # our own replicas were lost or saturated, not the upstreams


class StageLost(Exception):
    """A Thinker or Fuser replica was lost or refused the work after it had started reporting;
    raised by the handle bindings, carrying the cause for the log."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(type(cause).__name__)
        self.cause = cause


@dataclass
class RunStats:
    """What `request_complete` logs and the response's extension field reports."""

    usage: UsageLedger = field(default_factory=UsageLedger)
    threads_kept: int = 0
    threads_failed: dict[int, str] = field(default_factory=dict)
    steps_validated: int = 0
    steps_failed: int = 0
    steps_revised: int = 0
    steps_flagged: int = 0
    steps_unchallenged: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    fusion: FusionDelta | None = None  # the final delta: mode, thread, reason, finish
    thinking_s: float = 0.0
    fusion_s: float = 0.0
    thinking_cut: bool = False


@dataclass(frozen=True)
class RunPlan:
    request_id: str
    conversation: Conversation
    settings: RunSettings
    answer: AnswerSpec
    deadline: float  # time.time()
    thinking_stop_at: float  # time.time()
    fusion_budget_tokens: int | None  # kept aside from the budget for fusion; None: unbounded
    can_restart_fusion: bool


class DeepThinkingRun:
    def __init__(self, plan: RunPlan, think: Think, fuse: Fuse) -> None:
        self.plan = plan
        self.think = think
        self.fuse = fuse
        self.stats = RunStats()

    async def events(self) -> AsyncIterator[ThinkEvent | FusionDelta]:
        plan = self.plan
        started = time.monotonic()
        budget = plan.settings.budget_tokens
        job = ThinkJob(
            plan.request_id,
            plan.conversation,
            plan.settings,
            stop_at=plan.thinking_stop_at,
            budget_tokens=None if budget is None else budget - (plan.fusion_budget_tokens or 0),
        )
        results: dict[int, ThreadResult] = {}
        partial = _PartialThreads()
        error: BaseException | None = None
        try:
            async for update in _within(self.think(job), plan.thinking_stop_at + GRACE_S):
                self.stats.usage.merge(update.usage)
                for event in update.events:
                    self._count(event)
                    partial.see(event)
                    if isinstance(event, ThreadEnded):
                        results[event.result.thread] = event.result
                    yield event
        except TimeoutError:
            self.stats.thinking_cut = True
            self.stats.usage.record_aborted("thinker", 0.0)
            log.warning("thinking_overran_its_deadline", request_id=plan.request_id)
        except StageLost as exc:
            error = exc.cause
            log.warning("thinker_lost_midway_fusing_what_arrived", error=type(exc.cause).__name__)
        except Exception as exc:
            if not partial.threads:
                raise
            # A Thinker that failed unexpectedly after reporting steps: fuse what arrived.
            log.error("thinking_failed_fusing_what_arrived", exc_info=exc)
        self.stats.thinking_s = time.monotonic() - started

        threads = tuple(results.get(i) or partial.result(i) for i in sorted(set(results) | partial.threads))
        # What fusion needs of a thread: its steps' text and whether they were challenged.
        kept = tuple(
            ThreadResult(t.thread, [replace(s, verdict=None) for s in t.steps], t.error) for t in threads if t.steps
        )
        self.stats.threads_kept = len(kept)
        if not kept:
            raise self._nothing_to_fuse(threads, error)

        started = time.monotonic()
        fusion = FusionJob(
            plan.request_id,
            plan.conversation,
            kept,
            plan.settings,
            plan.answer,
            deadline=plan.deadline,
            budget_tokens=None if budget is None else max(0, budget - self.stats.usage.total_tokens),
            can_restart=plan.can_restart_fusion,
        )
        said = False
        try:
            async for delta in _within(self.fuse(fusion), plan.deadline + GRACE_S):
                said = said or bool(delta.text or delta.tool_calls)
                if delta.final:
                    self.stats.usage.merge(delta.usage)
                    self.stats.fusion = delta
                yield delta
        except TimeoutError:
            self.stats.usage.record_aborted("fuser", 0.0)
            yield self._fused(FusionDelta(finish_reason="length", final=True, mode="fused", reason="deadline"))
        except FusionBroken as exc:
            self.stats.usage.merge(exc.usage)  # the broken call is on the record all the same
            raise
        except FusionUnavailable:
            raise
        except Exception as exc:
            # The Fuser replica was lost (the call was retried on another replica while nothing
            # had been said) or failed unexpectedly: degrade to the best thread, unless part of
            # the answer is already out.
            if said:
                raise FusionBroken("the fuser failed mid-answer", UsageLedger()) from exc
            cause = exc.cause if isinstance(exc, StageLost) else exc
            log.warning("fuser_failed_using_best_thread", error=type(cause).__name__, exc_info=cause)
            yield self._fused(best_thread_answer(kept, plan.answer, UsageLedger(), "fuser unavailable"))
        finally:
            self.stats.fusion_s = time.monotonic() - started

    def _fused(self, final: FusionDelta) -> FusionDelta:
        self.stats.fusion = final
        return final

    def _nothing_to_fuse(self, threads: tuple[ThreadResult, ...], error: BaseException | None) -> NothingToFuse:
        if error is not None:
            return NothingToFuse("the thinking replica was lost before any step was written", capacity=True)
        if self.stats.thinking_cut or (self.stats.skipped and all(s.reason == "deadline" for s in self.stats.skipped)):
            return NothingToFuse("the request deadline came before any reasoning step was written", deadline=True)
        causes = "; ".join(sorted({t.error for t in threads if t.error})) or "no steps were written"
        return NothingToFuse(f"every reasoning thread failed: {causes}")

    def _count(self, event: ThinkEvent) -> None:
        stats = self.stats
        if isinstance(event, StepChecked):
            verdict = event.verdict
            if verdict.status in (VerdictStatus.PASSED, VerdictStatus.FAILED):
                stats.steps_validated += 1
                stats.steps_failed += verdict.failed
                stats.steps_unchallenged += verdict.unchallenged
            stats.steps_flagged += event.flagged
        elif isinstance(event, StepWritten):
            stats.steps_revised += event.revision
        elif isinstance(event, Skipped):
            stats.skipped.append(event)
        elif isinstance(event, ThreadEnded) and event.result.error:
            stats.threads_failed[event.result.thread] = event.result.error


class _PartialThreads:
    """Threads as far as their events tell, for when the Thinker is lost before it ends them."""

    def __init__(self) -> None:
        self.steps: dict[int, dict[int, Step]] = {}

    @property
    def threads(self) -> set[int]:
        return set(self.steps)

    def see(self, event: ThinkEvent) -> None:
        if isinstance(event, StepWritten):
            self.steps.setdefault(event.thread, {})[event.index] = Step(event.index, event.text, complete=False)
        elif isinstance(event, StepDropped):
            self.steps.get(event.thread, {}).pop(event.index, None)
        elif isinstance(event, StepChecked) and event.flagged:
            step = self.steps.get(event.thread, {}).get(event.index)
            if step is not None:
                step.flagged = True

    def result(self, thread: int) -> ThreadResult:
        written = self.steps.get(thread, {})
        steps = []
        for index in sorted(written):
            if index != len(steps):
                break
            steps.append(written[index])
        return ThreadResult(thread, steps, error="the thinking replica was lost")


async def _within(stream: AsyncIterator, until: float) -> AsyncIterator:
    """`stream`'s items until wall-clock time `until`; then TimeoutError (the stream is closed)."""
    iterator = stream.__aiter__()
    try:
        while True:
            try:
                item = await asyncio.wait_for(iterator.__anext__(), max(0.0, until - time.time()))
            except StopAsyncIteration:
                return
            yield item
    finally:
        await iterator.aclose()
