"""What a thread sees of its earlier steps: full, minimal, smart (summarized middle), with
summaries cached by the steps they cover and updated incrementally."""

import itertools
import re

import pytest

from actors.budget import TokenBudget
from actors.config import ContextConfig
from actors.context import ContextBuilder
from actors.model_client import role_clients
from actors.prompts import load_prompts
from actors.schemas import Step, UsageLedger
from tests.simulated_upstream import Rule
from tests.support import sim_config

PROMPTS = load_prompts("en")
STEPS = [Step(index=i, text=f"step-{i + 1}-text", complete=False) for i in range(6)]


def builder(session, upstream, strategy="smart", *, incremental=True, recent=2):
    summarizer = role_clients(session, sim_config(upstream.base_url))["summarizer"]
    config = ContextConfig(strategy=strategy, preserve_recent_steps=recent)
    return ContextBuilder(config, PROMPTS, summarizer, incremental=incremental)


def numbered_summaries(upstream):
    """Each summarizer call answers "Summary #n." (n from 1), to tell summaries apart."""
    counter = itertools.count(1)
    upstream.add_rule(Rule(model="sim-summarizer", reply=lambda request: f"Summary #{next(counter)}."))


def summarizer_prompts(upstream):
    return [r.messages[-1]["content"] for r in upstream.records if r.model == "sim-summarizer"]


async def test_the_first_step_has_no_context(http_session, upstream):
    assert await builder(http_session, upstream).build([], UsageLedger()) == ""
    assert upstream.records == []


@pytest.mark.parametrize(
    ("strategy", "shown", "hidden"),
    [
        ("full", [1, 2, 3, 4, 5], []),
        ("minimal", [5], [1, 2, 3, 4]),
        ("smart", [1, 4, 5], [2, 3]),
    ],
)
async def test_context_strategies(http_session, upstream, strategy, shown, hidden):
    usage = UsageLedger()
    text = await builder(http_session, upstream, strategy).build(STEPS[:5], usage)

    for n in shown:
        assert f"Step {n}: step-{n}-text" in text
    for n in hidden:
        assert f"step-{n}-text" not in text
    summarized = strategy == "smart"
    assert ("Summary of the middle steps: Summary of the middle steps." in text) == summarized
    assert len(upstream.records) == int(summarized)
    assert (usage.prompt_tokens, usage.completion_tokens) == upstream.served_usage()
    if summarized:
        [prompt] = summarizer_prompts(upstream)
        assert "step-2-text" in prompt and "step-3-text" in prompt and "step-4-text" not in prompt


async def test_smart_context_is_the_full_text_while_nothing_is_in_the_middle(http_session, upstream):
    text = await builder(http_session, upstream).build(STEPS[:3], UsageLedger())  # first + 2 recent
    assert all(f"step-{n}-text" in text for n in (1, 2, 3))
    assert upstream.records == []


async def test_a_summary_is_made_once_for_the_steps_it_covers(http_session, upstream):
    context = builder(http_session, upstream)
    first = await context.build(STEPS[:5], UsageLedger())
    usage = UsageLedger()
    assert await context.build(STEPS[:5], usage) == first
    assert len(upstream.records) == 1 and usage.calls == 0


async def test_a_revised_middle_step_is_summarized_afresh(http_session, upstream):
    numbered_summaries(upstream)
    context = builder(http_session, upstream)
    await context.build(STEPS[:5], UsageLedger())
    revised = [STEPS[0], Step(1, "step-2-revised", False), *STEPS[2:5]]

    text = await context.build(revised, UsageLedger())

    assert "Summary #2." in text
    second = summarizer_prompts(upstream)[1]
    assert "step-2-revised" in second and "step-3-text" in second and "Summary #1" not in second


async def test_an_incremental_summary_folds_only_the_new_step_into_the_previous_summary(http_session, upstream):
    numbered_summaries(upstream)
    context = builder(http_session, upstream)
    await context.build(STEPS[:5], UsageLedger())  # middle: steps 2-3

    text = await context.build(STEPS[:6], UsageLedger())  # middle: steps 2-4

    assert "Summary of the middle steps: Summary #2." in text
    first, second = summarizer_prompts(upstream)
    assert "step-2-text" in first and "step-3-text" in first
    assert "Summary so far: Summary #1." in second
    assert "step-4-text" in second
    assert "step-2-text" not in second and "step-3-text" not in second


async def test_without_incremental_summaries_the_whole_middle_is_summarized_again(http_session, upstream):
    numbered_summaries(upstream)
    context = builder(http_session, upstream, incremental=False)
    await context.build(STEPS[:5], UsageLedger())
    await context.build(STEPS[:6], UsageLedger())

    second = summarizer_prompts(upstream)[1]
    assert all(f"step-{n}-text" in second for n in (2, 3, 4))
    assert "Summary #1" not in second


async def test_incremental_summaries_read_each_step_once_and_cost_fewer_prompt_tokens(http_session, upstream):
    steps = [Step(i, " ".join(f"s{i}w{j}" for j in range(30)), False) for i in range(6)]  # 30 words each
    spent, read = {}, {}
    for incremental in (True, False):
        upstream.reset()
        context = builder(http_session, upstream, recent=1, incremental=incremental)
        usage = UsageLedger()
        for end in range(3, 7):  # middles of steps 2, 2-3, 2-4, 2-5
            await context.build(steps[:end], usage)
        spent[incremental] = usage.prompt_tokens
        read[incremental] = sum(
            1 for prompt in summarizer_prompts(upstream) for word in prompt.split() if re.fullmatch(r"s\dw\d+", word)
        )
    assert read == {True: 4 * 30, False: (1 + 2 + 3 + 4) * 30}
    assert spent[True] < spent[False]


async def test_a_failed_summary_falls_back_to_the_full_context(http_session, upstream):
    upstream.add_rule(Rule(model="sim-summarizer", fault="400"))
    usage = UsageLedger()
    text = await builder(http_session, upstream).build(STEPS[:5], usage)
    assert all(f"step-{n}-text" in text for n in range(1, 6))
    assert usage.roles["summarizer"].failed_calls == 1


async def test_a_summary_that_does_not_fit_the_budget_is_not_made(http_session, upstream):
    budget = TokenBudget(20)  # less than the summarizer's max_tokens (64) alone
    text = await builder(http_session, upstream).build(STEPS[:5], UsageLedger(), budget=budget)
    assert all(f"step-{n}-text" in text for n in range(1, 6))
    assert upstream.records == []
    assert (budget.spent, budget.reserved) == (0, 0)


async def test_a_summary_within_the_budget_is_settled_at_what_it_cost(http_session, upstream):
    budget = TokenBudget(10_000)
    usage = UsageLedger()
    await builder(http_session, upstream).build(STEPS[:5], usage, budget=budget)
    assert (budget.spent, budget.reserved) == (usage.total_tokens, 0)
    assert usage.total_tokens == sum(upstream.served_usage()) > 0
