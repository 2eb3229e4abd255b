"""Tests for the simulated upstream: the other tests and the benchmark trust it."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import openai
import pytest

from tests.simulated_upstream import Rule, SimulatedUpstream

MESSAGES = [
    {"role": "system", "content": "You are helpful"},  # 3 words
    {"role": "user", "content": [{"type": "text", "text": "hello there friend"}]},  # 3 words
]


@pytest.fixture
async def upstream():
    server = SimulatedUpstream()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def client_for():
    """Factory for AsyncOpenAI clients on a server; all are closed after the test."""
    clients: list[openai.AsyncOpenAI] = []

    def make(server: SimulatedUpstream, **kwargs) -> openai.AsyncOpenAI:
        clients.append(openai.AsyncOpenAI(api_key="x", base_url=server.base_url, max_retries=0, **kwargs))
        return clients[-1]

    yield make
    for client in clients:
        await client.close()


async def wait_idle(server: SimulatedUpstream, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while server.in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert server.in_flight == 0


async def test_non_stream_usage_is_exact(upstream, client_for):
    upstream.add_rule(Rule(contains="HELLO THERE", reply="one two three four"))
    resp = await client_for(upstream).chat.completions.create(model="m", messages=MESSAGES)
    assert resp.object == "chat.completion"
    assert resp.model == "m"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == "one two three four"
    assert resp.choices[0].finish_reason == "stop"
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == (6, 4, 10)
    assert upstream.served_usage() == (6, 4)
    [rec] = upstream.records
    assert (rec.status, rec.role, rec.model, rec.completed, rec.usage_reported, rec.cancelled) == (
        200, "HELLO THERE", "m", True, True, False
    )
    assert rec.finished >= rec.started


async def test_stream_with_usage_shape(upstream, client_for):
    upstream.add_rule(Rule(reply="alpha beta\ngamma"))
    stream = await client_for(upstream).chat.completions.create(
        model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    words = [c.choices[0].delta.content for c in chunks[1:4]]
    assert words == ["alpha", " beta", "\ngamma"]  # one chunk per word, newlines kept
    assert chunks[4].choices[0].finish_reason == "stop"
    assert chunks[5].choices == []
    assert (chunks[5].usage.prompt_tokens, chunks[5].usage.completion_tokens) == (6, 3)
    assert len(chunks) == 6
    assert upstream.served_usage() == (6, 3)
    assert upstream.records[0].usage_reported


async def test_stream_without_usage_is_not_counted_as_reported(upstream, client_for):
    stream = await client_for(upstream).chat.completions.create(model="m", messages=MESSAGES, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "Simulated answer."
    rec = upstream.records[0]
    assert rec.completed and not rec.usage_reported and rec.completion_tokens == 2
    assert upstream.served_usage() == (0, 0)


async def test_429_once_then_success(upstream, client_for):
    upstream.add_rule(Rule(fault="429", retry_after=2.5, times=1))
    client = client_for(upstream)
    with pytest.raises(openai.RateLimitError) as err:
        await client.chat.completions.create(model="m", messages=MESSAGES)
    assert err.value.response.headers["retry-after"] == "2.5"
    assert err.value.body["code"] == "rate_limit_exceeded"
    resp = await client.chat.completions.create(model="m", messages=MESSAGES)
    assert resp.choices[0].message.content == "Simulated answer."
    assert [r.status for r in upstream.records] == [429, 200]
    assert upstream.records[0].completion_tokens == 0
    assert upstream.served_usage() == (6, 2)


@pytest.mark.parametrize("status", [400, 500, 502, 503])
async def test_error_statuses_are_openai_shaped(upstream, status):
    upstream.fault_rates = {str(status): 1.0}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{upstream.base_url}/chat/completions", json={"model": "m", "messages": MESSAGES}) as r:
            assert r.status == status
            body = await r.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert upstream.records[0].role is None  # random fault, no rule


async def test_drop_is_a_connection_error(upstream, client_for):
    upstream.add_rule(Rule(fault="drop"))
    with pytest.raises(openai.APIConnectionError):
        await client_for(upstream).chat.completions.create(model="m", messages=MESSAGES)
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await session.post(f"{upstream.base_url}/chat/completions", json={"model": "m", "messages": MESSAGES})
    await wait_idle(upstream)
    assert [r.status for r in upstream.records] == ["drop", "drop"]
    assert not any(r.cancelled for r in upstream.records)


async def test_malformed_body_and_stream(upstream):
    upstream.add_rule(Rule(fault="malformed"))
    url = f"{upstream.base_url}/chat/completions"
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json={"model": "m", "messages": MESSAGES}) as r:
            assert r.status == 200
            with pytest.raises(json.JSONDecodeError):
                json.loads(await r.text())
        async with session.post(url, json={"model": "m", "messages": MESSAGES, "stream": True}) as r:
            lines = [line for line in (await r.text()).splitlines() if line.startswith("data: ")]
    with pytest.raises(json.JSONDecodeError):
        json.loads(lines[0][len("data: "):])
    assert upstream.served_usage() == (0, 0)


async def test_hang_is_cancelled_when_client_times_out(upstream, client_for):
    upstream.add_rule(Rule(fault="hang"))
    with pytest.raises(openai.APITimeoutError):
        await client_for(upstream, timeout=0.3).chat.completions.create(model="m", messages=MESSAGES)
    await wait_idle(upstream)
    [rec] = upstream.records
    assert (rec.status, rec.cancelled, rec.completion_tokens) == ("hang", True, 0)


async def test_latency_is_cancelled_when_client_leaves(upstream, client_for):
    upstream.add_rule(Rule(latency=5.0, reply="never sent"))
    with pytest.raises(openai.APITimeoutError):
        await client_for(upstream, timeout=0.2).chat.completions.create(model="m", messages=MESSAGES)
    await wait_idle(upstream)
    rec = upstream.records[0]
    assert rec.cancelled and rec.status is None and rec.finished - rec.started < 1.0


async def test_stream_cut_short_counts_words_sent(client_for):
    server = await SimulatedUpstream(token_interval=0.02).start()
    try:
        server.add_rule(Rule(reply=" ".join(f"w{i}" for i in range(100))))
        stream = await client_for(server).chat.completions.create(
            model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        seen = 0
        async for chunk in stream:
            seen += 1
            if seen == 5:
                break
        await stream.close()
        await wait_idle(server)
        rec = server.records[0]
        assert rec.cancelled and not rec.usage_reported and not rec.completed
        assert 4 <= rec.completion_tokens < 100
        assert server.served_usage() == (0, 0)
    finally:
        await server.stop()


async def test_max_tokens_truncates(upstream, client_for):
    upstream.add_rule(Rule(reply="a b c d e"))
    client = client_for(upstream)
    resp = await client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=2)
    assert resp.choices[0].message.content == "a b"
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 2
    stream = await client.chat.completions.create(
        model="m", messages=MESSAGES, max_completion_tokens=3, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "a b c"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 3
    assert upstream.served_usage() == (12, 5)


async def test_rules_match_in_order_and_expire(upstream, client_for):
    upstream.add_rule(Rule(model="other", reply="wrong model"))
    upstream.add_rule(Rule(contains="friend", reply=lambda req: f"for {req['model']}", times=2))
    upstream.add_rule(Rule(contains="friend", reply="fallback"))
    client = client_for(upstream)
    got = [(await client.chat.completions.create(model="m", messages=MESSAGES)).choices[0].message.content
           for _ in range(3)]
    assert got == ["for m", "for m", "fallback"]
    upstream.clear_rules()
    resp = await client.chat.completions.create(model="m", messages=MESSAGES, extra_headers={"X-Request-Tag": "t1"})
    assert resp.choices[0].message.content == "Simulated answer."
    assert upstream.records[-1].tag == "t1" and upstream.records[-1].role is None
    upstream.reset()
    assert upstream.records == [] and upstream.served_usage() == (0, 0)


async def test_models_and_bad_request(upstream, client_for):
    models = await client_for(upstream).models.list()
    assert [m.id for m in models.data] == ["simulated"]
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{upstream.base_url}/chat/completions", data=b"not json") as r:
            assert r.status == 400
            assert "error" in await r.json()


async def test_stop_ends_hanging_requests_quickly(upstream, client_for):
    upstream.add_rule(Rule(fault="hang"))
    task = asyncio.create_task(client_for(upstream, timeout=10).chat.completions.create(model="m", messages=MESSAGES))
    while upstream.in_flight == 0:
        await asyncio.sleep(0.01)
    started = time.monotonic()
    await upstream.stop()
    assert time.monotonic() - started < 2.0
    assert upstream.in_flight == 0 and upstream.records[0].cancelled
    with pytest.raises(openai.APIConnectionError):
        await task


def test_start_in_thread_from_sync_code():
    server = SimulatedUpstream.start_in_thread(latency=0.01)
    try:
        server.add_rule(Rule(contains="hello", reply="sync works"))
        with openai.OpenAI(api_key="x", base_url=server.base_url, max_retries=0) as client:
            resp = client.chat.completions.create(model="m", messages=MESSAGES)
        assert resp.choices[0].message.content == "sync works"
        assert server.served_usage() == (6, 2)
        assert server.in_flight == 0
    finally:
        server.stop_in_thread()
