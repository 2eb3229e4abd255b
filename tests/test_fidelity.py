"""The answer obeys the client: its limits, stops, formats, tools and logprobs reach the fuser,
the call that writes what the client reads; the inner roles keep their configured settings."""

import json

import openai
import pytest
from pydantic import BaseModel

from tests.conftest import SERVICE_KEY
from tests.simulated_upstream import Rule

pytestmark = pytest.mark.serve

MODEL = "token-killer"
QUESTION = [{"role": "user", "content": "What is six times seven?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def fuser_calls(sim):
    return [r for r in sim.records if r.model == "sim-fuser"]


def content_of(chunks) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_an_answer_limit_caps_the_fusers_tokens_and_says_length(client, sim, field, stream):
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, stream=stream, **{field: 5})
    chunks = list(reply) if stream else []

    [fuser] = fuser_calls(sim)
    assert fuser.request["max_tokens"] == 5
    assert fuser.completion_tokens == 5
    if stream:
        assert content_of(chunks) == "The fused final answer is"
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    else:
        assert reply.choices[0].message.content == "The fused final answer is"
        assert reply.choices[0].finish_reason == "length"
    # The inner roles keep their configured limits.
    assert {r.request["max_tokens"] for r in sim.records if r.model != "sim-fuser"} == {64}


def test_a_limit_above_the_configured_one_keeps_the_configured_one(client, sim):
    client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=5000)
    assert fuser_calls(sim)[0].request["max_tokens"] == 64


def test_sampling_and_shaping_fields_reach_the_fuser_only(client, sim):
    client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        temperature=0.1,
        top_p=0.5,
        seed=7,
        stop=["answer"],
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        logit_bias={"42": 5},
    )

    [fuser] = fuser_calls(sim)
    expected = {
        "temperature": 0.1,
        "top_p": 0.5,
        "seed": 7,
        "stop": ["answer"],
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "logit_bias": {"42": 5},
    }
    assert {k: fuser.request.get(k) for k in expected} == expected
    for record in sim.records:
        if record.model != "sim-fuser":
            assert not {"top_p", "seed", "stop", "logit_bias"} & set(record.request)
            assert record.request["temperature"] == 0.7  # the configured one


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_stop_cuts_the_answer_where_the_fuser_stopped(client, sim, stream):
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, stop=" final", stream=stream)
    text = content_of(list(reply)) if stream else reply.choices[0].message.content
    assert text == "The fused"
    assert fuser_calls(sim)[0].request["stop"] == " final"


def test_json_mode_reaches_the_fuser(client, sim):
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, response_format={"type": "json_object"})

    assert fuser_calls(sim)[0].request["response_format"] == {"type": "json_object"}
    assert json.loads(reply.choices[0].message.content) == {"answer": "The fused final answer is 42."}


class Product(BaseModel):
    factor_a: int
    factor_b: int
    product: int


def test_structured_output_with_the_sdks_parse(client, sim):
    parsed = client.chat.completions.parse(model=MODEL, messages=QUESTION, response_format=Product)

    answer = parsed.choices[0].message.parsed
    assert isinstance(answer, Product)
    format_sent = fuser_calls(sim)[0].request["response_format"]
    assert format_sent["type"] == "json_schema" and format_sent["json_schema"]["name"] == "Product"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_logprobs_of_the_answer_come_back(client, sim, stream):
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, logprobs=True, top_logprobs=2, stream=stream)
    chunks = list(reply) if stream else []

    request = fuser_calls(sim)[0].request
    assert (request["logprobs"], request["top_logprobs"]) == (True, 2)
    if stream:
        entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    else:
        entries = reply.choices[0].logprobs.content
    assert [e.token for e in entries] == ["The", " fused", " final", " answer", " is", " 42."]
    assert all(len(e.top_logprobs) == 2 for e in entries)


def test_a_required_tool_call_comes_back_as_a_tool_call(client, sim):
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=[WEATHER], tool_choice="required")

    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "x"}
    assert choice.message.content is None
    request = fuser_calls(sim)[0].request
    assert request["tools"][0]["function"]["name"] == "get_weather" and request["tool_choice"] == "required"
    # The threads saw the tools as part of the problem, to plan the call.
    thinker_prompt = json.dumps([r.messages for r in sim.records if r.model == "sim-thinker"])
    assert "get_weather" in thinker_prompt


def test_a_streamed_tool_call_arrives_in_pieces_that_reassemble(client, sim):
    sim.add_rule(Rule(model="sim-fuser", tool_call={"name": "get_weather", "arguments": {"city": "Paris"}}))
    chunks = list(
        client.chat.completions.create(model=MODEL, messages=QUESTION, tools=[WEATHER], tool_choice="auto", stream=True)
    )

    pieces = [t for c in chunks if c.choices and c.choices[0].delta.tool_calls for t in c.choices[0].delta.tool_calls]
    assert pieces[0].id and pieces[0].function.name == "get_weather"
    arguments = "".join(p.function.arguments or "" for p in pieces)
    assert json.loads(arguments) == {"city": "Paris"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_a_conversation_with_earlier_tool_calls_and_results_keeps_working(client, sim):
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"},
    ]
    reply = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER])

    assert reply.choices[0].message.content == "The fused final answer is 42."
    sent = fuser_calls(sim)[0].messages
    assert any(m.get("tool_calls") for m in sent) and any(m.get("role") == "tool" for m in sent)
    thinker_prompt = json.dumps([r.messages for r in sim.records if r.model == "sim-thinker"])
    assert "18 degrees and sunny" in thinker_prompt


def test_a_profile_without_the_fuser_model_refuses_required_tools(client, sim):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL,
            messages=QUESTION,
            tools=[WEATHER],
            tool_choice="required",
            extra_body={"token_killer": {"fusion": {"strategy": "concat"}}},
        )
    assert caught.value.body["param"] == "tool_choice"
    assert not sim.records


def test_a_failed_fuser_with_tools_required_is_a_clear_error_not_text(client, sim):
    sim.add_rule(Rule(model="sim-fuser", fault="400"))
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model=MODEL, messages=QUESTION, tools=[WEATHER], tool_choice="required")
    assert caught.value.status_code == 502 and "tool call" in caught.value.message


def test_langchain_chat_openai_works_against_the_service(service, sim):
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(model=MODEL, base_url=f"{service}/v1", api_key=SERVICE_KEY, max_retries=0)
    answer = chat.invoke("What is six times seven?")
    assert answer.content == "The fused final answer is 42."
    streamed = "".join(piece.content for piece in chat.stream("What is six times seven?"))
    assert streamed == "The fused final answer is 42."
    with_tools = chat.bind_tools([WEATHER], tool_choice="get_weather").invoke("Weather in Paris?")
    assert with_tools.tool_calls and with_tools.tool_calls[0]["name"] == "get_weather"
