"""The model client against the simulated upstream: honest usage, retries that help and only
those, n answers per call, streams, deadlines, and no secret in any error."""

import asyncio
import time

import aiohttp
import pytest
from pydantic import SecretStr

from actors.config import ModelConfig, ModelPrice, UpstreamConfig
from actors.model_client import (
    DEFAULT_TOKENS_PER_CHAR,
    DeadlineReached,
    ModelClient,
    StreamPiece,
    UpstreamError,
    describe_error,
    parse_retry_after,
    prompt_chars,
)
from actors.schemas import UsageLedger
from tests.simulated_upstream import Rule
from tests.support import free_port, until

MESSAGES = [{"role": "user", "content": "two words"}]
THINKER_REPLY = "We reason about the problem carefully. [CONTINUE]"  # 7 words


def make_client(
    session, upstream, *, attempts=3, timeout_s=5.0, api_key=None, backoff_max_s=0.05, price=None, model="sim-thinker"
) -> ModelClient:
    config = ModelConfig(base_url=upstream.base_url, model=model, max_tokens=50, timeout_s=timeout_s, price=price)
    if api_key:
        config = config.model_copy(update={"api_key": SecretStr(api_key)})
    retry = UpstreamConfig(max_attempts=attempts, backoff_initial_s=0.01, backoff_max_s=backoff_max_s)
    return ModelClient(session, "thinker", config, retry)


# --- complete ------------------------------------------------------------------------------


async def test_complete_returns_text_and_records_the_reported_usage(http_session, upstream):
    usage = UsageLedger()
    text = await make_client(http_session, upstream).complete(MESSAGES, usage, tag="req-1")

    assert text == THINKER_REPLY
    assert (usage.prompt_tokens, usage.completion_tokens) == upstream.served_usage() == (2, 7)
    entry = usage.roles["thinker"]
    assert (entry.calls, entry.failed_calls, entry.aborted_calls, entry.cached_tokens) == (1, 0, 0, 0)
    assert entry.seconds > 0
    [record] = upstream.records
    assert record.tag == "req-1"
    assert (record.request["model"], record.request["max_tokens"], record.request["temperature"]) == (
        "sim-thinker",
        50,
        0.7,
    )


async def test_complete_max_tokens_overrides_the_configured_one(http_session, upstream):
    text = await make_client(http_session, upstream).complete(MESSAGES, UsageLedger(), max_tokens=3)
    assert text == "We reason about"
    assert upstream.records[0].request["max_tokens"] == 3


async def test_cost_comes_from_the_price_with_cached_tokens_at_their_rate(http_session, upstream):
    upstream.prefix_cache = True
    price = ModelPrice(input=2.0, output=10.0, cached_input=0.5)
    client = make_client(http_session, upstream, price=price)
    prompt = [{"role": "user", "content": " ".join(f"w{i}" for i in range(40))}]  # 40 words
    first, second = UsageLedger(), UsageLedger()

    await client.complete(prompt, first)
    await client.complete(prompt, second)

    assert first.cost_usd == pytest.approx((40 * 2.0 + 7 * 10.0) / 1e6)
    assert second.cached_tokens == 32  # two whole blocks of 16 words were seen before
    assert second.cost_usd == pytest.approx((8 * 2.0 + 32 * 0.5 + 7 * 10.0) / 1e6)
    assert first.cached_tokens + second.cached_tokens == upstream.served_cached_tokens()


async def test_cached_tokens_without_a_cached_price_are_billed_as_input(http_session, upstream):
    upstream.prefix_cache = True
    client = make_client(http_session, upstream, price=ModelPrice(input=1.0, output=1.0))
    prompt = [{"role": "user", "content": " ".join(f"w{i}" for i in range(16))}]
    usage = UsageLedger()
    await client.complete(prompt, UsageLedger())
    await client.complete(prompt, usage)
    assert usage.cached_tokens == 16 and usage.cost_usd == pytest.approx((16 + 7) / 1e6)


async def test_no_price_means_no_cost(http_session, upstream):
    usage = UsageLedger()
    await make_client(http_session, upstream).complete(MESSAGES, usage)
    assert usage.cost_usd == 0.0


# --- retries -------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["500", "502", "503", "429", "malformed", "drop", "reset"])
async def test_transient_faults_are_retried(http_session, upstream, fault):
    upstream.add_rule(Rule(fault=fault, retry_after=0, times=2))
    usage = UsageLedger()

    text = await make_client(http_session, upstream).complete(MESSAGES, usage)

    assert text == THINKER_REPLY
    assert len(upstream.records) == 3
    assert len({r.call_id for r in upstream.records}) == 1  # one logical call, three attempts
    assert usage.roles["thinker"].calls == 1 and usage.roles["thinker"].failed_calls == 0
    assert (usage.prompt_tokens, usage.completion_tokens) == upstream.served_usage() == (2, 7)


async def test_giving_up_after_max_attempts_records_one_failed_call(http_session, upstream):
    upstream.add_rule(Rule(fault="503"))
    usage = UsageLedger()
    with pytest.raises(UpstreamError) as caught:
        await make_client(http_session, upstream, attempts=2).complete(MESSAGES, usage)
    assert (caught.value.status, caught.value.retryable) == (503, True)
    assert len(upstream.records) == 2
    entry = usage.roles["thinker"]
    assert (entry.calls, entry.failed_calls, entry.prompt_tokens) == (0, 1, 0)


async def test_retry_after_within_backoff_max_is_waited_out_in_full(http_session, upstream):
    upstream.add_rule(Rule(fault="429", retry_after=0.3, times=1))

    await make_client(http_session, upstream, backoff_max_s=1).complete(MESSAGES, UsageLedger())

    first, second = upstream.records
    assert first.status == 429 and second.status == 200
    assert second.started - first.finished >= 0.3


async def test_retry_after_beyond_backoff_max_is_not_retried(http_session, upstream):
    upstream.add_rule(Rule(fault="429", retry_after=5, times=1))
    started = time.monotonic()

    with pytest.raises(UpstreamError) as caught:
        await make_client(http_session, upstream, backoff_max_s=1).complete(MESSAGES, UsageLedger())

    assert (caught.value.status, caught.value.retry_after) == (429, 5.0)
    assert len(upstream.records) == 1
    assert time.monotonic() - started < 1


@pytest.mark.parametrize("fault", ["400", "401"])
async def test_other_4xx_are_not_retried(http_session, upstream, fault):
    upstream.add_rule(Rule(fault=fault))
    usage = UsageLedger()

    with pytest.raises(UpstreamError) as caught:
        await make_client(http_session, upstream).complete(MESSAGES, usage)

    assert caught.value.status == int(fault) and not caught.value.retryable
    assert len(upstream.records) == 1
    assert usage.roles["thinker"].failed_calls == 1 and usage.completion_tokens == 0


async def test_a_hanging_upstream_times_out_and_is_retried_then_gives_up(http_session, upstream):
    upstream.add_rule(Rule(fault="hang"))
    started = time.monotonic()

    with pytest.raises(Exception) as caught:
        await make_client(http_session, upstream, attempts=2, timeout_s=0.2).complete(MESSAGES, UsageLedger())

    assert isinstance(caught.value, (TimeoutError, aiohttp.ServerTimeoutError))
    assert len(upstream.records) == 2
    assert time.monotonic() - started < 2
    await until(lambda: upstream.in_flight == 0)


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
    assert usage.roles["thinker"].calls == 1


def test_parse_retry_after():
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after("0.5") == 0.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("") is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a past date: no wait


# --- deadlines -----------------------------------------------------------------------------


async def test_no_attempt_after_the_deadline(http_session, upstream):
    usage = UsageLedger()
    with pytest.raises(DeadlineReached) as caught:
        await make_client(http_session, upstream).complete(MESSAGES, usage, deadline=time.time() - 0.01)
    assert caught.value.sent is False
    assert upstream.records == []
    assert usage.calls == usage.aborted_calls == usage.total_tokens == 0


async def test_the_attempt_timeout_is_shortened_to_the_deadline(http_session, upstream):
    upstream.add_rule(Rule(fault="hang"))
    usage = UsageLedger()
    started = time.monotonic()

    with pytest.raises(DeadlineReached) as caught:
        await make_client(http_session, upstream, timeout_s=5).complete(MESSAGES, usage, deadline=time.time() + 0.2)

    assert caught.value.sent is True
    assert 0.15 < time.monotonic() - started < 1  # cut at the deadline, not after timeout_s
    assert len(upstream.records) == 1  # and not retried
    assert (usage.roles["thinker"].aborted_calls, usage.calls, usage.total_tokens) == (1, 0, 0)
    await until(lambda: upstream.in_flight == 0)
    assert upstream.records[0].cancelled


async def test_a_retry_that_cannot_finish_before_the_deadline_is_not_made(http_session, upstream):
    upstream.add_rule(Rule(fault="429", retry_after=0.5, times=1))
    with pytest.raises(UpstreamError):
        await make_client(http_session, upstream, backoff_max_s=1).complete(
            MESSAGES, UsageLedger(), deadline=time.time() + 0.3
        )
    assert len(upstream.records) == 1


async def test_a_retry_that_fits_before_the_deadline_is_made(http_session, upstream):
    upstream.add_rule(Rule(fault="503", times=1))
    text = await make_client(http_session, upstream).complete(MESSAGES, UsageLedger(), deadline=time.time() + 5)
    assert text == THINKER_REPLY and len(upstream.records) == 2


# --- cancellation --------------------------------------------------------------------------


async def test_cancelling_a_call_aborts_it_upstream_and_records_it_as_aborted(http_session, upstream):
    upstream.latency = 1.0
    usage = UsageLedger()
    task = asyncio.ensure_future(make_client(http_session, upstream).complete(MESSAGES, usage))
    await until(lambda: upstream.in_flight == 1)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    entry = usage.roles["thinker"]
    assert (entry.calls, entry.failed_calls, entry.aborted_calls, entry.prompt_tokens) == (0, 0, 1, 0)
    await until(lambda: upstream.in_flight == 0)
    assert upstream.records[0].cancelled


# --- n answers -----------------------------------------------------------------------------


async def test_sample_asks_for_n_answers_in_one_call(http_session, upstream):
    client = make_client(http_session, upstream)
    usage = UsageLedger()

    texts = await client.sample(MESSAGES, usage, 3, tag="req-1")

    assert texts == [THINKER_REPLY] * 3
    [record] = upstream.records
    assert record.n == 3 and record.request["n"] == 3
    assert (usage.calls, usage.prompt_tokens, usage.completion_tokens) == (1, 2, 21)  # the prompt billed once
    assert client.endpoints[0].supports_n is True


async def test_sample_without_one_call_makes_separate_calls(http_session, upstream):
    usage = UsageLedger()
    texts = await make_client(http_session, upstream).sample(MESSAGES, usage, 3, one_call=False)
    assert texts == [THINKER_REPLY] * 3
    assert [r.n for r in upstream.records] == [1, 1, 1]
    assert all("n" not in r.request for r in upstream.records)
    assert (usage.calls, usage.prompt_tokens, usage.completion_tokens) == (3, 6, 21)


async def test_an_upstream_that_ignores_n_is_made_up_with_separate_calls_and_remembered(http_session, upstream):
    upstream.supports_n = False
    client = make_client(http_session, upstream)
    usage = UsageLedger()

    assert await client.sample(MESSAGES, usage, 3) == [THINKER_REPLY] * 3
    assert [r.n for r in upstream.records] == [3, 1, 1]  # asked for 3, got 1, made up with 2 more
    assert client.endpoints[0].supports_n is False
    assert (usage.calls, usage.prompt_tokens, usage.completion_tokens) == (3, 6, 21) == (3, *upstream.served_usage())

    upstream.reset()
    assert await client.sample(MESSAGES, UsageLedger(), 2) == [THINKER_REPLY] * 2
    assert [r.n for r in upstream.records] == [1, 1]  # not asked for n again


async def test_sample_of_one_is_a_plain_call(http_session, upstream):
    assert await make_client(http_session, upstream).sample(MESSAGES, UsageLedger(), 1) == [THINKER_REPLY]
    assert "n" not in upstream.records[0].request


async def test_separate_samples_that_fail_are_missing_and_all_failing_raises(http_session, upstream):
    upstream.add_rule(Rule(fault="400", times=1))
    usage = UsageLedger()
    texts = await make_client(http_session, upstream).sample(MESSAGES, usage, 3, one_call=False)
    assert texts == [THINKER_REPLY] * 2
    assert (usage.calls, usage.roles["thinker"].failed_calls) == (2, 1)

    upstream.add_rule(Rule(fault="400"))
    with pytest.raises(UpstreamError):
        await make_client(http_session, upstream).sample(MESSAGES, UsageLedger(), 3, one_call=False)


# --- prompt estimates ----------------------------------------------------------------------


async def test_prompt_estimates_are_calibrated_by_reported_usage(http_session, upstream):
    client = make_client(http_session, upstream)
    long = [{"role": "user", "content": "a b c d e f g h i j"}]  # 19 characters, 10 words
    assert client.estimate_prompt(long) == int(19 * DEFAULT_TOKENS_PER_CHAR) + 8

    await client.complete(long, UsageLedger())  # 10 tokens for 19 characters: learnt at once
    assert client.tokens_per_char == pytest.approx(10 / 19)
    assert client.estimate_prompt(long) == int(19 * 10 / 19) + 8

    await client.complete(MESSAGES, UsageLedger())  # 2 tokens for 9 characters: lower, learnt slowly
    assert client.tokens_per_char == pytest.approx(0.9 * 10 / 19 + 0.1 * 2 / 9)

    dense = [{"role": "user", "content": "a b"}]  # 2 tokens for 3 characters: higher, learnt at once
    await client.complete(dense, UsageLedger())
    assert client.tokens_per_char == pytest.approx(2 / 3)


def test_prompt_chars_counts_text_contents_only():
    messages = [{"role": "user", "content": "abc"}, {"role": "assistant", "content": None, "tool_calls": []}]
    assert prompt_chars(messages) == 3


# --- streams -------------------------------------------------------------------------------


async def test_stream_yields_pieces_and_records_usage(http_session, upstream):
    upstream.add_rule(Rule(reply="one two three four"))
    usage = UsageLedger()

    pieces = [p async for p in make_client(http_session, upstream).stream(MESSAGES, usage, tag="req-1")]

    assert [p.text for p in pieces] == ["one", " two", " three", " four", ""]
    assert pieces[-1] == StreamPiece(finish_reason="stop")
    assert (usage.prompt_tokens, usage.completion_tokens) == upstream.served_usage() == (2, 4)
    assert usage.roles["thinker"].calls == 1
    request = upstream.records[0].request
    assert request["stream"] is True and request["stream_options"] == {"include_usage": True}


async def test_stream_params_are_passed_through_and_win_over_the_configured_ones(http_session, upstream):
    upstream.add_rule(Rule(reply="alpha beta STOP gamma"))
    params = {"stop": ["STOP"], "temperature": 0.1, "max_tokens": 5, "seed": 7}
    pieces = [p async for p in make_client(http_session, upstream).stream(MESSAGES, UsageLedger(), params=params)]
    assert "".join(p.text for p in pieces) == "alpha beta"
    request = upstream.records[0].request
    assert {k: request[k] for k in params} == params


async def test_stream_logprobs(http_session, upstream):
    upstream.add_rule(Rule(reply="one two"))
    params = {"logprobs": True, "top_logprobs": 2}
    pieces = [p async for p in make_client(http_session, upstream).stream(MESSAGES, UsageLedger(), params=params)]
    entries = [entry for p in pieces for entry in (p.logprobs or [])]
    assert [e["token"] for e in entries] == ["one", " two"]
    assert all(len(e["top_logprobs"]) == 2 for e in entries)


async def test_stream_tool_calls(http_session, upstream):
    tools = [
        {
            "type": "function",
            "function": {
                "name": "lookup",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            },
        }
    ]
    params = {"tools": tools, "tool_choice": "required"}
    usage = UsageLedger()
    pieces = [p async for p in make_client(http_session, upstream).stream(MESSAGES, usage, params=params)]
    calls = [call for p in pieces for call in (p.tool_calls or [])]
    assert calls[0]["function"]["name"] == "lookup" and calls[0]["id"].startswith("call_")
    assert "".join(c["function"]["arguments"] for c in calls) == '{"city": "x"}'
    assert pieces[-1].finish_reason == "tool_calls"
    assert upstream.records[0].request["tools"] == tools
    assert (usage.prompt_tokens, usage.completion_tokens) == upstream.served_usage()


async def test_stream_response_format(http_session, upstream):
    params = {"response_format": {"type": "json_object"}}
    pieces = [p async for p in make_client(http_session, upstream).stream(MESSAGES, UsageLedger(), params=params)]
    assert "".join(p.text for p in pieces) == '{"answer": "We reason about the problem carefully. [CONTINUE]"}'


@pytest.mark.parametrize("fault", ["503", "drop", "malformed"])
async def test_a_stream_that_fails_before_its_first_piece_is_retried(http_session, upstream, fault):
    upstream.add_rule(Rule(fault=fault, times=1))
    usage = UsageLedger()
    pieces = [p async for p in make_client(http_session, upstream).stream(MESSAGES, usage)]
    assert "".join(p.text for p in pieces) == THINKER_REPLY
    assert len(upstream.records) == 2
    assert (usage.calls, usage.roles["thinker"].failed_calls) == (1, 0)


async def test_a_stream_reset_before_any_text_is_retried(http_session, upstream):
    upstream.add_rule(Rule(fault="reset", reply="one", times=1))  # cut after the role chunk
    pieces = [p async for p in make_client(http_session, upstream).stream(MESSAGES, UsageLedger())]
    assert "".join(p.text for p in pieces) == THINKER_REPLY
    assert len(upstream.records) == 2


async def test_a_stream_that_breaks_after_pieces_raises_and_is_not_retried(http_session, upstream):
    upstream.add_rule(Rule(fault="reset", reply="a b c d e f", times=1))
    usage = UsageLedger()
    got = []
    with pytest.raises(aiohttp.ClientPayloadError):
        async for piece in make_client(http_session, upstream).stream(MESSAGES, usage):
            got.append(piece.text)
    assert "".join(got) == "a b c"
    assert len(upstream.records) == 1
    entry = usage.roles["thinker"]
    assert (entry.calls, entry.failed_calls) == (0, 1)


async def test_leaving_a_stream_early_aborts_it_upstream(http_session, upstream):
    upstream.token_interval = 0.05
    upstream.add_rule(Rule(reply=" ".join(["word"] * 50)))
    usage = UsageLedger()
    stream = make_client(http_session, upstream).stream(MESSAGES, usage)
    async for _ in stream:
        break
    await stream.aclose()
    assert usage.roles["thinker"].aborted_calls == 1
    await until(lambda: upstream.in_flight == 0)
    assert upstream.records[0].cancelled


# --- secrets -------------------------------------------------------------------------------


async def test_the_api_key_is_sent_but_never_in_errors_or_reprs(http_session, upstream):
    upstream.add_rule(Rule(fault="401"))  # the simulated provider repeats the key in its message
    client = make_client(http_session, upstream, api_key="sk-secret-123")

    with pytest.raises(UpstreamError) as caught:
        await client.complete(MESSAGES, UsageLedger())

    assert upstream.records[0].authorization == "Bearer sk-secret-123"
    assert str(caught.value) == "thinker upstream: HTTP 401 (authentication_error, invalid_api_key)"
    assert describe_error(caught.value) == str(caught.value)
    for text in (repr(caught.value), repr(client.model), repr(client.endpoints[0]), repr(client.endpoints)):
        assert "sk-secret-123" not in text


async def test_a_connection_error_is_described_without_the_host(http_session):
    port = free_port()
    model = ModelConfig(base_url=f"http://127.0.0.1:{port}/v1", model="m", timeout_s=2)
    client = ModelClient(http_session, "voter", model, UpstreamConfig(max_attempts=1))
    with pytest.raises(aiohttp.ClientConnectionError) as caught:
        await client.complete(MESSAGES, UsageLedger())
    described = describe_error(caught.value)
    assert described == type(caught.value).__name__
    assert "127.0.0.1" not in described and str(port) not in described


def test_describe_error():
    assert describe_error(None) == ""
    assert describe_error(TimeoutError()) == "timed out"
    assert describe_error(TimeoutError()) == "timed out"
    assert describe_error(ValueError("at http://10.0.0.1:8000 with sk-x")) == "ValueError"
    assert describe_error(UpstreamError("fuser", "HTTP 503")) == "fuser upstream: HTTP 503"
