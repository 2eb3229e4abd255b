"""Validation of one step: critics, then voters; the economy mechanisms give the verdicts they
promise; validations asked together travel as one batch."""

import asyncio
import itertools
import time

import pytest

from actors.model_client import role_clients
from actors.parsing import Vote
from actors.prompts import load_prompts
from actors.schemas import Conversation, ValidationJob, Verdict, VerdictStatus
from actors.validation import StepValidator, ValidationBatches, decide, verdict_if_settled
from tests.simulated_upstream import Rule
from tests.support import sim_config

PROMPTS = load_prompts("en")
PASSED, FAILED, UNVALIDATED = VerdictStatus.PASSED, VerdictStatus.FAILED, VerdictStatus.UNVALIDATED
QUESTION = "What is 6*7?"
CONVERSATION = Conversation(QUESTION, turns=(("user", QUESTION),), messages=({"role": "user", "content": QUESTION},))
REFUTING = "Counterexample: 6*7 is 42, not 41."
SEPARATE = {"n_sampling": False, "staged_voting": False, "skip_vote_without_counterexample": False}


async def until(predicate, timeout=2.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def make(session, upstream, **economy):
    config = sim_config(upstream.base_url, economy=economy or {})
    clients = role_clients(session, config)
    validator = StepValidator(PROMPTS, clients["counterexample"], clients["voter"])
    return validator, config.profile_settings["token-killer"]


def job(settings, stop_at=None, step="6*7 = 42"):
    return ValidationJob("req-1", CONVERSATION, settings, "", step, stop_at)


def script(upstream, model, replies):
    """`model` answers `replies` in order, one per choice, then the last one again."""
    replies = list(replies)
    counter = itertools.count()
    upstream.add_rule(Rule(model=model, reply=lambda request: replies[min(next(counter), len(replies) - 1)]))


def calls(upstream, model):
    return [r for r in upstream.records if r.model == model]


# --- decide and verdict_if_settled -----------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "counter", "answered", "status"),
    [
        (2, 0, 2, PASSED),
        (2, 1, 3, PASSED),
        (1, 2, 3, FAILED),
        (0, 2, 2, FAILED),  # two against: the third could not pass it
        (1, 0, 3, FAILED),  # everyone answered, too few backed it
        (1, 1, 2, UNVALIDATED),  # a voter failed: cannot tell
        (0, 0, 0, UNVALIDATED),
    ],
)
def test_decide(step, counter, answered, status):
    assert decide(step, counter, answered, 3, 2) is status


# A voter's outcome: it backs the step, refutes it, abstains, or fails to answer.
OUTCOMES = (Vote.STEP, Vote.COUNTEREXAMPLE, Vote.ABSTAIN, None)


def _final(outcomes, voters, threshold):
    votes = [o for o in outcomes if o is not None]
    return decide(votes.count(Vote.STEP), votes.count(Vote.COUNTEREXAMPLE), len(votes), voters, threshold)


@pytest.mark.parametrize(("voters", "threshold"), [(v, t) for v in range(1, 5) for t in range(1, v + 1)])
def test_a_settled_verdict_is_exactly_the_one_every_voter_would_have_given(voters, threshold):
    """Every combination of outcomes, every point at which staged voting could stop: settled
    means every continuation gives that verdict, and open means some continuations differ."""
    for asked in range(voters + 1):
        for prefix in itertools.product(OUTCOMES, repeat=asked):
            votes = [o for o in prefix if o is not None]
            finals = {
                _final(prefix + rest, voters, threshold) for rest in itertools.product(OUTCOMES, repeat=voters - asked)
            }
            settled = verdict_if_settled(votes, asked, voters, threshold)
            expected = finals.pop() if len(finals) == 1 else None
            assert settled is expected, (prefix, voters, threshold)


# --- verdicts from the upstream ----------------------------------------------------------------


@pytest.mark.parametrize("economy", [{}, SEPARATE], ids=["economy", "separate"])
@pytest.mark.parametrize(
    ("votes", "status"),
    [
        (["VOTE: STEP"] * 3, PASSED),
        (["VOTE: STEP", "VOTE: STEP", "VOTE: COUNTEREXAMPLE"], PASSED),
        (["VOTE: STEP", "VOTE: COUNTEREXAMPLE", "VOTE: STEP"], PASSED),
        (["VOTE: STEP", "VOTE: COUNTEREXAMPLE", "VOTE: COUNTEREXAMPLE"], FAILED),
        (["VOTE: COUNTEREXAMPLE"] * 3, FAILED),
        (["VOTE: STEP", "no idea", "no idea"], FAILED),
        (["投票：主线程", "投票：主线程", "投票：反例"], PASSED),
    ],
)
async def test_votes_decide_the_verdict(http_session, upstream, economy, votes, status):
    upstream.add_rule(Rule(model="sim-counterexample", reply=REFUTING))
    script(upstream, "sim-voter", votes)
    validator, settings = make(http_session, upstream, **economy)

    verdict = await validator.validate(job(settings))

    assert verdict.status is status and verdict.reason == "" and not verdict.unchallenged
    assert verdict.counterexamples == [REFUTING] * 3
    assert (verdict.usage.prompt_tokens, verdict.usage.completion_tokens) == upstream.served_usage()


async def test_voters_see_the_counterexamples(http_session, upstream):
    upstream.add_rule(Rule(model="sim-counterexample", reply="But 6*7 could be 41?"))
    validator, settings = make(http_session, upstream)
    await validator.validate(job(settings))
    voter_calls = calls(upstream, "sim-voter")
    assert voter_calls
    for call in voter_calls:
        assert call.messages[-1]["content"].count("But 6*7 could be 41?") == 3
        assert "6*7 = 42" in call.messages[-1]["content"]


async def test_critics_see_the_step_and_its_context(http_session, upstream):
    validator, settings = make(http_session, upstream)
    await validator.validate(ValidationJob("req-1", CONVERSATION, settings, "Step 1: multiply", "6*7 = 42"))
    prompt = calls(upstream, "sim-counterexample")[0].messages[-1]["content"]
    assert "Earlier steps: Step 1: multiply" in prompt and "Step to check: 6*7 = 42" in prompt


# --- economy: n-sampling ---------------------------------------------------------------------


async def test_n_sampling_gives_the_verdicts_of_separate_calls_for_fewer_prompt_tokens(http_session, upstream):
    votes = ["VOTE: STEP", "VOTE: COUNTEREXAMPLE", "VOTE: COUNTEREXAMPLE"]
    results = {}
    for n_sampling in (True, False):
        upstream.reset()
        upstream.add_rule(Rule(model="sim-counterexample", reply=REFUTING))
        script(upstream, "sim-voter", votes)
        validator, settings = make(http_session, upstream, **(SEPARATE | {"n_sampling": n_sampling}))
        verdict = await validator.validate(job(settings))
        results[n_sampling] = verdict, len(upstream.records), verdict.usage.prompt_tokens

    (one, one_calls, one_prompt), (separate, separate_calls, separate_prompt) = results[True], results[False]
    assert (one.status, sorted(one.votes), one.counterexamples) == (
        separate.status,
        sorted(separate.votes),
        separate.counterexamples,
    )
    assert one.status is FAILED
    assert (one_calls, separate_calls) == (2, 6)
    assert one_prompt * 3 == separate_prompt  # each prompt billed once instead of three times
    assert one.usage.completion_tokens == separate.usage.completion_tokens


async def test_n_sampling_falls_back_to_separate_calls_when_the_upstream_returns_fewer_and_remembers(
    http_session, upstream
):
    upstream.supports_n = False
    upstream.add_rule(Rule(model="sim-counterexample", reply=REFUTING))
    script(upstream, "sim-voter", ["VOTE: STEP"] * 3)
    validator, settings = make(http_session, upstream, staged_voting=False)

    verdict = await validator.validate(job(settings))

    assert verdict.status is PASSED and len(verdict.votes) == 3 and len(verdict.counterexamples) == 3
    assert [r.n for r in calls(upstream, "sim-counterexample")] == [3, 1, 1]
    assert [r.n for r in calls(upstream, "sim-voter")] == [3, 1, 1]
    assert (verdict.usage.prompt_tokens, verdict.usage.completion_tokens) == upstream.served_usage()

    upstream.reset()
    upstream.add_rule(Rule(model="sim-counterexample", reply=REFUTING))
    await validator.validate(job(settings))
    assert all(r.n == 1 for r in upstream.records)  # not asked for n again
    assert len(upstream.records) == 6


# --- economy: staged voting ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("votes", "status", "asked"),
    [
        (["VOTE: STEP", "VOTE: STEP", "VOTE: COUNTEREXAMPLE"], PASSED, 2),  # two pass it: the third is not asked
        (["VOTE: COUNTEREXAMPLE", "VOTE: COUNTEREXAMPLE", "VOTE: STEP"], FAILED, 2),
        (["VOTE: STEP", "VOTE: COUNTEREXAMPLE", "VOTE: STEP"], PASSED, 3),
        (["VOTE: STEP", "VOTE: COUNTEREXAMPLE", "VOTE: COUNTEREXAMPLE"], FAILED, 3),
        # Two abstentions cannot pass it, but a third voter that fails would leave it unvalidated.
        (["no idea", "no idea", "VOTE: STEP"], FAILED, 3),
    ],
)
async def test_staged_voting_gives_the_verdict_of_all_voters_asking_fewer(http_session, upstream, votes, status, asked):
    verdicts = {}
    for staged in (True, False):
        upstream.reset()
        upstream.add_rule(Rule(model="sim-counterexample", reply=REFUTING))
        script(upstream, "sim-voter", votes)
        validator, settings = make(http_session, upstream, staged_voting=staged)
        verdicts[staged] = await validator.validate(job(settings))
        completions = sum(r.n for r in calls(upstream, "sim-voter"))
        assert completions == (asked if staged else 3)
    assert verdicts[True].status is verdicts[False].status is status
    assert len(verdicts[True].votes) == asked


# --- economy: skip the vote when no critic found anything -------------------------------------


async def test_no_counterexample_passes_the_step_without_a_vote(http_session, upstream):
    upstream.add_rule(Rule(model="sim-counterexample", reply="NONE - the step holds."))
    validator, settings = make(http_session, upstream)

    verdict = await validator.validate(job(settings))

    assert (verdict.status, verdict.unchallenged, verdict.votes) == (PASSED, True, [])
    assert verdict.counterexamples == ["NONE - the step holds."] * 3
    assert calls(upstream, "sim-voter") == []
    assert (verdict.usage.prompt_tokens, verdict.usage.completion_tokens) == upstream.served_usage()


async def test_without_skip_vote_the_voters_decide_even_when_no_critic_found_anything(http_session, upstream):
    upstream.add_rule(Rule(model="sim-counterexample", reply="NONE - the step holds."))
    upstream.add_rule(Rule(model="sim-voter", reply="VOTE: COUNTEREXAMPLE"))
    validator, settings = make(http_session, upstream, skip_vote_without_counterexample=False)

    verdict = await validator.validate(job(settings))

    assert (verdict.status, verdict.unchallenged) == (FAILED, False)
    assert calls(upstream, "sim-voter")


async def test_one_critic_with_a_counterexample_is_enough_for_a_vote(http_session, upstream):
    script(upstream, "sim-counterexample", ["NONE", REFUTING, "NONE"])
    upstream.add_rule(Rule(model="sim-voter", reply="VOTE: COUNTEREXAMPLE"))
    validator, settings = make(http_session, upstream)

    verdict = await validator.validate(job(settings))

    assert (verdict.status, verdict.unchallenged) == (FAILED, False)
    assert sorted(verdict.counterexamples) == sorted(["NONE", REFUTING, "NONE"])


# --- failures, deadlines, cancellation --------------------------------------------------------


async def test_unreachable_critics_leave_the_step_unvalidated_with_their_usage(http_session, upstream):
    upstream.add_rule(Rule(model="sim-counterexample", fault="400"))
    validator, settings = make(http_session, upstream)
    verdict = await validator.validate(job(settings))
    assert (verdict.status, verdict.reason) == (UNVALIDATED, "validators failed")
    assert verdict.usage.roles["counterexample"].failed_calls == 1


async def test_unreachable_voters_leave_the_step_unvalidated_with_the_critics_usage(http_session, upstream):
    upstream.add_rule(Rule(model="sim-counterexample", reply=REFUTING))
    upstream.add_rule(Rule(model="sim-voter", fault="400"))
    validator, settings = make(http_session, upstream)

    verdict = await validator.validate(job(settings))

    assert (verdict.status, verdict.reason, verdict.votes) == (UNVALIDATED, "voters failed", [])
    assert verdict.counterexamples == [REFUTING] * 3
    assert verdict.usage.roles["voter"].failed_calls >= 1
    assert (verdict.usage.prompt_tokens, verdict.usage.completion_tokens) == upstream.served_usage()


async def test_a_validation_after_the_deadline_is_skipped_without_a_call(http_session, upstream):
    validator, settings = make(http_session, upstream)
    verdict = await validator.validate(job(settings, stop_at=time.time() - 1))
    assert (verdict.status, verdict.reason) == (VerdictStatus.SKIPPED, "deadline")
    assert upstream.records == [] and verdict.usage.calls == 0


async def test_a_validation_cut_by_the_deadline_is_skipped_and_its_calls_counted_as_aborted(http_session, upstream):
    upstream.add_rule(Rule(model="sim-counterexample", latency=1.0))
    validator, settings = make(http_session, upstream)
    started = time.monotonic()

    verdict = await validator.validate(job(settings, stop_at=time.time() + 0.15))

    assert (verdict.status, verdict.reason) == (VerdictStatus.SKIPPED, "deadline")
    assert time.monotonic() - started < 0.8
    assert (verdict.usage.aborted_calls, verdict.usage.calls) == (1, 0)
    await until(lambda: upstream.in_flight == 0)


async def test_cancelling_a_validation_cancels_its_calls(http_session, upstream):
    upstream.latency = 1.0
    validator, settings = make(http_session, upstream)
    task = asyncio.ensure_future(validator.validate(job(settings)))
    await until(lambda: upstream.in_flight == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await until(lambda: upstream.in_flight == 0)
    assert upstream.records[0].cancelled


# --- batches ---------------------------------------------------------------------------------


class FakePool:
    """A validator pool that answers each job with a verdict naming its step."""

    def __init__(self, delay=0.0):
        self.delay = delay
        self.sent: list[list[str]] = []
        self.cancelled = False

    async def send(self, jobs):
        self.sent.append([j.step_text for j in jobs])
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        return [Verdict(PASSED, reason=j.step_text) for j in jobs]


def step_job(text):
    return ValidationJob("req-1", CONVERSATION, None, "", text)


async def test_validations_asked_together_go_as_one_send_as_soon_as_every_expected_one_is_in():
    pool = FakePool()
    batches = ValidationBatches(pool.send, expected=lambda: 3, window_s=5)
    started = time.monotonic()

    verdicts = await asyncio.gather(*(batches.validate(step_job(t)) for t in ("a", "b", "c")))

    assert [v.reason for v in verdicts] == ["a", "b", "c"]  # each waiter gets its own verdict
    assert pool.sent == [["a", "b", "c"]]
    assert time.monotonic() - started < 1  # not held for the window


async def test_a_partial_batch_goes_after_the_window():
    pool = FakePool()
    batches = ValidationBatches(pool.send, expected=lambda: 3, window_s=0.05)
    started = time.monotonic()

    verdict = await batches.validate(step_job("alone"))

    assert verdict.reason == "alone" and pool.sent == [["alone"]]
    assert time.monotonic() - started >= 0.05


async def test_later_validations_start_a_new_batch():
    pool = FakePool()
    batches = ValidationBatches(pool.send, expected=lambda: 2, window_s=5)
    await asyncio.gather(batches.validate(step_job("a")), batches.validate(step_job("b")))
    await asyncio.gather(batches.validate(step_job("c")), batches.validate(step_job("d")))
    assert pool.sent == [["a", "b"], ["c", "d"]]


async def test_cancelling_every_waiter_cancels_the_send():
    pool = FakePool(delay=10)
    batches = ValidationBatches(pool.send, expected=lambda: 2, window_s=5)
    waiters = [asyncio.ensure_future(batches.validate(step_job(t))) for t in ("a", "b")]
    await until(lambda: pool.sent)

    for waiter in waiters:
        waiter.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)

    await until(lambda: pool.cancelled)


async def test_cancelling_one_waiter_keeps_the_send_for_the_others():
    pool = FakePool(delay=0.05)
    batches = ValidationBatches(pool.send, expected=lambda: 2, window_s=5)
    gone = asyncio.ensure_future(batches.validate(step_job("a")))
    kept = asyncio.ensure_future(batches.validate(step_job("b")))
    await until(lambda: pool.sent)
    gone.cancel()
    assert (await kept).reason == "b"
    assert not pool.cancelled


async def test_a_failed_send_fails_every_waiter():
    async def send(jobs):
        raise RuntimeError("pool unreachable")

    batches = ValidationBatches(send, expected=lambda: 2, window_s=5)
    results = await asyncio.gather(
        batches.validate(step_job("a")), batches.validate(step_job("b")), return_exceptions=True
    )
    assert [str(r) for r in results] == ["pool unreachable"] * 2
