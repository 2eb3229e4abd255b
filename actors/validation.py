"""Adversarial validation of one step: counterexample generators, then voters.

The verdict matters (the original computed it and ignored it): the thinker revises or flags a
failed step. Validator failures never kill a thread; they leave the step "unvalidated".

Economy mechanisms (`RunSettings.economy`):
- n_sampling: the critics share one prompt, as do the voters, so each group is one upstream
  call with `n` (see `ModelClient.sample`). Same decisions.
- staged_voting: `pass_threshold` voters first, more only while the verdict is still open; the
  verdict is the one all voters would have given (`verdict_if_settled`). Same decisions.
- skip_vote_without_counterexample: every critic found nothing, so the step passes without a
  vote. This can change a decision: voters may have refuted a step no critic could fault.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from itertools import product

import structlog

from actors.model_client import DeadlineReached, ModelClient, describe_error
from actors.parsing import Vote, found_counterexample, parse_vote
from actors.prompts import PromptSet, role_messages
from actors.schemas import UsageLedger, ValidationJob, Verdict, VerdictStatus

log = structlog.get_logger(__name__)


def decide(step: int, counter: int, answered: int, voters: int, threshold: int) -> VerdictStatus:
    """The verdict once every voter was asked: `answered` of `voters` answered."""
    if step >= threshold:
        return VerdictStatus.PASSED
    if counter > voters - threshold:  # enough against that the missing voters could not pass it
        return VerdictStatus.FAILED
    if answered < voters:  # some voters failed: we cannot tell
        return VerdictStatus.UNVALIDATED
    return VerdictStatus.FAILED  # every voter answered, too few backed the step


def verdict_if_settled(votes: list[Vote], asked: int, voters: int, threshold: int) -> VerdictStatus | None:
    """The verdict if no answer of the voters not yet asked could change it, else None."""
    step = sum(v is Vote.STEP for v in votes)
    counter = sum(v is Vote.COUNTEREXAMPLE for v in votes)
    outcomes = set()
    # Each voter still to ask backs the step, refutes it, abstains, or fails to answer.
    for rest in product((1, 2, 3, 4), repeat=voters - asked):
        outcomes.add(
            decide(
                step + rest.count(1),
                counter + rest.count(2),
                len(votes) + sum(r != 4 for r in rest),
                voters,
                threshold,
            )
        )
        if len(outcomes) > 1:
            return None
    return outcomes.pop()


class StepValidator:
    def __init__(self, prompts: PromptSet, counterexample: ModelClient, voter: ModelClient) -> None:
        self.prompts = prompts
        self.counterexample = counterexample
        self.voter = voter

    async def validate(self, job: ValidationJob) -> Verdict:
        """Never raises but for cancellation: a failure is an UNVALIDATED verdict, and the
        tokens spent are always in `verdict.usage`."""
        usage = UsageLedger()
        try:
            verdict = await self._validate(job, usage)
        except asyncio.CancelledError:
            if usage.calls:  # the thread that asked is gone; keep the tokens on the record
                log.info("usage_unreported_after_stop", **usage.totals())
            raise
        except DeadlineReached:
            verdict = Verdict(VerdictStatus.SKIPPED, reason="deadline")
        except Exception as exc:  # noqa: BLE001 - a failed validation leaves the step unvalidated
            log.warning("validation_failed", error=describe_error(exc))
            verdict = Verdict(VerdictStatus.UNVALIDATED, reason="validators failed")
        verdict.usage = usage
        return verdict

    async def _validate(self, job: ValidationJob, usage: UsageLedger) -> Verdict:
        settings, economy = job.settings.validation, job.settings.economy
        cache_friendly = economy.cache_friendly_prompts
        call = {"tag": job.request_id, "deadline": job.stop_at, "one_call": economy.n_sampling}
        critics = role_messages(
            self.prompts,
            job.conversation,
            self.prompts.counterexample_system,
            self.prompts.counterexample_task.format(context=job.context or "-", step=job.step_text),
            cache_friendly=cache_friendly,
        )
        allowance = _Allowance(job.budget_tokens, usage)
        if not allowance.fits(self.counterexample, critics, settings.num_counterexamples, economy.n_sampling):
            return Verdict(VerdictStatus.SKIPPED, reason="budget")
        answers = await self.counterexample.sample(critics, usage, settings.num_counterexamples, **call)
        counterexamples = [a.strip() for a in answers]
        if economy.skip_vote_without_counterexample and not any(map(found_counterexample, answers)):
            return Verdict(VerdictStatus.PASSED, counterexamples=counterexamples, unchallenged=True)

        listed = "\n".join(f"{i + 1}. {c}" for i, c in enumerate(counterexamples))
        voters = role_messages(
            self.prompts,
            job.conversation,
            self.prompts.voter_system,
            self.prompts.voter_task.format(step=job.step_text, counterexamples=listed),
            cache_friendly=cache_friendly,
        )
        total, threshold = settings.num_voters, settings.pass_threshold
        votes: list[Vote] = []
        asked = 0
        while True:
            if economy.staged_voting:
                backing = sum(v is Vote.STEP for v in votes)
                ask = min(max(threshold - backing, 1), total - asked)
            else:
                ask = total
            if not allowance.fits(self.voter, voters, ask, economy.n_sampling):
                status = VerdictStatus.SKIPPED if not votes else VerdictStatus.UNVALIDATED
                return Verdict(status, votes=votes, counterexamples=counterexamples, reason="budget")
            try:
                answers = await self.voter.sample(voters, usage, ask, **call)
            except DeadlineReached:
                raise
            except Exception as exc:  # noqa: BLE001 - every voter of this round failed
                log.warning("voters_failed", error=describe_error(exc))
                answers = []
            asked += ask
            votes += [parse_vote(a) for a in answers]
            if asked >= total:
                counted = (sum(v is Vote.STEP for v in votes), sum(v is Vote.COUNTEREXAMPLE for v in votes))
                status = decide(*counted, len(votes), total, threshold)
                break
            settled = verdict_if_settled(votes, asked, total, threshold)
            if settled is not None:
                status = settled
                break
        reason = "voters failed" if status is VerdictStatus.UNVALIDATED else ""
        return Verdict(status, votes=votes, counterexamples=counterexamples, reason=reason)


class _Allowance:
    """The tokens a validation may spend: each call starts only if its worst case (the prompt as
    estimated, every answer at `max_tokens`) fits in what is left."""

    def __init__(self, tokens: int | None, usage: UsageLedger) -> None:
        self.tokens = tokens
        self.usage = usage

    def fits(self, client: ModelClient, messages: list, answers: int, one_call: bool) -> bool:
        if self.tokens is None:
            return True
        prompts = 1 if one_call else answers
        worst = prompts * client.estimate_prompt(messages) + answers * client.model.max_tokens
        return self.usage.total_tokens + worst <= self.tokens


class ValidationBatches:
    """Validations asked together go to the validator pool as one call.

    The threads of a request write step k at about the same time; their validations wait at
    most `window_s` for each other (and go at once when every running thread has asked), so one
    handle call carries them. Used per request: cancelling the request cancels its batches.
    """

    def __init__(
        self,
        send: Callable[[list[ValidationJob]], Awaitable[list[Verdict]]],
        expected: Callable[[], int],
        window_s: float = 0.01,
    ) -> None:
        self.send = send
        self.expected = expected
        self.window_s = window_s
        self._jobs: list[ValidationJob] = []
        self._waiters: list[asyncio.Future[Verdict]] = []
        self._timer: asyncio.TimerHandle | None = None

    async def validate(self, job: ValidationJob) -> Verdict:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Verdict] = loop.create_future()
        self._jobs.append(job)
        self._waiters.append(waiter)
        if len(self._jobs) >= max(self.expected(), 1):
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.window_s, self._flush)
        return await waiter

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        jobs, waiters = self._jobs, self._waiters
        self._jobs, self._waiters = [], []
        if jobs:
            asyncio.ensure_future(self._deliver(jobs, waiters))

    async def _deliver(self, jobs: list[ValidationJob], waiters: list[asyncio.Future[Verdict]]) -> None:
        call = asyncio.ensure_future(self.send(jobs))
        waiting = asyncio.ensure_future(asyncio.wait(waiters))  # all waiters cancelled: drop the call
        await asyncio.wait((call, waiting), return_when=asyncio.FIRST_COMPLETED)
        if not call.done():
            call.cancel()
        waiting.cancel()
        try:
            verdicts = await call
        except asyncio.CancelledError:
            verdicts = None
            error: BaseException | None = None
        except Exception as exc:  # noqa: BLE001 - every waiter gets it
            verdicts, error = None, exc
        for index, waiter in enumerate(waiters):
            if waiter.done():
                continue
            if verdicts is not None:
                waiter.set_result(verdicts[index])
            elif error is not None:
                waiter.set_exception(error)
            else:
                waiter.cancel()
