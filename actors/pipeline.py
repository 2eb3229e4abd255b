"""One deep-thinking request: threads in parallel, then fusion, as one stream of events.

The pipeline knows nothing of Ray or HTTP. It receives two callables — run a thread (an async
iterator of `StepEvent`s) and fuse (an async iterator of `FusionDelta`s) — which the ingress binds
to deployment handles and the unit tests bind to the role classes directly.

Events come out in the order they happen across threads, so a caller can stream reasoning live.
Leaving the iteration early (a client disconnect) cancels every thread still running.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import structlog

from actors.schemas import (
    Conversation,
    FusionDelta,
    FusionJob,
    StepEvent,
    ThreadJob,
    ThreadResult,
    UsageLedger,
    VerdictStatus,
)

log = structlog.get_logger(__name__)

RunThread = Callable[[ThreadJob], AsyncIterator[StepEvent]]
Fuse = Callable[[FusionJob], AsyncIterator[FusionDelta]]


class AllThreadsFailed(Exception):
    """No thread produced a step; the message names the cause, `errors` holds each thread's."""

    def __init__(self, message: str, errors: list[BaseException], deadline: bool = False) -> None:
        super().__init__(message)
        self.errors = errors
        self.deadline = deadline  # the deadline came before any step finished


@dataclass
class ThreadFailure:
    thread_index: int
    error: str


@dataclass
class RunStats:
    """What `request_complete` logs and the response's extension field reports."""

    usage: UsageLedger = field(default_factory=UsageLedger)
    threads_kept: int = 0
    threads_failed: list[ThreadFailure] = field(default_factory=list)
    steps_validated: int = 0
    steps_failed: int = 0
    steps_revised: int = 0
    fusion_fallback_thread: int | None = None
    thinking_s: float = 0.0
    fusion_s: float = 0.0


@dataclass
class _ThreadEnded:
    thread_index: int
    error: BaseException | None


class DeepThinkingRun:
    def __init__(
        self,
        request_id: str,
        conversation: Conversation,
        num_threads: int,
        run_thread: RunThread,
        fuse: Fuse,
        thinking_deadline: float | None = None,
    ) -> None:
        self.request_id = request_id
        self.conversation = conversation
        self.num_threads = num_threads
        self.run_thread = run_thread
        self.fuse = fuse
        # Wall-clock time (time.time()) at which thinking stops and fusion starts regardless.
        self.thinking_deadline = thinking_deadline
        self.stats = RunStats()

    async def events(self) -> AsyncIterator[StepEvent | FusionDelta]:
        started = time.monotonic()
        steps: dict[int, list] = {i: [] for i in range(self.num_threads)}
        failed: set[int] = set()
        queue: asyncio.Queue[StepEvent | _ThreadEnded] = asyncio.Queue()
        errors: list[BaseException] = []
        pumps = [
            asyncio.ensure_future(
                self._pump(ThreadJob(self.request_id, i, self.conversation, self.thinking_deadline), queue)
            )
            for i in range(self.num_threads)
        ]
        cut_short = False
        try:
            running = self.num_threads
            while running:
                try:
                    item = await asyncio.wait_for(queue.get(), self._until_deadline())
                except asyncio.TimeoutError:
                    cut_short = True  # threads still running are stopped; fuse what exists
                    log.warning("thinking_deadline_reached", request_id=self.request_id, running=running)
                    break
                if isinstance(item, _ThreadEnded):
                    running -= 1
                    if item.error is not None:
                        failed.add(item.thread_index)
                        errors.append(item.error)
                        self._thread_failed(item)
                    continue
                self._count(item)
                if not item.rejected:
                    steps[item.thread_index].append(item.step)
                yield item
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
        self.stats.thinking_s = time.monotonic() - started

        kept = tuple(
            ThreadResult(i, s) for i, s in steps.items() if s and i not in failed
        )
        self.stats.threads_kept = len(kept)
        if not kept:
            if cut_short:
                raise AllThreadsFailed("the request deadline came before any reasoning step finished", errors, True)
            causes = "; ".join(f.error for f in self.stats.threads_failed) or "no steps produced"
            raise AllThreadsFailed(f"every reasoning thread failed: {causes}", errors)

        started = time.monotonic()
        async for delta in self.fuse(FusionJob(self.request_id, self.conversation, kept)):
            if delta.usage is not None:
                self.stats.usage.merge(delta.usage)
            if delta.fallback_from_thread is not None:
                self.stats.fusion_fallback_thread = delta.fallback_from_thread
            yield delta
        self.stats.fusion_s = time.monotonic() - started

    def _until_deadline(self) -> float | None:
        if self.thinking_deadline is None:
            return None
        return max(0.0, self.thinking_deadline - time.time())

    async def _pump(self, job: ThreadJob, queue: asyncio.Queue) -> None:
        error: BaseException | None = None
        try:
            async for event in self.run_thread(job):
                queue.put_nowait(event)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a failed thread is dropped, not fatal
            error = exc
        queue.put_nowait(_ThreadEnded(job.thread_index, error))

    def _count(self, event: StepEvent) -> None:
        self.stats.usage.merge(event.usage)
        verdict = event.step.verdict
        if verdict is not None and verdict.status is not VerdictStatus.UNVALIDATED:
            self.stats.steps_validated += 1
            self.stats.steps_failed += verdict.failed
        self.stats.steps_revised += event.step.revised and not event.rejected

    def _thread_failed(self, ended: _ThreadEnded) -> None:
        error = str(ended.error) or type(ended.error).__name__
        self.stats.threads_failed.append(ThreadFailure(ended.thread_index, error))
        log.warning("thread_failed", request_id=self.request_id, thread=ended.thread_index, error=error)
