"""The thinking of one request: its threads in parallel, every step validated, with speculation.

As soon as step k is written it is reported (`StepWritten`), its validation starts, and step k+1
is written on the assumption that k passes (each written step starts its own validation and its
successor). If k fails (and `on_fail` is `revise`) every speculative step after it is dropped —
their upstream calls are aborted — and step k is redone once with the counterexamples as
feedback. When steps pass, a thread takes as long as its thinking calls plus the last step's
validation.

Stopping is cooperative, so that every token spent is reported: at `stop_at` no new work starts,
running calls are cut by their own deadline (the validators cut theirs too), and the last update
carries all the usage. A token budget, when set, is checked before every call (see
actors/budget.py); what does not fit is not started and is reported as `Skipped`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import structlog

from actors.budget import Reservation, TokenBudget
from actors.context import ContextBuilder
from actors.model_client import DeadlineReached, ModelClient, describe_error
from actors.parsing import parse_step
from actors.prompts import PromptSet, role_messages
from actors.schemas import (
    Skipped,
    Step,
    StepChecked,
    StepDropped,
    StepWritten,
    ThinkEvent,
    ThinkingTokens,
    ThinkJob,
    ThinkUpdate,
    ThreadEnded,
    ThreadResult,
    UsageLedger,
    ValidationJob,
    Verdict,
    VerdictStatus,
)
from actors.streams import Outbox

log = structlog.get_logger(__name__)

Validate = Callable[[ValidationJob], Awaitable[Verdict]]


@dataclass(slots=True)
class _Written:
    """A step as written, with its validation and the next (speculative) step already running."""

    step: Step
    validation: asyncio.Future[Verdict] | None
    following: asyncio.Future[_Written | None] | None


class RequestThinking:
    """Runs every thread of one request and reports what happens as `ThinkUpdate`s."""

    def __init__(
        self, job: ThinkJob, prompts: PromptSet, clients: dict[str, ModelClient], validate: Validate | None
    ) -> None:
        self.job = job
        self.settings = job.settings
        self.prompts = prompts
        self.clients = clients
        self.validate = validate if job.settings.validation.enabled else None
        self.usage = UsageLedger()
        self.budget = TokenBudget(job.budget_tokens)
        self.outbox: Outbox[ThinkEvent] = Outbox(0)
        self.live = 0  # threads still running: a validation batch is full with one step of each

    async def updates(self, spacing_s: float = 0.0) -> AsyncIterator[ThinkUpdate]:
        """What happens, as it happens. With `spacing_s`, events that follow each other closely
        travel together (see `Outbox.batches`)."""
        starts: list[tuple[int, Reservation]] = []
        skipped: list[ThinkEvent] = []
        first_step = self.first_step_estimate() if self.budget.bounded else 0
        for index in range(self.settings.thinking.num_threads):
            reservation = self.budget.reserve(first_step)
            if reservation is None:
                skipped.append(Skipped(f"thread {index + 1}", "budget"))
            else:
                starts.append((index, reservation))
        self.outbox = Outbox(len(starts))
        self.live = len(starts)
        tasks = [asyncio.ensure_future(ThreadRunner(self, i, first).run()) for i, first in starts]
        try:
            if skipped:
                yield ThinkUpdate(skipped)
            async for events in self.outbox.batches(spacing_s=spacing_s):
                yield ThinkUpdate(events, self.usage.take())
            yield ThinkUpdate([], self.usage.take(), final=True)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.usage.roles:  # only when stopped from outside: a client that went away
                log.info("usage_unreported_after_stop", **self.usage.totals())

    def stopped(self) -> bool:
        return self.job.stop_at is not None and time.time() >= self.job.stop_at

    def thinker_messages(self, context: str, number: int, challenge: tuple[Step, Verdict] | None) -> list[dict]:
        prompts = self.prompts
        task = prompts.thinker_task.format(context=context, step_number=number)
        if challenge is not None:
            previous, verdict = challenge
            task += "\n\n" + prompts.revision_feedback.format(
                step_number=number,
                previous=previous.text,
                counterexamples="\n".join(f"- {c.strip()}" for c in verdict.counterexamples),
            )
        return role_messages(
            prompts,
            self.job.conversation,
            prompts.thinker_system,
            task,
            cache_friendly=self.settings.economy.cache_friendly_prompts,
        )

    def first_step_estimate(self) -> int:
        thinker = self.clients["thinker"]
        return thinker.estimate_prompt(self.thinker_messages("", 1, None)) + thinker.model.max_tokens

    def validation_estimate(self, context: str, step: str) -> int:
        """What a step's validation needs held for it: the critics and the first round of votes,
        every call answering at `max_tokens`. The validator spends within it, checking each
        further call against what is left (see `StepValidator`)."""
        validation, economy = self.settings.validation, self.settings.economy
        critic, voter = self.clients["counterexample"], self.clients["voter"]
        shared = len(self.job.conversation.transcript()) + len(step)
        critic_prompt = int(
            (shared + len(context) + len(self.prompts.counterexample_system) + 200) * critic.tokens_per_char
        )
        voter_prompt = int((shared + len(self.prompts.voter_system) + 200) * voter.tokens_per_char)
        voter_prompt += validation.num_counterexamples * critic.model.max_tokens  # the critics' answers
        first_round = validation.pass_threshold if economy.staged_voting else validation.num_voters
        return (
            (1 if economy.n_sampling else validation.num_counterexamples) * critic_prompt
            + validation.num_counterexamples * critic.model.max_tokens
            + (1 if economy.n_sampling else first_round) * voter_prompt
            + first_round * voter.model.max_tokens
        )


class ThreadRunner:
    def __init__(self, request: RequestThinking, index: int, first: Reservation) -> None:
        self.request = request
        self.index = index
        self.first = first
        self.settings = request.settings
        self.thinker = request.clients["thinker"]
        self.context = ContextBuilder(
            self.settings.context,
            request.prompts,
            request.clients["summarizer"],
            incremental=self.settings.economy.incremental_summary,
        )
        self.tag = request.job.request_id
        self.put = request.outbox.put
        self.skipped_reported = False

    async def run(self) -> None:
        """Reports this thread's events, then `ThreadEnded`; a failed call ends the thread with
        the steps it had (a thread with none is dropped by fusion)."""
        accepted: list[Step] = []
        error: str | None = None
        try:
            await self._steps(accepted)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - one thread's failure is not the request's
            error = describe_error(exc)
            log.warning("thread_failed", thread=self.index, error=error)
        finally:
            self.request.live -= 1
        self.put(ThreadEnded(ThreadResult(self.index, accepted, error)))
        self.request.outbox.close()

    async def _steps(self, accepted: list[Step]) -> None:
        # Validations of abandoned speculative steps: left to finish so their tokens are counted.
        orphans: list[asyncio.Future[Verdict]] = []
        pending: asyncio.Future[_Written | None] | None = asyncio.ensure_future(self._write(0, [], None, self.first))
        try:
            while pending is not None:
                written = await pending
                if written is None:
                    break
                step, pending = written.step, written.following
                if written.validation is not None:
                    step.verdict = verdict = await written.validation
                    if verdict.failed:
                        if self._may_revise(step):
                            await self._abandon(pending, orphans, f"step {step.index + 1} is being revised")
                            self.put(StepChecked(self.index, step.index, verdict, revising=True))
                            pending = asyncio.ensure_future(self._write(step.index, list(accepted), (step, verdict)))
                            continue
                        step.flagged = True
                    self.put(StepChecked(self.index, step.index, verdict, flagged=step.flagged))
                accepted.append(step)
                if pending is not None and self.request.stopped():
                    await self._abandon(pending, orphans, "the deadline came")
                    pending = None
            pending = None
            for verdict in await asyncio.gather(*orphans):
                del verdict  # their usage is already on the request's ledger
        finally:
            if pending is not None:  # a failure or a cancellation: stop what still runs
                await self._abandon(pending, orphans, "the thread stopped")
            for orphan in orphans:
                if not orphan.done():
                    orphan.cancel()

    def _may_revise(self, step: Step) -> bool:
        """Redo a failed step? Once per step, only in `revise` mode, and not past the deadline."""
        return self.settings.validation.on_fail == "revise" and not step.revised and not self.request.stopped()

    def _skip(self, what: str, reason: str) -> None:
        if not self.skipped_reported:  # the first thing a thread could not do says it all
            self.skipped_reported = True
            self.put(Skipped(what, reason))

    async def _write(
        self,
        index: int,
        earlier: list[Step],
        challenge: tuple[Step, Verdict] | None,
        reservation: Reservation | None = None,
    ) -> _Written | None:
        """Write step `index`, start its validation and (speculatively) its successor."""
        request = self.request
        what = f"step {index + 1} of thread {self.index + 1}"
        if request.stopped():
            self._skip(what, "deadline")
            return None
        stop_at = request.job.stop_at
        context = await self.context.build(earlier, request.usage, self.tag, budget=request.budget, deadline=stop_at)
        messages = request.thinker_messages(context, index + 1, challenge)
        if reservation is None:
            bounded = request.budget.bounded  # unbounded: nothing to estimate on every step
            estimate = self.thinker.estimate_prompt(messages) + self.thinker.model.max_tokens if bounded else 0
            reservation = await request.budget.acquire(estimate)
            if reservation is None:
                self._skip(what, "budget")
                return None
        spent = UsageLedger()
        try:
            if self.settings.thinking.live_tokens:
                text = await self._stream_step(messages, spent, index)
            else:
                text = await self.thinker.complete(messages, spent, tag=self.tag, deadline=stop_at)
        except (DeadlineReached, TimeoutError):
            self._skip(what, "deadline")
            return None
        finally:
            request.usage.merge(spent)
            request.budget.settle(reservation, spent.prompt_tokens + spent.completion_tokens)
        body, complete = parse_step(text)
        step = Step(index=index, text=body, complete=complete, revised=challenge is not None)
        self.put(StepWritten(self.index, index, body, revision=step.revised))
        validation = following = None
        if request.validate is not None:
            validation = asyncio.ensure_future(self._validate(context, step))
        if not (complete or index + 1 >= self.settings.thinking.max_steps or request.stopped()):
            following = asyncio.ensure_future(self._write(index + 1, [*earlier, step], None))
        return _Written(step, validation, following)

    async def _stream_step(self, messages: list[dict], spent: UsageLedger, index: int) -> str:
        pieces: list[str] = []
        stop_at = self.request.job.stop_at
        try:
            async with asyncio.timeout(None if stop_at is None else max(0.0, stop_at - time.time())):
                async for piece in self.thinker.stream(messages, spent, tag=self.tag):
                    if piece.text:
                        pieces.append(piece.text)
                        self.put(ThinkingTokens(self.index, index, piece.text))
        except BaseException:
            if pieces:  # the client saw the start of this step: say it will not be finished
                self.put(StepDropped(self.index, index, "stopped while it was written"))
            raise
        return "".join(pieces)

    async def _validate(self, context: str, step: Step) -> Verdict:
        request = self.request
        what = f"validation of step {step.index + 1} of thread {self.index + 1}"
        estimate = request.validation_estimate(context, step.text) if request.budget.bounded else 0
        reservation = await request.budget.acquire(estimate)
        if reservation is None:
            self.put(Skipped(what, "budget"))
            return Verdict(VerdictStatus.SKIPPED, reason="budget")
        if request.stopped():
            request.budget.settle(reservation, 0)
            self.put(Skipped(what, "deadline"))
            return Verdict(VerdictStatus.SKIPPED, reason="deadline")
        job = ValidationJob(
            request.job.request_id,
            request.job.conversation,
            request.settings,
            context,
            step.text,
            request.job.stop_at,
            budget_tokens=reservation.tokens if request.budget.bounded else None,
        )
        try:
            verdict = await request.validate(job)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a validator failure must not kill the thread
            log.warning("validation_failed_step_unvalidated", error=describe_error(exc))
            verdict = Verdict(VerdictStatus.UNVALIDATED, reason="validator unavailable")
        request.usage.merge(verdict.usage)
        spent = verdict.usage.prompt_tokens + verdict.usage.completion_tokens if verdict.usage else 0
        request.budget.settle(reservation, spent)
        verdict.usage = None  # on the request's ledger now; not sent again with the event
        return verdict

    async def _abandon(self, pending: asyncio.Future | None, orphans: list[asyncio.Future], reason: str) -> None:
        """Drop speculative steps (their upstream calls are aborted), reporting the written ones.

        Their validations that already started are not cancelled but kept in `orphans`: a
        cancelled validation would take the tokens its finished calls cost off the books.
        """
        while pending is not None:
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
            if pending.cancelled() or pending.exception() is not None or pending.result() is None:
                return
            written: _Written = pending.result()
            self.put(StepDropped(self.index, written.step.index, reason))
            if written.validation is not None:
                orphans.append(written.validation)
            pending = written.following
