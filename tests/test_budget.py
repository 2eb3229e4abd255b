"""A request's token budget: work is started only if its worst case fits, and the reported usage
stays within the budget."""

import asyncio
import json

import pytest

from actors.budget import TokenBudget
from actors.fusion import Fuser
from actors.model_client import role_clients
from actors.prompts import load_prompts
from actors.protocol import APIError
from actors.schemas import Conversation, Skipped, StepChecked, ThinkJob, ThreadEnded, UsageLedger, VerdictStatus
from actors.serving_chat import ChatServing
from actors.thinking import RequestThinking
from actors.validation import StepValidator, ValidationBatches
from tests.support import sim_config

PROMPTS = load_prompts("en")
QUESTION = "What is six times seven?"
CONVERSATION = Conversation(QUESTION, turns=(("user", QUESTION),), messages=({"role": "user", "content": QUESTION},))


# --- TokenBudget -----------------------------------------------------------------------------


def test_an_unbounded_budget_takes_everything():
    budget = TokenBudget(None)
    assert not budget.bounded and budget.left is None
    reservation = budget.reserve(10**9)
    assert reservation is not None and reservation.tokens == 0
    budget.settle(reservation, 500)
    assert budget.spent == 500 and budget.left is None


def test_a_reservation_holds_tokens_until_settled_at_what_was_spent():
    budget = TokenBudget(100)
    first = budget.reserve(60)
    assert (budget.reserved, budget.left) == (60, 40)
    assert budget.reserve(41) is None  # does not fit beside the first
    assert (budget.reserved, budget.left) == (60, 40)  # a refusal holds nothing
    budget.settle(first, 25)
    assert (budget.spent, budget.reserved, budget.left, first.tokens) == (25, 0, 75, 0)
    assert budget.reserve(75) is not None  # exactly what is left fits
    assert budget.reserve(1) is None


def test_settling_more_than_was_reserved_counts_what_was_spent():
    budget = TokenBudget(100)
    budget.settle(budget.reserve(10), 30)  # the estimate was short
    assert (budget.spent, budget.left) == (30, 70)


# --- thinking within a budget ----------------------------------------------------------------


def rig(session, upstream, **sections):
    sections.setdefault("thinking", {"num_threads": 3, "max_steps": 3})
    config = sim_config(upstream.base_url, **sections)
    clients = role_clients(session, config)
    validator = StepValidator(PROMPTS, clients["counterexample"], clients["voter"])

    async def send(jobs):
        return list(await asyncio.gather(*(validator.validate(job) for job in jobs)))

    def think(job):
        thinking = RequestThinking(job, PROMPTS, clients, None)
        thinking.validate = ValidationBatches(send, lambda: thinking.live).validate
        return thinking.updates()

    async def fuse_whole(job):
        yield await Fuser(PROMPTS, clients["fuser"]).answer(job)

    serving = ChatServing(
        config,
        PROMPTS,
        think_stream=think,
        think_whole=think,
        fuse_stream=Fuser(PROMPTS, clients["fuser"]).fuse,
        fuse_whole=fuse_whole,
    )
    return config, think, serving


async def think_within(think, settings, budget):
    usage, events = UsageLedger(), []
    async for update in think(ThinkJob("req-1", CONVERSATION, settings, budget_tokens=budget)):
        usage.merge(update.usage)
        events += update.events
    return usage, events


@pytest.mark.parametrize("budget", [500, 700, 1000])
async def test_thinking_spends_within_its_budget_and_reports_what_it_skipped(http_session, upstream, budget):
    config, think, _ = rig(http_session, upstream)

    usage, events = await think_within(think, config.profile_settings["token-killer"], budget)

    assert usage.total_tokens <= budget * 1.05
    assert (usage.prompt_tokens, usage.completion_tokens) == upstream.served_usage()
    skipped = [e for e in events if isinstance(e, Skipped)]
    assert skipped and {s.reason for s in skipped} == {"budget"}
    assert any(e.result.steps for e in events if isinstance(e, ThreadEnded))


async def test_a_budget_too_small_for_every_thread_skips_the_last_ones(http_session, upstream):
    config, think, _ = rig(http_session, upstream)
    _, events = await think_within(think, config.profile_settings["token-killer"], 500)
    assert Skipped("thread 3", "budget") in events
    assert len([e for e in events if isinstance(e, ThreadEnded)]) < 3


async def test_validations_the_budget_cannot_pay_for_are_reported_as_skipped(http_session, upstream):
    config, think, _ = rig(http_session, upstream)

    _, events = await think_within(think, config.profile_settings["token-killer"], 1000)

    unpaid = [e for e in events if isinstance(e, StepChecked) and e.verdict.status is VerdictStatus.SKIPPED]
    assert unpaid and all(e.verdict.reason == "budget" for e in unpaid)
    skipped = {s.what for s in events if isinstance(s, Skipped)}
    for thread in sorted({e.thread for e in unpaid}):
        first = min(e.index for e in unpaid if e.thread == thread)
        assert f"validation of step {first + 1} of thread {thread + 1}" in skipped


async def test_an_unbounded_request_skips_nothing(http_session, upstream):
    config, think, _ = rig(http_session, upstream)
    usage, events = await think_within(think, config.profile_settings["token-killer"], None)
    assert not [e for e in events if isinstance(e, Skipped)]
    assert all(e.verdict.status is VerdictStatus.PASSED for e in events if isinstance(e, StepChecked))


# --- a whole request within a budget ---------------------------------------------------------


def request(budget, **fields):
    body = {"model": "token-killer", "messages": [{"role": "user", "content": QUESTION}], **fields}
    if budget is not None:
        body["token_killer"] = {"budget_tokens": budget}
    return json.dumps(body).encode()


async def test_a_small_budget_still_answers_within_it(http_session, upstream):
    _, _, serving = rig(http_session, upstream)

    completion = await serving.complete(serving.prepare(request(600), "req-1"))

    assert completion.choices[0].message.content
    assert completion.usage.total_tokens <= 600 * 1.05
    assert completion.usage.total_tokens == sum(upstream.served_usage())
    extension = completion.token_killer
    assert extension["budget_tokens"] == 600
    assert extension["skipped"] and {s["reason"] for s in extension["skipped"]} == {"budget"}


async def test_a_budget_below_the_minimum_is_refused_saying_the_minimum(http_session, upstream):
    _, _, serving = rig(http_session, upstream)
    with pytest.raises(APIError) as caught:
        serving.prepare(request(1), "req-1")
    error = caught.value
    assert (error.status, error.param, error.code) == (400, "token_killer.budget_tokens", "budget_too_small")
    minimum = int(error.message.split("needs at least ")[1].split()[0])
    assert minimum > 64  # at least one thinking call's answer
    serving.prepare(request(minimum), "req-2")  # the minimum itself is accepted
    with pytest.raises(APIError):
        serving.prepare(request(minimum - 1), "req-3")
    assert upstream.records == []


async def test_the_configured_default_budget_applies_to_a_request_without_one(http_session, upstream):
    _, _, serving = rig(http_session, upstream, limits={"budget_tokens": 5000})
    prepared = serving.prepare(request(None), "req-1")
    assert prepared.plan.settings.budget_tokens == 5000
    assert prepared.plan.fusion_budget_tokens is not None
