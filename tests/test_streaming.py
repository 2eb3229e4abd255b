"""Streaming as clients of reasoning models expect it: live reasoning, live tokens, cancellation."""

import json
import time

import openai
import pytest

from tests.conftest import SERVICE_KEY
from tests.simulated_upstream import Rule
from tests.support import check_a_client_disconnect_stops_every_upstream_call

pytestmark = pytest.mark.serve

MODEL = "token-killer"
QUESTION = [{"role": "user", "content": "What is six times seven?"}]


def reasoning_of(chunk) -> str:
    if not chunk.choices:
        return ""
    return (chunk.choices[0].delta.model_extra or {}).get("reasoning_content") or ""


def content_of(chunk) -> str:
    return (chunk.choices[0].delta.content or "") if chunk.choices else ""


def test_a_step_shows_the_moment_it_is_written_and_the_answer_token_by_token(client, sim):
    latency, interval = 0.3, 0.2
    client.chat.completions.create(model=MODEL, messages=QUESTION)  # a warm service, as a user meets it
    sim.reset()
    sim.latency = latency
    sim.token_interval = interval
    started = time.monotonic()
    arrivals = []

    for chunk in client.chat.completions.create(model=MODEL, messages=QUESTION, stream=True):
        arrivals.append((time.monotonic(), reasoning_of(chunk), content_of(chunk)))
    finished = time.monotonic()

    first_reasoning_at, first_reasoning, _ = next(a for a in arrivals if a[1])
    # One thinker call (L), not its validation (two more calls deep): the step as written.
    assert first_reasoning_at - started < latency + 0.1
    assert first_reasoning.startswith("[thread ") and "· passed" not in first_reasoning
    verdict_at = next(t for t, r, _ in arrivals if "· passed" in r)
    assert verdict_at - started > 1.8 * latency  # the verdict follows (critics: one more call), on its own line
    assert finished - started > 5 * latency
    fuser_call = next(r for r in sim.records if r.model == "sim-fuser")
    fuser_first_token = fuser_call.started + latency
    content_times = [t for t, _, c in arrivals if c]
    assert content_times[0] - fuser_first_token < interval
    # Not buffered: the six tokens arrive spread over the fuser's five token intervals.
    assert content_times[-1] - content_times[0] > 3 * interval


def test_live_tokens_stream_the_thinkers_words_as_they_come(client, sim):
    sim.token_interval = 0.05
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=QUESTION,
            stream=True,
            extra_body={"token_killer": {"thinking": {"live_tokens": True, "num_threads": 1, "max_steps": 1}}},
        )
    )
    pieces = [reasoning_of(c) for c in chunks if reasoning_of(c)]
    reasoning = "".join(pieces)
    assert "[thread 1 · step 1] We reason about the problem carefully." in reasoning
    assert len(pieces) >= 4  # word by word, not one finished step
    assert any(r.stream for r in sim.records if r.model == "sim-thinker")


def test_reasoning_can_be_hidden_per_request(client, sim):
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=QUESTION, stream=True, extra_body={"include_reasoning": False}
        )
    )
    assert not any(reasoning_of(c) for c in chunks)
    assert "".join(content_of(c) for c in chunks) == "The fused final answer is 42."

    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, extra_body={"include_reasoning": False})
    assert "reasoning_content" not in (reply.choices[0].message.model_extra or {})


def test_usage_reasoning_tokens_are_everything_but_the_fusers_output(client, sim):
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION)

    by_role = reply.model_extra["token_killer"]["usage_by_role"]
    assert set(by_role) <= {"thinker", "counterexample", "voter", "fuser"}
    fuser_completion = sum(r.completion_tokens for r in sim.records if r.model == "sim-fuser")
    assert by_role["fuser"]["completion_tokens"] == fuser_completion == 6
    details = reply.usage.completion_tokens_details
    assert details.reasoning_tokens == reply.usage.completion_tokens - fuser_completion
    assert sum(r["calls"] for r in by_role.values()) == len(sim.records)


def test_threads_that_fail_at_once_are_a_real_502_not_a_stream(client, sim):
    sim.add_rule(Rule(model="sim-thinker", fault="400"))

    with pytest.raises(openai.APIStatusError, match="every reasoning thread failed") as caught:
        for _ in client.chat.completions.create(model=MODEL, messages=QUESTION, stream=True):
            pass
    assert caught.value.status_code == 502


def test_a_failure_after_the_stream_started_is_an_error_event(client, sim):
    # Steps are written (the stream starts), then the fuser fails mid-answer: too late for a status.
    sim.add_rule(Rule(model="sim-fuser", fault="reset"))

    chunks = []
    with pytest.raises(openai.APIError, match="fuser failed mid-answer"):
        for chunk in client.chat.completions.create(model=MODEL, messages=QUESTION, stream=True):
            chunks.append(chunk)
    assert any(reasoning_of(c) for c in chunks)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
def test_a_client_disconnect_stops_every_upstream_call(service, sim, stream):
    check_a_client_disconnect_stops_every_upstream_call(service, SERVICE_KEY, sim, stream)


def test_silent_phases_send_keepalive_comments_that_clients_ignore(service, client, sim):
    import urllib.request

    sim.latency = 0.5  # silent for longer than the test service's 0.2 s keepalive interval
    request = urllib.request.Request(
        f"{service}/v1/chat/completions",
        data=json.dumps({"model": MODEL, "messages": QUESTION, "stream": True}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {SERVICE_KEY}"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        lines = response.read().decode().splitlines()

    assert ": keepalive" in lines
    assert lines[-2:] == ["data: [DONE]", ""] or lines[-1] == "data: [DONE]"
    sim.latency = 0.02
    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, stream=True))
    assert "".join(content_of(c) for c in chunks) == "The fused final answer is 42."
