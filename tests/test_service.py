"""The real Ray Serve app, called with the official `openai` client, upstream simulated."""

from __future__ import annotations

import json
import urllib.request

import openai
import pytest

from tests.simulated_upstream import Rule, SimulatedUpstream
from tests.support import role_aware_reply

pytestmark = pytest.mark.serve

MODEL = "token-killer-classic"  # the original's shape: every call made, none merged
QUESTION = [{"role": "user", "content": "What is six times seven?"}]


def assert_usage_matches(usage, sim: SimulatedUpstream) -> None:
    prompt, completion = sim.served_usage()
    assert (usage.prompt_tokens, usage.completion_tokens) == (prompt, completion)
    assert usage.total_tokens == prompt + completion


def test_non_stream_answer_goes_through_the_whole_pipeline(client, sim):
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION)

    assert reply.choices[0].message.content == "The fused final answer is 42."
    assert reply.choices[0].finish_reason == "stop"
    models_called = {r.model for r in sim.records}
    assert models_called == {"sim-thinker", "sim-counterexample", "sim-voter", "sim-fuser"}
    extension = reply.model_extra["token_killer"]
    assert extension["profile"] == MODEL
    assert extension["threads_kept"] == 3
    assert extension["steps_validated"] == 6  # 3 threads x 2 steps
    assert extension["steps_failed"] == 0
    assert extension["fusion"]["mode"] == "fused"
    # 3 threads x 2 steps x (1 thinker + 3 counterexamples + 3 voters) + 1 fusion
    assert len(sim.records) == 43
    assert_usage_matches(reply.usage, sim)
    reasoning = reply.choices[0].message.model_extra["reasoning_content"]
    assert "[thread 3 · step 2] We reason about the problem carefully." in reasoning
    assert "[thread 3 · step 2 · passed]" in reasoning


def test_stream_has_the_openai_shape_and_exact_usage(client, sim):
    stream = client.chat.completions.create(
        model=MODEL, messages=QUESTION, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)

    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:] if c.choices)
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    finishes = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1 and finishes[0].choices[0].finish_reason == "stop"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == "The fused final answer is 42."
    reasoning_chunks = [
        c for c in chunks if c.choices and (c.choices[0].delta.model_extra or {}).get("reasoning_content")
    ]
    reasoning = "".join(c.choices[0].delta.model_extra["reasoning_content"] for c in reasoning_chunks)
    # Each of the 6 steps as it was written, then its verdict, as lines of their own.
    assert reasoning.count("We reason about the problem carefully.") == 6
    assert reasoning.count(" · passed]") == 6
    assert all(not c.choices[0].delta.content for c in reasoning_chunks)
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    assert_usage_matches(last.usage, sim)


def test_the_whole_conversation_reaches_threads_and_fuser(client, sim):
    client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "Always answer like a pirate."},
            {"role": "user", "content": "My name is Ada."},
            {"role": "assistant", "content": "Nice to meet you, Ada."},
            {"role": "user", "content": [{"type": "text", "text": "What is my name?"}]},
        ],
    )

    for model in ("sim-thinker", "sim-fuser"):
        calls = [r for r in sim.records if r.model == model]
        assert calls
        for call in calls:
            text = json.dumps(call.messages)
            assert "like a pirate" in text
            assert "My name is Ada." in text and "Nice to meet you, Ada." in text
            assert "What is my name?" in text


def test_failed_validation_revises_the_step_with_the_counterexamples(client, sim):
    sim.default_reply = lambda req: (
        "The step is wrong: 6*7 is not 41." if req["model"] == "sim-counterexample" else role_aware_reply(req)
    )
    # The first three votes (one step's voters) reject it; every later vote passes.
    sim.add_rule(Rule(model="sim-voter", reply="VOTE: COUNTEREXAMPLE", times=3))

    reply = client.chat.completions.create(model=MODEL, messages=QUESTION)

    extension = reply.model_extra["token_killer"]
    assert extension["steps_failed"] == 1
    assert extension["steps_revised"] == 1
    revisions = [r for r in sim.records if r.model == "sim-thinker" and "was challenged" in json.dumps(r.messages)]
    assert len(revisions) == 1
    assert "6*7 is not 41" in json.dumps(revisions[0].messages)
    reasoning = reply.choices[0].message.model_extra["reasoning_content"]
    assert "failed validation, revising" in reasoning and "· revision]" in reasoning
    assert_usage_matches(reply.usage, sim)


def test_a_failed_thread_is_dropped_and_the_others_answer(client, sim):
    # A 400 is not retried: the first thinker call fails for good, so its thread fails.
    sim.add_rule(Rule(model="sim-thinker", fault="400", times=1))

    reply = client.chat.completions.create(model=MODEL, messages=QUESTION)

    extension = reply.model_extra["token_killer"]
    assert extension["threads_kept"] == 2
    assert len(extension["threads_failed"]) == 1
    assert reply.choices[0].message.content == "The fused final answer is 42."
    assert_usage_matches(reply.usage, sim)
    assert sum(1 for r in sim.records if r.status == 400) == 1  # never retried


def test_every_thread_failing_is_a_502_naming_the_cause(client, sim):
    sim.add_rule(Rule(model="sim-thinker", fault="400"))

    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model=MODEL, messages=QUESTION)

    assert caught.value.status_code == 502
    assert "HTTP 400" in caught.value.message
    assert caught.value.response.headers["x-should-retry"] == "false"


def test_fusion_failure_falls_back_to_the_best_thread(client, sim):
    sim.add_rule(Rule(model="sim-fuser", fault="400"))

    reply = client.chat.completions.create(model=MODEL, messages=QUESTION)

    assert reply.choices[0].message.content == "We reason about the problem carefully."
    extension = reply.model_extra["token_killer"]
    assert extension["fusion_fallback_thread"] in (1, 2, 3)
    assert extension["fusion"]["mode"] == "best_thread"


def test_models_list_every_profile_and_health_answers(client, service):
    assert [m.id for m in client.models.list()] == ["token-killer", "token-killer-classic", "token-killer-deep"]
    assert client.models.retrieve("token-killer-deep").id == "token-killer-deep"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-5")
    with urllib.request.urlopen(f"{service}/health") as response:
        assert json.loads(response.read()) == {"status": "ok"}
