"""Context strategies, validation verdicts and fusion, each against the simulated upstream."""

import pytest

from actors.config import ContextConfig, FusionConfig, ValidationConfig
from actors.context import ContextBuilder
from actors.fusion import Fuser
from actors.model_client import role_clients
from actors.prompts import load_prompts
from actors.schemas import (
    Conversation,
    FusionJob,
    Step,
    ThreadResult,
    UsageLedger,
    ValidationJob,
    VerdictStatus,
)
from actors.validation import StepValidator
from tests.simulated_upstream import Rule
from tests.support import sim_config

PROMPTS = load_prompts("en")
STEPS = [Step(index=i, text=f"step-{i + 1}-text", complete=False) for i in range(5)]


def clients(session, upstream):
    return role_clients(session, sim_config(upstream.base_url))


# --- context -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("strategy", "shown", "hidden"),
    [
        ("full", [1, 2, 3, 4, 5], []),
        ("minimal", [5], [1, 2, 3, 4]),
        ("smart", [1, 4, 5], [2, 3]),
    ],
)
async def test_context_strategies(http_session, upstream, strategy, shown, hidden):
    builder = ContextBuilder(
        ContextConfig(strategy=strategy, preserve_recent_steps=2), PROMPTS, clients(http_session, upstream)["summarizer"]
    )
    text = await builder.build(STEPS, UsageLedger())

    for n in shown:
        assert f"step-{n}-text" in text
    for n in hidden:
        assert f"step-{n}-text" not in text
    summarized = strategy == "smart"
    assert ("Summary of the middle steps." in text) == summarized
    assert len(upstream.records) == int(summarized)
    if summarized:
        prompt = upstream.records[0].messages[-1]["content"]
        assert "step-2-text" in prompt and "step-3-text" in prompt and "step-4-text" not in prompt


async def test_smart_context_summarizes_once_per_middle(http_session, upstream):
    builder = ContextBuilder(ContextConfig(), PROMPTS, clients(http_session, upstream)["summarizer"])
    await builder.build(STEPS, UsageLedger())
    await builder.build(STEPS, UsageLedger())
    assert len(upstream.records) == 1


async def test_a_failed_summary_falls_back_to_the_full_context(http_session, upstream):
    upstream.add_rule(Rule(model="sim-summarizer", fault="400"))
    builder = ContextBuilder(ContextConfig(), PROMPTS, clients(http_session, upstream)["summarizer"])
    text = await builder.build(STEPS, UsageLedger())
    assert all(f"step-{n}-text" in text for n in range(1, 6))


# --- validation ----------------------------------------------------------------------------

JOB = ValidationJob("req-1", Conversation("Q?"), "", "6*7 = 42")


def validator(session, upstream, **config):
    c = clients(session, upstream)
    return StepValidator(ValidationConfig(**config), PROMPTS, c["counterexample"], c["voter"])


@pytest.mark.parametrize(
    ("votes", "status"),
    [
        (["VOTE: STEP"] * 3, VerdictStatus.PASSED),
        (["VOTE: STEP", "VOTE: STEP", "VOTE: COUNTEREXAMPLE"], VerdictStatus.PASSED),
        (["VOTE: STEP", "VOTE: COUNTEREXAMPLE", "VOTE: COUNTEREXAMPLE"], VerdictStatus.FAILED),
        (["VOTE: STEP", "no idea", "no idea"], VerdictStatus.FAILED),
        (["投票：主线程", "投票：主线程", "投票：反例"], VerdictStatus.PASSED),
    ],
)
async def test_votes_decide_the_verdict(http_session, upstream, votes, status):
    for vote in votes:
        upstream.add_rule(Rule(model="sim-voter", reply=vote, times=1))
    verdict = await validator(http_session, upstream).validate(JOB)
    assert verdict.status is status
    assert len(verdict.counterexamples) == 3
    assert (verdict.usage.prompt_tokens, verdict.usage.completion_tokens) == upstream.served_usage()


async def test_voters_see_the_counterexamples(http_session, upstream):
    upstream.add_rule(Rule(model="sim-counterexample", reply="But 6*7 could be 41?"))
    await validator(http_session, upstream, num_counterexamples=2, num_voters=1, pass_threshold=1).validate(JOB)
    voter_calls = [r for r in upstream.records if r.model == "sim-voter"]
    assert len(voter_calls) == 1
    assert voter_calls[0].messages[-1]["content"].count("But 6*7 could be 41?") == 2


async def test_unreachable_validators_leave_the_step_unvalidated(http_session, upstream):
    upstream.add_rule(Rule(model="sim-voter", fault="400"))
    verdict = await validator(http_session, upstream).validate(JOB)
    assert verdict.status is VerdictStatus.UNVALIDATED


# --- fusion --------------------------------------------------------------------------------

THREADS = (
    ThreadResult(0, [Step(0, "a", False), Step(1, "the answer is 41", False, flagged=True)]),
    ThreadResult(1, [Step(0, "b", False), Step(1, "the answer is 42", True)]),
)
FUSION = FusionJob("req-1", Conversation("Q?", system="Be brief."), THREADS)


def fuser(session, upstream, strategy="intelligent"):
    return Fuser(FusionConfig(strategy=strategy), PROMPTS, clients(session, upstream)["fuser"])


async def test_intelligent_fusion_streams_and_marks_challenged_steps(http_session, upstream):
    deltas = [d async for d in fuser(http_session, upstream).fuse(FUSION)]

    assert "".join(d.text for d in deltas) == "The fused final answer is 42."
    assert len([d for d in deltas if d.text]) == 6  # token by token
    usage = deltas[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == upstream.served_usage()
    prompt = upstream.records[0].messages
    assert "Be brief." in prompt[0]["content"]
    assert "the answer is 41 " not in prompt[-1]["content"]
    assert "Step 2 (CHALLENGED): the answer is 41" in prompt[-1]["content"]


async def test_concat_fusion_makes_no_call(http_session, upstream):
    deltas = [d async for d in fuser(http_session, upstream, "concat").fuse(FUSION)]
    assert "".join(d.text for d in deltas) == "[1] the answer is 41\n\n[2] the answer is 42"
    assert not upstream.records


async def test_a_failed_fuser_falls_back_to_the_best_thread(http_session, upstream):
    upstream.add_rule(Rule(model="sim-fuser", fault="400"))
    deltas = [d async for d in fuser(http_session, upstream).fuse(FUSION)]
    assert [(d.text, d.fallback_from_thread) for d in deltas] == [("the answer is 42", 1)]
