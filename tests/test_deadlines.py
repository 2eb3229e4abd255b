"""Deadlines hold end to end, and the usage reported is exact even when work is cut short."""

import time

import pytest

from tests.simulated_upstream import Rule

pytestmark = pytest.mark.serve

QUESTION = [{"role": "user", "content": "What is six times seven?"}]


def served_for(sim, tag: str) -> tuple[int, int]:
    """What the simulated upstream served, and reported, for one request."""
    done = [r for r in sim.records if r.tag == tag and r.usage_reported]
    return sum(r.prompt_tokens for r in done), sum(r.completion_tokens for r in done)


def test_a_deadline_fuses_what_exists_in_time(client, sim):
    sim.latency = 0.3  # a full classic run: 2 steps (3L + 3L) + fusion ≈ 2.1 s

    started = time.monotonic()
    reply = client.chat.completions.create(
        model="token-killer-classic", messages=QUESTION, extra_body={"deadline_s": 1.6}
    )
    elapsed = time.monotonic() - started

    assert elapsed < 1.6 + 0.3
    assert reply.choices[0].message.content == "The fused final answer is 42."
    assert reply.model_extra["token_killer"]["steps_validated"] < 6  # not every step made it


def test_a_slow_fuser_is_cut_at_the_deadline_and_usage_is_what_was_served(client, sim):
    sim.add_rule(Rule(model="sim-fuser", latency=10))
    tag = f"deadline-{time.time_ns()}"

    started = time.monotonic()
    reply = client.chat.completions.create(
        model="token-killer", messages=QUESTION, extra_body={"deadline_s": 3}, extra_headers={"x-request-id": tag}
    )
    elapsed = time.monotonic() - started

    assert elapsed < 3.5
    extension = reply.model_extra["token_killer"]
    assert extension["fusion"]["mode"] == "best_thread" and extension["fusion"]["reason"] == "deadline"
    assert reply.choices[0].message.content == "We reason about the problem carefully."
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == served_for(sim, tag)
    assert extension["calls_aborted"] == 1  # the fuser's call, stopped before its usage came


def test_a_stream_cut_at_the_deadline_ends_with_length(client, sim):
    # Only the fuser streams: 40 words, one each 0.3 s, so the 3 s deadline cuts it. The gap stays
    # far below the test config's 2 s read timeout, which would end the stream as an upstream failure.
    sim.token_interval = 0.3
    long_answer = " ".join(f"word{i}" for i in range(40))
    sim.add_rule(Rule(model="sim-fuser", reply=long_answer))
    tag = f"deadline-stream-{time.time_ns()}"

    started = time.monotonic()
    chunks = list(
        client.chat.completions.create(
            model="token-killer",
            messages=QUESTION,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"deadline_s": 3},
            extra_headers={"x-request-id": tag},
        )
    )
    elapsed = time.monotonic() - started

    assert elapsed < 3.5
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content and long_answer.startswith(content) and content != long_answer
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == served_for(sim, tag)
    assert chunks[-1].model_extra["token_killer"]["calls_aborted"] == 1


def test_work_cut_by_the_deadline_is_counted_exactly(client, sim):
    # Thinking stops at the deadline less the fusion reserve (0.5 s here): step 1 is written at
    # 0.5 s, step 2 and step 1's critics are in flight when thinking stops at 0.7 s.
    sim.latency = 0.5
    tag = f"cut-{time.time_ns()}"

    reply = client.chat.completions.create(
        model="token-killer", messages=QUESTION, extra_body={"deadline_s": 1.2}, extra_headers={"x-request-id": tag}
    )

    extension = reply.model_extra["token_killer"]
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == served_for(sim, tag)
    served_calls = sum(1 for r in sim.records if r.tag == tag and r.usage_reported)
    assert sum(role["calls"] for role in extension["usage_by_role"].values()) == served_calls
    cancelled = sum(1 for r in sim.records if r.tag == tag and not r.usage_reported)
    assert extension["calls_aborted"] == cancelled >= 2


def test_retry_after_beyond_backoff_max_is_not_waited_for(client, sim):
    # The test config caps backoff at 2 s: a provider asking for 30 s is not retried (the call
    # fails; its thread is dropped), rather than holding the request for 30 s.
    sim.add_rule(Rule(model="sim-thinker", fault="429", retry_after=30, times=1))

    started = time.monotonic()
    reply = client.chat.completions.create(model="token-killer", messages=QUESTION)

    assert time.monotonic() - started < 5
    assert reply.model_extra["token_killer"]["threads_kept"] == 2
    assert sum(1 for r in sim.records if r.status == 429) == 1
