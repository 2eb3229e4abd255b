"""Spend control through the real service: profiles as models, per-request overrides, budgets,
the economy mechanisms at identical decisions, cached tokens and cost."""

import json

import pytest

from tests.scenarios import scenario_reply

pytestmark = pytest.mark.serve

QUESTION = [{"role": "user", "content": "What is six times seven?"}]
PROFILES = ["token-killer", "token-killer-classic", "token-killer-deep"]
DECISIONS = ("steps_validated", "steps_failed", "steps_revised", "steps_flagged", "threads_kept")


def decisions(extension: dict) -> dict:
    return {key: extension[key] for key in DECISIONS}


@pytest.mark.parametrize("model", PROFILES)
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_every_profile_answers_with_the_official_client(client, sim, model, stream):
    reply = client.chat.completions.create(
        model=model, messages=QUESTION, stream=stream, stream_options={"include_usage": True} if stream else None
    )
    if stream:
        chunks = list(reply)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "The fused final answer is 42."
        assert chunks[-1].model == model and chunks[-1].model_extra["token_killer"]["profile"] == model
    else:
        assert reply.choices[0].message.content == "The fused final answer is 42."
        assert reply.model == model and reply.model_extra["token_killer"]["profile"] == model


@pytest.mark.parametrize("scenario", ["challenged-pass", "refute", "agree"])
def test_the_economy_takes_the_same_decisions_for_far_fewer_tokens(client, sim, scenario):
    sim.default_reply = scenario_reply(scenario)
    runs = {}
    for model in ("token-killer-classic", "token-killer"):
        sim.reset()
        reply = client.chat.completions.create(model=model, messages=QUESTION)
        runs[model] = (reply.usage.total_tokens, len(sim.records), decisions(reply.model_extra["token_killer"]))

    classic, economy = runs["token-killer-classic"], runs["token-killer"]
    assert economy[2] == classic[2]
    assert economy[0] <= 0.5 * classic[0], (economy[0], classic[0])
    assert economy[1] < classic[1]


def test_n_sampling_asks_once_and_makes_up_what_an_upstream_ignores(client, sim):
    sim.default_reply = scenario_reply("challenged-pass")
    client.chat.completions.create(model="token-killer", messages=QUESTION)
    critics = [r for r in sim.records if r.model == "sim-counterexample"]
    assert len(critics) == 6 and {r.n for r in critics} == {3}  # one call a step, n = 3

    sim.reset()
    sim.supports_n = False  # a provider that answers one choice whatever `n` says
    try:
        # Each Validator replica learns it from its first answer; soon no call asks for n again.
        for _ in range(6):
            sim.reset()
            reply = client.chat.completions.create(model="token-killer", messages=QUESTION)
            assert reply.model_extra["token_killer"]["steps_validated"] == 6
            critics = [r for r in sim.records if r.model == "sim-counterexample"]
            assert len(critics) == 6 * 3  # every answer there, made up with separate calls
            if not any(r.n > 1 for r in sim.records):
                break
        else:
            pytest.fail("the validators kept asking an upstream that ignores n for n choices")
    finally:
        sim.supports_n = True


def test_overrides_shape_one_request(client, sim):
    reply = client.chat.completions.create(
        model="token-killer-classic",
        messages=QUESTION,
        extra_body={"token_killer": {"thinking": {"num_threads": 1, "max_steps": 1}, "validation": {"enabled": False}}},
    )
    assert [r.model for r in sim.records] == ["sim-thinker", "sim-fuser"]
    assert reply.model_extra["token_killer"]["threads_kept"] == 1


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_budget_is_never_overspent_and_the_request_still_answers(client, sim, stream):
    budget = 2500  # a classic run costs about 3,100 tokens here
    reply = client.chat.completions.create(
        model="token-killer-classic",
        messages=QUESTION,
        stream=stream,
        stream_options={"include_usage": True} if stream else None,
        extra_body={"token_killer": {"budget_tokens": budget}},
    )
    if stream:
        chunks = list(reply)
        answer = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        reasoning = "".join(
            (c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks if c.choices
        )
        usage, extension = chunks[-1].usage, chunks[-1].model_extra["token_killer"]
    else:
        answer = reply.choices[0].message.content
        reasoning = reply.choices[0].message.model_extra["reasoning_content"]
        usage, extension = reply.usage, reply.model_extra["token_killer"]

    assert answer
    assert usage.total_tokens <= budget * 1.05
    served = sum(r.prompt_tokens + r.completion_tokens for r in sim.records if r.usage_reported)
    assert usage.total_tokens == served
    assert extension["budget_tokens"] == budget
    assert extension["skipped"] and all(s["reason"] == "budget" for s in extension["skipped"])
    assert "[skipped " in reasoning


def test_the_deep_profile_summarizes_its_middle_steps_incrementally(client, sim):
    reply = client.chat.completions.create(model="token-killer-deep", messages=QUESTION)

    summaries = [r for r in sim.records if r.model == "sim-summarizer"]
    # 6 steps, the last 2 kept whole: steps 5 and 6 are written after a summary of the middle.
    assert summaries and reply.model_extra["token_killer"]["usage_by_role"]["summarizer"]["calls"] == len(summaries)
    later = [r for r in summaries if "Summary so far" in json.dumps(r.messages)]
    assert later, "a later summary folds the new step into the previous summary"
    assert "Summary of the middle steps." in json.dumps(later[0].messages)
    thinker_prompts = json.dumps([r.messages for r in sim.records if r.model == "sim-thinker"])
    assert "Summary of the middle steps: Summary of the middle steps." in thinker_prompts


def test_cost_and_cached_tokens_are_what_the_upstreams_reported(client, sim):
    sim.prefix_cache = True
    try:
        reply = client.chat.completions.create(model="token-killer", messages=QUESTION)
    finally:
        sim.prefix_cache = False

    cached = reply.usage.prompt_tokens_details.cached_tokens
    assert cached == sum(r.cached_tokens for r in sim.records if r.usage_reported) > 0
    usage = reply.usage
    # Test prices per million tokens: input 1.0, cached input 0.5, output 2.0 (tests/conftest.py).
    expected = ((usage.prompt_tokens - cached) * 1.0 + cached * 0.5 + usage.completion_tokens * 2.0) / 1e6
    cost = reply.model_extra["token_killer"]["cost"]
    assert cost["total_usd"] == pytest.approx(expected, rel=1e-6)
    assert sum(cost["by_role"].values()) == pytest.approx(expected, rel=1e-6)
