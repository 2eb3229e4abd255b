"""Adversarial validation of one step: counterexample generators, then voters.

The verdict matters (the original computed it and ignored it): the thinker revises or flags a
failed step. Validator failures never kill a thread; they leave the step "unvalidated".
"""

from __future__ import annotations

import asyncio

import structlog

from actors.config import ValidationConfig
from actors.model_client import ModelClient
from actors.parsing import Vote, parse_vote
from actors.prompts import PromptSet
from actors.schemas import UsageLedger, ValidationJob, Verdict, VerdictStatus

log = structlog.get_logger(__name__)


class StepValidator:
    def __init__(
        self,
        config: ValidationConfig,
        prompts: PromptSet,
        counterexample: ModelClient,
        voter: ModelClient,
    ) -> None:
        self.config = config
        self.prompts = prompts
        self.counterexample = counterexample
        self.voter = voter

    async def validate(self, job: ValidationJob) -> Verdict:
        usage = UsageLedger()
        try:
            return await self._validate(job, usage)
        except asyncio.CancelledError:  # the tokens spent so far stay on the record
            if usage.calls:
                log.info("usage_unreported_after_stop", **usage.totals())
            raise

    async def _validate(self, job: ValidationJob, usage: UsageLedger) -> Verdict:
        question = job.conversation.transcript()
        counter_messages = [
            {"role": "system", "content": self.prompts.counterexample_system},
            {
                "role": "user",
                "content": self.prompts.counterexample_user.format(
                    question=question, context=job.context or "-", step=job.step_text
                ),
            },
        ]
        counterexamples = await _gather_ok(
            self.counterexample.complete(counter_messages, usage, tag=job.request_id)
            for _ in range(self.config.num_counterexamples)
        )
        if not counterexamples:
            return Verdict(VerdictStatus.UNVALIDATED, usage=usage)

        listed = "\n".join(f"{i + 1}. {c.strip()}" for i, c in enumerate(counterexamples))
        voter_messages = [
            {"role": "system", "content": self.prompts.voter_system},
            {
                "role": "user",
                "content": self.prompts.voter_user.format(
                    question=question, step=job.step_text, counterexamples=listed
                ),
            },
        ]
        answers = await _gather_ok(
            self.voter.complete(voter_messages, usage, tag=job.request_id)
            for _ in range(self.config.num_voters)
        )
        votes = [parse_vote(a) for a in answers]
        status = self._decide(votes)
        return Verdict(status, votes=votes, counterexamples=counterexamples, usage=usage)

    def _decide(self, votes: list[Vote]) -> VerdictStatus:
        threshold = self.config.pass_threshold
        if sum(v is Vote.STEP for v in votes) >= threshold:
            return VerdictStatus.PASSED
        # Enough votes against that the missing voters could not have passed it.
        if sum(v is Vote.COUNTEREXAMPLE for v in votes) > self.config.num_voters - threshold:
            return VerdictStatus.FAILED
        if len(votes) < self.config.num_voters:  # some voters failed: we cannot tell
            return VerdictStatus.UNVALIDATED
        return VerdictStatus.FAILED  # every voter answered, too few backed the step


async def _gather_ok(calls) -> list[str]:
    """Run calls concurrently and keep the answers of those that succeeded."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    ok = []
    for result in results:
        if isinstance(result, BaseException):
            if isinstance(result, asyncio.CancelledError):
                raise result
            log.warning("validator_call_failed", error=str(result) or type(result).__name__)
        else:
            ok.append(result)
    return ok
