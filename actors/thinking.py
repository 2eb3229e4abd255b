"""One reasoning thread: steps, each validated, with speculation so validation costs no latency.

As soon as step k is written, its validation starts and step k+1 is written on the assumption
that k passes (and so on: each written step starts its own validation and its successor). If k
fails (and `on_fail` is `revise`) every speculative step after it is cancelled — their upstream
calls are aborted — and step k is redone once with the counterexamples as feedback. When steps
pass, a thread therefore takes as long as its thinking calls plus the last step's validation.

The runner is an async generator of `StepEvent`s so callers can stream reasoning as it happens.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import structlog

from actors.config import ServiceConfig
from actors.context import ContextBuilder
from actors.model_client import ModelClient
from actors.parsing import parse_step
from actors.prompts import PromptSet
from actors.schemas import (
    Step,
    StepEvent,
    ThreadJob,
    UsageLedger,
    ValidationJob,
    Verdict,
    VerdictStatus,
)

log = structlog.get_logger(__name__)

Validate = Callable[[ValidationJob], Awaitable[Verdict]]


@dataclass
class _Written:
    """A step as written, with its validation and the next (speculative) step already running."""

    step: Step
    validation: asyncio.Future[Verdict] | None
    following: asyncio.Future["_Written"] | None


class ThreadRunner:
    def __init__(
        self,
        config: ServiceConfig,
        prompts: PromptSet,
        thinker: ModelClient,
        summarizer: ModelClient,
        validate: Validate | None,
    ) -> None:
        self.config = config
        self.prompts = prompts
        self.thinker = thinker
        self.summarizer = summarizer
        # None, or validation disabled in config: steps are accepted as written.
        self.validate = validate if config.validation.enabled else None

    async def run(self, job: ThreadJob) -> AsyncIterator[StepEvent]:
        usage = UsageLedger()
        context = ContextBuilder(self.config.context, self.prompts, self.summarizer)
        max_steps = self.config.thinking.max_steps
        accepted: list[Step] = []

        async def write(index: int, earlier: list[Step], challenge: tuple[Step, Verdict] | None) -> _Written:
            seen = await context.build(earlier, usage, job.request_id)
            step = await self._think_step(job, index, seen, challenge, usage)
            step.revised = challenge is not None
            # Nothing is awaited from here on, so a cancelled `write` never leaves tasks behind.
            validation = following = None
            if self.validate is not None:
                validation = asyncio.ensure_future(
                    self._validate(ValidationJob(job.request_id, job.conversation, seen, step.text))
                )
            if not (step.complete or index + 1 >= max_steps or _past(job.stop_starting_at)):
                # Speculation: the next step is written now, on the assumption this one passes.
                following = asyncio.ensure_future(write(index + 1, [*earlier, step], None))
            return _Written(step, validation, following)

        # Validations of abandoned speculative steps: left to finish so their tokens are counted.
        orphans: list[asyncio.Future[Verdict]] = []
        pending: asyncio.Future[_Written] | None = asyncio.ensure_future(write(0, [], None))
        try:
            while pending is not None:
                written = await pending
                step, pending = written.step, written.following
                if written.validation is not None:
                    step.verdict = verdict = await written.validation
                    usage.merge(verdict.usage)
                    if verdict.failed:
                        if self._revise(step, job):
                            await _abandon(pending, orphans)
                            yield StepEvent(job.thread_index, step, rejected=True, usage=usage.take())
                            pending = asyncio.ensure_future(write(step.index, accepted, (step, verdict)))
                            continue
                        step.flagged = True
                accepted.append(step)
                if pending is not None and _past(job.stop_starting_at):
                    await _abandon(pending, orphans)  # the deadline is near: fuse what exists
                    pending = None
                if pending is None:
                    for verdict in await asyncio.gather(*orphans):
                        usage.merge(verdict.usage)
                    orphans.clear()
                yield StepEvent(job.thread_index, step, rejected=False, usage=usage.take())
        finally:
            await _abandon(pending, orphans)
            for orphan in orphans:  # only left when the thread itself was stopped
                orphan.cancel()
            if usage.calls:  # cancelled: tokens spent but never sent up stay on the record
                log.info("usage_unreported_after_stop", thread=job.thread_index, **usage.totals())

    def _revise(self, step: Step, job: ThreadJob) -> bool:
        """Redo a failed step? Once per step, only in `revise` mode, and not past the deadline."""
        return self.config.validation.on_fail == "revise" and not step.revised and not _past(job.stop_starting_at)

    async def _think_step(
        self,
        job: ThreadJob,
        index: int,
        seen: str,
        challenge: tuple[Step, Verdict] | None,
        usage: UsageLedger,
    ) -> Step:
        prompts = self.prompts
        user = prompts.thinker_step.format(
            question=job.conversation.question, context=seen, step_number=index + 1
        )
        if challenge is not None:
            previous, verdict = challenge
            user += "\n\n" + prompts.revision_feedback.format(
                step_number=index + 1,
                previous=previous.text,
                counterexamples="\n".join(f"- {c.strip()}" for c in verdict.counterexamples),
            )
        messages = job.conversation.messages(prompts.thinker_system, user)
        text = await self.thinker.complete(messages, usage, tag=job.request_id)
        body, complete = parse_step(text)
        return Step(index=index, text=body, complete=complete)

    async def _validate(self, job: ValidationJob) -> Verdict:
        try:
            return await self.validate(job)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a validator failure must not kill the thread
            log.warning("validation_failed_step_unvalidated", error=str(exc) or type(exc).__name__)
            return Verdict(VerdictStatus.UNVALIDATED)


def _past(moment: float | None) -> bool:
    return moment is not None and time.time() >= moment


async def _abandon(pending: asyncio.Future | None, orphans: list[asyncio.Future]) -> None:
    """Cancel speculative steps (their upstream calls are aborted).

    Their validations that already started are not cancelled but collected in `orphans`: a
    cancelled validation would take the tokens its finished calls cost off the books.
    """
    while pending is not None:
        pending.cancel()
        await asyncio.gather(pending, return_exceptions=True)  # re-raises only our own cancel
        if pending.cancelled() or pending.exception() is not None:
            return
        written: _Written = pending.result()
        if written.validation is not None:
            orphans.append(written.validation)
        pending = written.following
