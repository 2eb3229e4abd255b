"""Tests for the simulated upstream: the other tests and the benchmark trust it."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import aiohttp
import openai
import pytest

from tests.scenarios import SCENARIOS, scenario_reply
from tests.simulated_upstream import Rule, SimulatedUpstream
from tests.support import free_port

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
        200,
        "HELLO THERE",
        "m",
        True,
        True,
        False,
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
        async with session.post(
            f"{upstream.base_url}/chat/completions", json={"model": "m", "messages": MESSAGES}
        ) as r:
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
        json.loads(lines[0][len("data: ") :])
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
        async for _chunk in stream:
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
    got = [
        (await client.chat.completions.create(model="m", messages=MESSAGES)).choices[0].message.content
        for _ in range(3)
    ]
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


# ---- n choices -----------------------------------------------------------------------------


def counting_reply():
    """A reply function that says how often it was asked: shows one call per choice."""
    calls = []

    def reply(req: dict) -> str:
        calls.append(req)
        return f"reply number {len(calls)}"

    return reply


async def test_n_choices_one_reply_call_each(upstream, client_for):
    upstream.add_rule(Rule(reply=counting_reply()))
    resp = await client_for(upstream).chat.completions.create(model="m", messages=MESSAGES, n=3)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert [c.message.content for c in resp.choices] == [f"reply number {i}" for i in (1, 2, 3)]
    assert all(c.finish_reason == "stop" for c in resp.choices)
    # The prompt is counted once, the completions of every choice are summed.
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (6, 9)
    assert upstream.served_usage() == (6, 9)
    assert upstream.records[0].n == 3


async def test_n_choices_stream_carries_choice_index(upstream, client_for):
    replies = iter(["one", "two three", "four five six"])
    upstream.add_rule(Rule(reply=lambda req: next(replies)))
    stream = await client_for(upstream).chat.completions.create(
        model="m", messages=MESSAGES, n=3, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert all(len(c.choices) == 1 for c in chunks[:-1])  # one choice per chunk, as OpenAI sends
    texts, finishes, roles = {}, {}, set()
    for c in chunks[:-1]:
        choice = c.choices[0]
        texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
        if choice.delta.role:
            roles.add(choice.index)
        if choice.finish_reason:
            finishes[choice.index] = choice.finish_reason
    assert texts == {0: "one", 1: "two three", 2: "four five six"}
    assert roles == {0, 1, 2} and finishes == {0: "stop", 1: "stop", 2: "stop"}
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (6, 6)
    assert upstream.served_usage() == (6, 6)


async def test_provider_without_n_returns_one_choice(client_for):
    server = await SimulatedUpstream(supports_n=False).start()
    try:
        server.add_rule(Rule(reply=counting_reply()))
        client = client_for(server)
        resp = await client.chat.completions.create(model="m", messages=MESSAGES, n=3)
        assert [c.message.content for c in resp.choices] == ["reply number 1"]
        assert resp.usage.completion_tokens == 3
        stream = await client.chat.completions.create(model="m", messages=MESSAGES, n=2, stream=True)
        assert {c.choices[0].index async for c in stream if c.choices} == {0}
        assert [r.n for r in server.records] == [3, 2]  # what was asked for is still recorded
    finally:
        await server.stop()


# ---- prefix cache --------------------------------------------------------------------------


def words(prefix: str, count: int) -> str:
    return " ".join(f"{prefix}{i}" for i in range(count))


async def test_prefix_cache_reports_shared_whole_blocks(client_for):
    server = await SimulatedUpstream(prefix_cache=True, cache_block=4).start()
    try:
        client = client_for(server)

        async def cached(text: str, model: str = "m", stream: bool = False) -> int:
            messages = [{"role": "user", "content": text}]
            if stream:
                chunks = await client.chat.completions.create(
                    model=model, messages=messages, stream=True, stream_options={"include_usage": True}
                )
                usage = [c async for c in chunks][-1].usage
            else:
                usage = (await client.chat.completions.create(model=model, messages=messages)).usage
            return usage.prompt_tokens_details.cached_tokens

        assert await cached(words("a", 10)) == 0  # nothing earlier
        assert await cached(words("a", 10)) == 8  # two whole blocks of 4; the last 2 words are no block
        assert await cached(words("a", 6) + " " + words("b", 10), model="other") == 4  # any model
        assert await cached(words("a", 12) + " tail", stream=True) == 8
        assert await cached(words("a", 12)) == 12  # the previous prompt started with all 3 blocks
        assert await cached(words("z", 10)) == 0
        assert [r.cached_tokens for r in server.records] == [0, 8, 4, 8, 12, 0]
        assert server.served_cached_tokens() == 32
    finally:
        await server.stop()


async def test_prefix_cache_spans_messages_and_skips_faults(client_for):
    server = await SimulatedUpstream(prefix_cache=True, cache_block=2).start()
    try:
        client = client_for(server)
        server.add_rule(Rule(fault="500", times=1))
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model="m", messages=MESSAGES)
        # The failed call's prompt never reached the model: nothing cached from it.
        first = await client.chat.completions.create(model="m", messages=MESSAGES)
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        # The concatenated text of all messages is the prompt: 6 words, 3 blocks of 2.
        again = await client.chat.completions.create(model="m", messages=MESSAGES)
        assert again.usage.prompt_tokens_details.cached_tokens == 6
        assert server.records[0].cached_tokens == 0
        assert server.served_cached_tokens() == 6
        server.reset()  # forgets cached prefixes too
        resp = await client.chat.completions.create(model="m", messages=MESSAGES)
        assert resp.usage.prompt_tokens_details.cached_tokens == 0
    finally:
        await server.stop()


async def test_prefix_cache_memory_is_bounded(client_for):
    server = await SimulatedUpstream(prefix_cache=True, cache_block=2, cache_entries=4).start()
    try:
        client = client_for(server)
        for prefix in ("a", "b", "c"):  # 2 blocks each: "a" is evicted by "b" and "c"
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": words(prefix, 4)}])
        assert len(server._prefixes) == 4
        resp = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": words("a", 4)}])
        assert resp.usage.prompt_tokens_details.cached_tokens == 0
        resp = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": words("c", 4)}])
        assert resp.usage.prompt_tokens_details.cached_tokens == 4
    finally:
        await server.stop()


async def test_without_prefix_cache_usage_has_no_details(upstream, client_for):
    client = client_for(upstream)
    for _ in range(2):
        resp = await client.chat.completions.create(model="m", messages=MESSAGES)
        assert resp.usage.prompt_tokens_details is None
    assert upstream.served_cached_tokens() == 0


# ---- logprobs ------------------------------------------------------------------------------


async def test_logprobs_one_entry_per_piece(upstream, client_for):
    upstream.add_rule(Rule(reply="alpha beta\ngamma"))
    client = client_for(upstream)
    resp = await client.chat.completions.create(model="m", messages=MESSAGES, logprobs=True, top_logprobs=3)
    content = resp.choices[0].logprobs.content
    assert [e.token for e in content] == ["alpha", " beta", "\ngamma"]
    assert "".join(e.token for e in content) == resp.choices[0].message.content
    for entry in content:
        assert entry.logprob < 0 and bytes(entry.bytes).decode() == entry.token
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token
        ranked = [t.logprob for t in entry.top_logprobs]
        assert ranked == sorted(ranked, reverse=True)
    again = await client.chat.completions.create(model="m", messages=MESSAGES, logprobs=True, top_logprobs=3)
    assert again.choices[0].logprobs.model_dump() == resp.choices[0].logprobs.model_dump()  # deterministic
    plain = await client.chat.completions.create(model="m", messages=MESSAGES, logprobs=True)
    assert [len(e.top_logprobs) for e in plain.choices[0].logprobs.content] == [0, 0, 0]
    without = await client.chat.completions.create(model="m", messages=MESSAGES)
    assert without.choices[0].logprobs is None


async def test_logprobs_in_stream_per_piece(upstream, client_for):
    upstream.add_rule(Rule(reply="alpha beta gamma"))
    stream = await client_for(upstream).chat.completions.create(
        model="m", messages=MESSAGES, stream=True, logprobs=True, top_logprobs=2
    )
    pieces = [c.choices[0] async for c in stream if c.choices and c.choices[0].delta.content]
    assert [p.delta.content for p in pieces] == ["alpha", " beta", " gamma"]
    assert [[e.token for e in p.logprobs.content] for p in pieces] == [["alpha"], [" beta"], [" gamma"]]
    assert all(len(p.logprobs.content[0].top_logprobs) == 2 for p in pieces)


# ---- tools ---------------------------------------------------------------------------------

WEATHER_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "days": {"type": "integer"},
                    "scale": {"type": "number"},
                    "metric": {"type": "boolean"},
                    "when": {"type": "object"},
                    "note": {"type": "string"},
                },
                "required": ["city", "days", "scale", "metric", "when"],
            },
        },
    },
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
]


async def test_rule_tool_call_non_stream(upstream, client_for):
    upstream.add_rule(Rule(tool_call={"name": "lookup", "arguments": {"query": "capital of France", "k": 3}}))
    resp = await client_for(upstream).chat.completions.create(model="m", messages=MESSAGES)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "lookup"
    assert json.loads(call.function.arguments) == {"query": "capital of France", "k": 3}
    # One piece for the name, one per argument fragment: {"query": / "capital / of / France", / "k": / 3}
    assert resp.usage.completion_tokens == 1 + len(call.function.arguments.split()) == 7
    assert upstream.served_usage() == (6, 7)


async def test_tool_choice_forces_a_call_with_required_arguments(upstream, client_for):
    client = client_for(upstream)
    resp = await client.chat.completions.create(
        model="m", messages=MESSAGES, tools=WEATHER_TOOLS, tool_choice="required"
    )
    call = resp.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "x", "days": 1, "scale": 1.5, "metric": True, "when": None}
    named = await client.chat.completions.create(
        model="m",
        messages=MESSAGES,
        tools=WEATHER_TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    call = named.choices[0].message.tool_calls[0]
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_time", {})
    assert named.usage.completion_tokens == 2  # the name, then "{}"
    auto = await client.chat.completions.create(model="m", messages=MESSAGES, tools=WEATHER_TOOLS, tool_choice="auto")
    assert auto.choices[0].message.content == "Simulated answer." and auto.choices[0].message.tool_calls is None


async def test_streamed_tool_call_reassembles(upstream, client_for):
    upstream.add_rule(Rule(tool_call={"name": "lookup", "arguments": {"query": "capital of France", "k": 3}}))
    client = client_for(upstream)
    stream = await client.chat.completions.create(
        model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    calls = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    first, rest = calls[0], calls[1:]
    assert (first.index, first.type, first.function.name, first.function.arguments) == (0, "function", "lookup", "")
    assert first.id.startswith("call_")
    assert all(c.index == 0 and c.id is None and c.function.name is None for c in rest)
    assert json.loads("".join(c.function.arguments for c in rest)) == {"query": "capital of France", "k": 3}
    assert chunks[-2].choices[0].finish_reason == "tool_calls"
    assert chunks[-1].usage.completion_tokens == len(calls) == 7
    # The SDK's own stream helper puts the call back together.
    async with client.chat.completions.stream(model="m", messages=MESSAGES) as helper:
        final = await helper.get_final_completion()
    call = final.choices[0].message.tool_calls[0]
    assert call.function.name == "lookup"
    assert json.loads(call.function.arguments) == {"query": "capital of France", "k": 3}


# ---- response_format and stop ---------------------------------------------------------------


async def test_response_format_json_object(upstream, client_for):
    upstream.add_rule(Rule(reply='He said "hi"\nthen left'))
    resp = await client_for(upstream).chat.completions.create(
        model="m", messages=MESSAGES, response_format={"type": "json_object"}
    )
    assert json.loads(resp.choices[0].message.content) == {"answer": 'He said "hi"\nthen left'}
    assert resp.usage.completion_tokens == len(resp.choices[0].message.content.split())


async def test_response_format_json_schema_parses_into_the_model(upstream, client_for):
    from enum import StrEnum
    from typing import Literal

    from pydantic import BaseModel

    class Color(StrEnum):
        RED = "red"
        BLUE = "blue"

    class Item(BaseModel):
        name: str
        qty: int

    class Report(BaseModel):
        title: str
        score: float
        ok: bool
        kind: Literal["a", "b"]
        color: Color
        items: list[Item]
        best: Item
        note: str | None

    completion = await client_for(upstream).chat.completions.parse(model="m", messages=MESSAGES, response_format=Report)
    assert completion.choices[0].message.parsed == Report(
        title="text",
        score=4.2,
        ok=True,
        kind="a",
        color=Color.RED,
        items=[Item(name="text", qty=42)],
        best=Item(name="text", qty=42),
        note="text",
    )


async def test_stop_cuts_before_the_first_stop_string(upstream, client_for):
    upstream.add_rule(Rule(reply="one two three END four five"))
    client = client_for(upstream)
    resp = await client.chat.completions.create(model="m", messages=MESSAGES, stop=["four", "END"])
    assert resp.choices[0].message.content == "one two three"
    assert resp.choices[0].finish_reason == "stop" and resp.usage.completion_tokens == 3
    resp = await client.chat.completions.create(model="m", messages=MESSAGES, stop="thr")
    assert resp.choices[0].message.content == "one two"
    stream = await client.chat.completions.create(model="m", messages=MESSAGES, stop="four", stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "one two three END"
    resp = await client.chat.completions.create(model="m", messages=MESSAGES, stop=["absent"], max_tokens=2)
    assert (resp.choices[0].message.content, resp.choices[0].finish_reason) == ("one two", "length")


# ---- reset fault ---------------------------------------------------------------------------


async def test_reset_non_stream_breaks_the_body(upstream, client_for):
    upstream.add_rule(Rule(fault="reset", reply=" ".join(f"w{i}" for i in range(50))))
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{upstream.base_url}/chat/completions", json={"model": "m", "messages": MESSAGES}
        ) as r:
            assert r.status == 200
            length = int(r.headers["Content-Length"])
            received = b""
            with pytest.raises(aiohttp.ClientPayloadError):
                while chunk := await r.content.readany():
                    received += chunk
    assert received.startswith(b'{"id": "chatcmpl-') and len(received) == length // 2
    with pytest.raises(openai.APIConnectionError):
        await client_for(upstream).chat.completions.create(model="m", messages=MESSAGES)
    await wait_idle(upstream)
    for rec in upstream.records:
        assert (rec.status, rec.fault, rec.usage_reported, rec.completed) == ("reset", "reset", False, False)
    assert upstream.served_usage() == (0, 0)


async def test_reset_stream_sends_half_the_pieces(upstream):
    upstream.fault_rates = {"reset": 1.0}  # as a random fault: the default reply, no rule
    upstream.default_reply = lambda req: "a b c d e f"
    body = {"model": "m", "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}}
    events = []
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{upstream.base_url}/chat/completions", json=body) as r:
            assert r.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                async for line in r.content:
                    if line.startswith(b"data: "):
                        events.append(line[len(b"data: ") :].strip())
    assert b"[DONE]" not in events
    deltas = [json.loads(e)["choices"][0]["delta"] for e in events]
    assert deltas == [{"role": "assistant", "content": ""}, {"content": "a"}, {"content": " b"}, {"content": " c"}]
    await wait_idle(upstream)
    [rec] = upstream.records
    assert (rec.status, rec.role, rec.completion_tokens, rec.usage_reported, rec.completed) == (
        "reset",
        None,
        3,
        False,
        False,
    )


# ---- scenarios -----------------------------------------------------------------------------


def role_request(role: str, user: str = "Check the step.") -> dict:
    messages = [{"role": "system", "content": "Rules."}, {"role": "user", "content": user}]
    return {"model": f"sim-{role}", "messages": messages}


def thinker_request(step: int, challenged: bool = False) -> dict:
    extra = " Your step was challenged: fix it." if challenged else ""
    return {
        "model": "sim-thinker",
        "messages": [
            {"role": "user", "content": "Write step 1. (an earlier turn: only the last user message counts)"},
            {"role": "assistant", "content": "Step 1: ..."},
            {"role": "user", "content": [{"type": "text", "text": f"Problem.{extra} Write step {step}."}]},
        ],
    }


def test_scenario_replies_by_role():
    from actors.parsing import Vote, parse_step, parse_vote

    expected_critic = {
        "pass": "NONE - the step holds.",
        "agree": "NONE - the step holds.",
        "challenged-pass": "Counterexample: the step may skip a case.",
        "refute": "Counterexample: the step assumes what it should prove.",
    }
    assert set(SCENARIOS) == set(expected_critic)
    for name in SCENARIOS:
        reply = scenario_reply(name)
        assert reply(role_request("counterexample")) == expected_critic[name]
        vote = parse_vote(reply(role_request("voter")))
        assert vote == (Vote.COUNTEREXAMPLE if name == "refute" else Vote.STEP)
        assert reply(role_request("summarizer")) == "Summary of the earlier steps."
        assert reply(role_request("fuser")) == "The answer is 42."
        assert reply({"model": "gpt-x", "messages": []}) == "Simulated answer."
        step = reply(thinker_request(3))
        assert step == "Step 3: we work through the problem. [CONTINUE]"
        assert parse_step(step)[1] is False
    with pytest.raises(ValueError):
        scenario_reply("nope")


def test_scenario_thinkers_complete_at_their_step():
    from actors.parsing import parse_step

    never = scenario_reply("pass")
    assert all(not parse_step(never(thinker_request(k)))[1] for k in range(1, 8))
    passing = scenario_reply("pass", complete_at=2)
    assert passing(thinker_request(1)).endswith("[CONTINUE]")
    final = passing(thinker_request(2))
    assert final.startswith("Step 2:") and "ANSWER: 42" in final and final.endswith("[COMPLETE]")
    assert parse_step(final)[1] is True
    agree = scenario_reply("agree")  # answers at step 2 unless told otherwise
    assert agree(thinker_request(2)) == "Step 2: so the result is 42. ANSWER: 42 [COMPLETE]"
    assert scenario_reply("agree", complete_at=3)(thinker_request(2)).endswith("[CONTINUE]")
    revised = scenario_reply("refute")(thinker_request(2, challenged=True))
    assert revised.startswith("Step 2 (revised):") and revised.endswith("[CONTINUE]")


async def test_scenario_same_answers_in_n_choices_or_n_calls(client_for):
    server = await SimulatedUpstream(default_reply=scenario_reply("agree")).start()
    try:
        client = client_for(server)
        for request in (thinker_request(1), thinker_request(2), role_request("voter"), role_request("fuser")):
            one_call = await client.chat.completions.create(**request, n=3)
            separate = [await client.chat.completions.create(**request) for _ in range(3)]
            assert [c.message.content for c in one_call.choices] == [r.choices[0].message.content for r in separate]
    finally:
        await server.stop()


# ---- CLI (what the benchmark starts) -------------------------------------------------------


def test_cli_scenario_options_via_bench_start_upstream():
    from bench.service import start_upstream

    port = free_port()
    proc = start_upstream(port, 0.0, scenario="pass", prefix_cache=True, supports_n=False)
    try:
        with openai.OpenAI(api_key="x", base_url=f"http://127.0.0.1:{port}/v1", max_retries=0) as client:
            resp = client.chat.completions.create(**role_request("voter"), n=2)
            again = client.chat.completions.create(**role_request("voter"), n=2)
            plain = client.chat.completions.create(model="other", messages=MESSAGES)
    finally:
        proc.stop(grace=10)
    assert [c.message.content for c in resp.choices] == ["VOTE: STEP - it holds."]  # --no-n
    assert resp.usage.prompt_tokens_details.cached_tokens == 0  # --prefix-cache
    assert again.usage.prompt_tokens_details is not None
    assert plain.choices[0].message.content == "Simulated answer."
    assert proc.popen.returncode == 0


def test_cli_faults_and_stats_via_bench_start_upstream():
    from bench.service import start_upstream

    port = free_port()
    proc = start_upstream(port, 0.0, faults={"500": 0.5, "429": 0.5})
    try:
        statuses = []
        with openai.OpenAI(api_key="x", base_url=f"http://127.0.0.1:{port}/v1", max_retries=0) as client:
            for _ in range(20):
                try:
                    client.chat.completions.create(model="simulated", messages=MESSAGES)
                    statuses.append(200)
                except openai.APIStatusError as error:
                    statuses.append(error.status_code)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=10) as reply:
            stats = json.loads(reply.read())
    finally:
        proc.stop(grace=10)
    assert 200 not in statuses  # the two rates add up to every call
    assert stats == {"calls": 20, "faults": {"500": statuses.count(500), "429": statuses.count(429)}}
    assert statuses.count(500) and statuses.count(429)
