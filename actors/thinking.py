"""One reasoning thread: steps, each validated, with speculation so validation costs no latency.

While step k is being validated the thread already writes step k+1 on the assumption that k
passes. If k fails (and `on_fail` is `revise`) the speculative step is cancelled — its upstream
call is aborted — and step k is redone once with the counterexamples as feedback. When steps pass,
a thread therefore takes as long as its thinking calls plus the last step's validation.

The runner is an async generator of `StepEvent`s so callers can stream reasoning as it happens.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

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
        on_fail = self.config.validation.on_fail
        accepted: list[Step] = []
        speculative: asyncio.Task[tuple[Step, str]] | None = None
        feedback: tuple[Step, Verdict] | None = None

        async def think(index: int, earlier: list[Step], challenge: tuple[Step, Verdict] | None):
            seen = await context.build(earlier, usage, job.request_id)
            return await self._think_step(job, index, seen, challenge, usage), seen

        try:
            while True:
                index = len(accepted)
                if speculative is not None:
                    step, seen = await speculative
                    speculative = None
                else:
                    step, seen = await think(index, accepted, feedback)
                step.revised = feedback is not None
                feedback = None
                last = step.complete or index + 1 >= max_steps

                if self.validate is not None:
                    validation = asyncio.ensure_future(
                        self._validate(ValidationJob(job.request_id, job.conversation, seen, step.text))
                    )
                    if not last:
                        speculative = asyncio.ensure_future(think(index + 1, [*accepted, step], None))
                    step.verdict = verdict = await validation
                    usage.merge(verdict.usage)
                    if verdict.failed:
                        if on_fail == "revise" and not step.revised and not _past(job.stop_starting_at):
                            speculative = await _cancel(speculative)
                            yield StepEvent(job.thread_index, step, rejected=True, usage=usage.take())
                            feedback = (step, verdict)
                            continue
                        step.flagged = True

                accepted.append(step)
                if not last and _past(job.stop_starting_at):
                    last = True  # the request's deadline is near: fuse what exists
                if last:
                    speculative = await _cancel(speculative)
                yield StepEvent(job.thread_index, step, rejected=False, usage=usage.take())
                if last:
                    return
        finally:
            await _cancel(speculative)
            if usage.calls:  # cancelled: tokens spent but never sent up stay on the record
                log.info("usage_unreported_after_stop", thread=job.thread_index, **usage.totals())

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


async def _cancel(task: asyncio.Future | None) -> None:
    """Cancel a speculative step and wait until its upstream call is really aborted."""
    if task is not None:
        task.cancel()
        # gather re-raises our own cancellation but collects the task's.
        await asyncio.gather(task, return_exceptions=True)
    return None
