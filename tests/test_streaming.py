"""Streaming as clients of reasoning models expect it: live reasoning, live tokens, cancellation."""

import json
import time
import uuid

import openai
import pytest

from tests.conftest import SERVICE_KEY
from tests.simulated_upstream import Rule

pytestmark = pytest.mark.serve

MODEL = "token-killer"
QUESTION = [{"role": "user", "content": "What is six times seven?"}]


def reasoning_of(chunk) -> str:
    if not chunk.choices:
        return ""
    return (chunk.choices[0].delta.model_extra or {}).get("reasoning_content") or ""


def content_of(chunk) -> str:
    return (chunk.choices[0].delta.content or "") if chunk.choices else ""


def test_reasoning_arrives_as_steps_finish_and_the_answer_token_by_token(client, sim):
    latency, interval = 0.3, 0.2
    sim.latency = latency
    sim.token_interval = interval
    started = time.monotonic()
    arrivals = []

    for chunk in client.chat.completions.create(model=MODEL, messages=QUESTION, stream=True):
        arrivals.append((time.monotonic(), reasoning_of(chunk), content_of(chunk)))
    finished = time.monotonic()

    first_reasoning = next(t for t, r, _ in arrivals if r)
    # One step = thinking (L) + its validation (counterexamples L, voters L). Thinking ends
    # with step 2's validation and fusion follows: the first step shows long before the end.
    assert first_reasoning - started < 4.5 * latency
    assert finished - started > 6 * latency
    fuser_call = next(r for r in sim.records if r.model == "sim-fuser")
    fuser_first_token = fuser_call.started + latency
    content_times = [t for t, _, c in arrivals if c]
    assert content_times[0] - fuser_first_token < interval
    # Not buffered: the six tokens arrive spread over the fuser's five token intervals.
    assert content_times[-1] - content_times[0] > 3 * interval


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
    assert set(by_role) == {"thinker", "counterexample", "voter", "fuser"}
    fuser_completion = sum(r.completion_tokens for r in sim.records if r.model == "sim-fuser")
    assert by_role["fuser"]["completion_tokens"] == fuser_completion == 6
    details = reply.usage.completion_tokens_details
    assert details.reasoning_tokens == reply.usage.completion_tokens - fuser_completion
    assert sum(r["calls"] for r in by_role.values()) == len(sim.records)


def test_an_upstream_failure_mid_stream_reaches_the_client_as_an_error(client, sim):
    sim.add_rule(Rule(model="sim-thinker", fault="400"))
    stream = client.chat.completions.create(model=MODEL, messages=QUESTION, stream=True)

    with pytest.raises(openai.APIError, match="every reasoning thread failed"):
        for _ in stream:
            pass


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
def test_a_client_disconnect_stops_every_upstream_call(service, sim, stream):
    sim.latency = 0.5
    request_id = uuid.uuid4().hex
    impatient = openai.OpenAI(base_url=f"{service}/v1", api_key=SERVICE_KEY, max_retries=0, timeout=1.2)

    if stream:
        response = impatient.chat.completions.create(
            model=MODEL, messages=QUESTION, stream=True, extra_headers={"x-request-id": request_id}
        )
        next(iter(response))  # the role chunk: the request is under way
        time.sleep(0.8)
        response.close()
    else:
        with pytest.raises(openai.APITimeoutError):
            impatient.chat.completions.create(
                model=MODEL, messages=QUESTION, extra_headers={"x-request-id": request_id}
            )
    gone = time.monotonic()
    assert any(r.tag == request_id for r in sim.records), "the request reached the upstream"

    deadline = gone + 1.0
    while sim.in_flight and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sim.in_flight == 0
    time.sleep(1.0)
    ours = [r for r in sim.records if r.tag == request_id]
    assert all(r.started < deadline for r in ours)
    assert not any(r.model == "sim-fuser" for r in ours)
    assert any(r.cancelled for r in ours)


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
