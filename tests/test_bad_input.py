"""Every malformed request gets the right 4xx in the OpenAI shape, and nothing is lost.

The table is sent raw (not through the SDK, which would refuse most of it) to the real service.
The test service takes at most 20,000 body bytes, 50 messages and 10,000 characters.
"""

import json
import urllib.error
import urllib.request

import pytest

from tests.conftest import LIMITS, SERVICE_KEY

pytestmark = pytest.mark.serve

MODEL = "token-killer"
USER = {"role": "user", "content": "What is six times seven?"}


def body(**fields) -> bytes:
    return json.dumps({"model": MODEL, "messages": [USER], **fields}).encode()


def post(service: str, data: bytes, headers: dict | None = None) -> tuple[int, dict, dict]:
    request = urllib.request.Request(
        f"{service}/v1/chat/completions",
        data=data,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {SERVICE_KEY}", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), dict(error.headers)


CASES = [
    # (id, body bytes, status, param, code)
    ("invalid-json", b"{not json", 400, None, None),
    ("truncated-json", b'{"model": "token-killer", "messages": [', 400, None, None),
    ("empty-body", b"", 400, None, None),
    (
        "invalid-utf8",
        b'{"model": "token-killer", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
        400,
        None,
        None,
    ),
    ("array-body", b"[1, 2]", 400, None, None),
    ("string-body", b'"hello"', 400, None, None),
    ("null-body", b"null", 400, None, None),
    ("no-model", json.dumps({"messages": [USER]}).encode(), 400, "model", None),
    ("model-not-string", json.dumps({"model": 7, "messages": [USER]}).encode(), 400, "model", None),
    ("unknown-model", json.dumps({"model": "gpt-5", "messages": [USER]}).encode(), 404, "model", "model_not_found"),
    ("no-messages", json.dumps({"model": MODEL}).encode(), 400, "messages", None),
    ("empty-messages", body(messages=[]), 400, "messages", None),
    ("messages-not-list", body(messages={"role": "user", "content": "hi"}), 400, "messages", None),
    ("message-not-object", body(messages=["hi"]), 400, "messages[0]", None),
    ("unknown-role", body(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages[0].role", None),
    ("missing-role", body(messages=[{"content": "hi"}]), 400, "messages[0].role", None),
    ("content-number", body(messages=[{"role": "user", "content": 42}]), 400, "messages[0].content", None),
    (
        "image-part",
        body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        400,
        "messages[0].content[0].type",
        None,
    ),
    ("part-not-object", body(messages=[{"role": "user", "content": ["hi"]}]), 400, "messages[0].content[0]", None),
    (
        "part-text-number",
        body(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}]),
        400,
        "messages[0].content[0].text",
        None,
    ),
    ("no-user-message", body(messages=[{"role": "system", "content": "be nice"}]), 400, "messages", None),
    ("stream-not-bool", body(stream="yes"), 400, "stream", None),
    ("temperature-string", body(temperature="hot"), 400, "temperature", None),
    ("temperature-too-high", body(temperature=2.5), 400, "temperature", None),
    ("temperature-negative", body(temperature=-0.1), 400, "temperature", None),
    ("top-p-too-high", body(top_p=1.5), 400, "top_p", None),
    ("n-two", body(n=2), 400, "n", None),
    ("max-tokens-zero", body(max_tokens=0), 400, "max_tokens", None),
    ("max-completion-tokens-negative", body(max_completion_tokens=-5), 400, "max_completion_tokens", None),
    ("presence-penalty-out-of-range", body(presence_penalty=3), 400, "presence_penalty", None),
    ("stream-options-not-object", body(stream=True, stream_options="yes"), 400, "stream_options", None),
    ("deadline-negative", body(deadline_s=-1), 400, "deadline_s", None),
    ("too-many-messages", body(messages=[USER] * 51), 400, "messages", "too_many_messages"),
    (
        "too-many-characters",
        body(messages=[{"role": "user", "content": "x" * (LIMITS["max_total_chars"] + 1)}]),
        400,
        "messages",
        "context_length_exceeded",
    ),
    (
        "body-too-large",
        body(messages=[{"role": "user", "content": "x" * (LIMITS["max_body_bytes"] + 1)}]),
        413,
        None,
        "request_too_large",
    ),
    # Fields that would shape the answer and cannot be honoured: refused, naming them.
    ("unknown-field", body(frobnicate=True), 400, "frobnicate", None),
    ("audio-output", body(audio={"voice": "alloy", "format": "wav"}), 400, "audio", "unsupported_parameter"),
    ("audio-modality", body(modalities=["text", "audio"]), 400, "modalities", "unsupported_parameter"),
    ("prediction", body(prediction={"type": "content", "content": "x"}), 400, "prediction", "unsupported_parameter"),
    ("reasoning-effort", body(reasoning_effort="high"), 400, "reasoning_effort", "unsupported_parameter"),
    ("verbosity", body(verbosity="low"), 400, "verbosity", "unsupported_parameter"),
    ("web-search", body(web_search_options={}), 400, "web_search_options", "unsupported_parameter"),
    ("functions", body(functions=[{"name": "f"}]), 400, "functions", "unsupported_parameter"),
    ("store", body(store=True), 400, "store", "unsupported_parameter"),
    ("service-tier", body(service_tier="flex"), 400, "service_tier", "unsupported_parameter"),
    ("top-logprobs-alone", body(top_logprobs=2), 400, "top_logprobs", None),
    ("five-stops", body(stop=["a", "b", "c", "d", "e"]), 400, "stop", None),
    ("response-format-type", body(response_format={"type": "yaml"}), 400, "response_format.type", None),
    ("json-schema-missing", body(response_format={"type": "json_schema"}), 400, "response_format", None),
    ("tool-choice-without-tools", body(tool_choice="required"), 400, "tool_choice", None),
    (
        "tool-choice-unknown",
        body(
            tools=[{"type": "function", "function": {"name": "f"}}],
            tool_choice={"type": "function", "function": {"name": "g"}},
        ),
        400,
        "tool_choice",
        None,
    ),
    (
        "tool-bad-name",
        body(tools=[{"type": "function", "function": {"name": "no spaces"}}]),
        400,
        "tools[0].function.name",
        None,
    ),
    # Message rules, as OpenAI applies them.
    ("user-without-content", body(messages=[{"role": "user"}]), 400, "messages[0].content", None),
    ("user-null-content", body(messages=[{"role": "user", "content": None}]), 400, "messages[0].content", None),
    ("system-without-content", body(messages=[{"role": "system"}, USER]), 400, "messages[0].content", None),
    (
        "assistant-empty",
        body(messages=[USER, {"role": "assistant"}, USER]),
        400,
        "messages[1].content",
        None,
    ),
    (
        "tool-without-id",
        body(messages=[USER, {"role": "tool", "content": "42"}]),
        400,
        "messages[1].tool_call_id",
        None,
    ),
    # The extension: a request's overrides of its profile, within the service's ceilings.
    (
        "override-unknown-key",
        body(token_killer={"thinking": {"num_thread": 2}}),
        400,
        "token_killer.thinking.num_thread",
        None,
    ),
    (
        "override-wrong-type",
        body(token_killer={"thinking": {"num_threads": "2"}}),
        400,
        "token_killer.thinking.num_threads",
        None,
    ),
    (
        "override-over-ceiling",
        body(token_killer={"thinking": {"num_threads": 9}}),
        400,
        "token_killer.thinking.num_threads",
        None,
    ),
    ("override-not-object", body(token_killer=3), 400, "token_killer", None),
    (
        "budget-too-small",
        body(token_killer={"budget_tokens": 10}),
        400,
        "token_killer.budget_tokens",
        "budget_too_small",
    ),
]


@pytest.mark.parametrize(("data", "status", "param", "code"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_an_openai_shaped_error(service, sim, data, status, param, code):
    got_status, got, _ = post(service, data)

    assert got_status == status, got
    assert set(got) == {"error"} and set(got["error"]) == {"message", "type", "param", "code"}
    assert isinstance(got["error"]["message"], str) and got["error"]["message"]
    assert got["error"]["type"] == "invalid_request_error"
    assert got["error"]["param"] == param
    assert got["error"]["code"] == code
    assert not sim.records  # refused before any upstream call


def test_the_table_is_long_enough_and_the_service_keeps_serving_after_it(service, sim):
    assert len(CASES) >= 30
    for _, data, *_ in CASES:
        post(service, data)
    status, reply, _ = post(service, body())
    assert status == 200 and reply["choices"][0]["message"]["content"]


def test_both_token_limits_and_every_honoured_field_are_accepted(service, sim):
    status, reply, _ = post(
        service,
        body(
            max_tokens=50,
            max_completion_tokens=40,
            logit_bias={"1": 2},
            user="u1",
            metadata={"k": "v"},
            seed=1,
            top_p=0.9,
            presence_penalty=0.1,
            frequency_penalty=0.1,
            stop=["\n\n"],
            n=1,
            store=False,
            service_tier="auto",
            modalities=["text"],
            parallel_tool_calls=None,
            prompt_cache_key="k",
            safety_identifier="s",
            stream_options=None,
        ),
    )
    assert status == 200 and reply["choices"][0]["message"]["content"]


def test_unknown_routes_and_methods_get_openai_shaped_errors(service):
    request = urllib.request.Request(f"{service}/v1/nothing-here")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 404
    assert set(json.loads(caught.value.read())["error"]) == {"message", "type", "param", "code"}
