"""The model client against the simulated upstream: usage, retries that help, and only those."""

import time

import aiohttp
import pytest
from pydantic import SecretStr

from actors.config import ModelConfig, UpstreamConfig
from actors.model_client import ModelClient, UpstreamError, parse_retry_after
from actors.schemas import UsageLedger
from tests.simulated_upstream import Rule

MESSAGES = [{"role": "user", "content": "two words"}]


def make_client(session, upstream, *, attempts=3, timeout_s=5.0, api_key=None) -> ModelClient:
    model = ModelConfig(base_url=upstream.base_url, model="sim-thinker", max_tokens=50, timeout_s=timeout_s)
    if api_key:
        model = model.model_copy(update={"api_key": SecretStr(api_key)})
    retry = UpstreamConfig(max_attempts=attempts, backoff_initial_s=0.01, backoff_max_s=0.05)
    return ModelClient(session, "thinker", model, retry)


async def test_complete_returns_text_and_records_the_reported_usage(http_session, upstream):
    usage = UsageLedger()
    text = await make_client(http_session, upstream).complete(MESSAGES, usage, tag="req-1")

    assert text == "We reason about the problem carefully. [CONTINUE]"
    assert (usage.prompt_tokens, usage.completion_tokens) == upstream.served_usage() == (2, 7)
    assert usage.roles["thinker"].calls == 1
    assert upstream.records[0].tag == "req-1"


@pytest.mark.parametrize("fault", ["500", "502", "503", "malformed", "drop"])
async def test_transient_faults_are_retried(http_session, upstream, fault):
    upstream.add_rule(Rule(fault=fault, times=2))
    usage = UsageLedger()

    text = await make_client(http_session, upstream).complete(MESSAGES, usage)

    assert text
    assert len(upstream.records) == 3
    assert usage.roles["thinker"].calls == 1
    assert (usage.prompt_tokens, usage.completion_tokens) == upstream.served_usage()


async def test_429_waits_at_least_retry_after(http_session, upstream):
    upstream.add_rule(Rule(fault="429", retry_after=0.5, times=1))

    await make_client(http_session, upstream).complete(MESSAGES, UsageLedger())

    first, second = upstream.records
    assert first.status == 429
    assert second.started - first.finished >= 0.5


@pytest.mark.parametrize("fault", ["400"])
async def test_other_4xx_are_not_retried(http_session, upstream, fault):
    upstream.add_rule(Rule(fault=fault))
    usage = UsageLedger()

    with pytest.raises(UpstreamError) as caught:
        await make_client(http_session, upstream).complete(MESSAGES, usage)

    assert caught.value.status == 400
    assert len(upstream.records) == 1
    assert usage.roles["thinker"].failed_calls == 1 and usage.completion_tokens == 0


async def test_a_hanging_upstream_times_out_and_is_retried_then_gives_up(http_session, upstream):
    upstream.add_rule(Rule(fault="hang"))
    started = time.monotonic()

    with pytest.raises(Exception) as caught:
        await make_client(http_session, upstream, attempts=2, timeout_s=0.3).complete(MESSAGES, UsageLedger())

    assert isinstance(caught.value, (TimeoutError, aiohttp.ServerTimeoutError))
    assert len(upstream.records) == 2
    assert time.monotonic() - started < 3


async def test_stream_yields_tokens_and_records_usage(http_session, upstream):
    upstream.add_rule(Rule(reply="one two three four"))
    usage = UsageLedger()

    pieces = [p async for p in make_client(http_session, upstream).stream(MESSAGES, usage)]

    assert "".join(pieces) == "one two three four"
    assert len(pieces) == 4
    assert (usage.prompt_tokens, usage.completion_tokens) == upstream.served_usage() == (2, 4)


async def test_stream_open_is_retried(http_session, upstream):
    upstream.add_rule(Rule(fault="503", times=1))
    pieces = [p async for p in make_client(http_session, upstream).stream(MESSAGES, UsageLedger())]
    assert pieces and len(upstream.records) == 2


async def test_the_api_key_is_sent_but_never_in_errors(http_session, upstream):
    upstream.add_rule(Rule(fault="400"))
    client = make_client(http_session, upstream, api_key="sk-secret-123")

    with pytest.raises(UpstreamError) as caught:
        await client.complete(MESSAGES, UsageLedger())

    assert upstream.records[0].request is not None
    assert "sk-secret-123" not in str(caught.value)
    assert "sk-secret-123" not in repr(client.model)


def test_parse_retry_after():
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after("0.5") == 0.5
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert 0 <= parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") < 1  # a past date: no wait


async def test_a_failing_model_falls_back_to_the_next_one_in_order(http_session, upstream):
    upstream.add_rule(Rule(model="sim-thinker", fault="503"))
    upstream.add_rule(Rule(model="backup-1", fault="400"))
    primary = ModelConfig(
        base_url=upstream.base_url,
        model="sim-thinker",
        fallbacks=[
            ModelConfig(base_url=upstream.base_url, model="backup-1"),
            ModelConfig(base_url=upstream.base_url, model="backup-2"),
        ],
    )
    client = ModelClient(http_session, "thinker", primary, UpstreamConfig(max_attempts=2, backoff_initial_s=0.01))
    usage = UsageLedger()

    assert await client.complete(MESSAGES, usage) == "Simulated answer."
    assert [r.model for r in upstream.records] == ["sim-thinker", "sim-thinker", "backup-1", "backup-2"]
    assert len({r.call_id for r in upstream.records}) == 1  # one logical call throughout
    assert (usage.prompt_tokens, usage.completion_tokens) == upstream.served_usage()
