"""The Responses API without Ray: every check of a request, how its items and fields become the
run's conversation and answer settings, the response object and the stream of events."""

import json

import pytest

from actors.checking import effort_overrides
from actors.protocol import APIError
from actors.serving_responses import ResponsesServing
from tests.simulated_upstream import Rule
from tests.test_serving import ANSWER, STEP, Rig

QUESTION = "What is six times seven?"
WEATHER = {
    "type": "function",
    "name": "lookup",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "strict": False,
}


class ResponsesRig:
    """ResponsesServing over the same stages as chat's test rig."""

    def __init__(self, session, upstream, **sections):
        chat = Rig(session, upstream, **sections).serving
        self.finished: list[str] = []
        self.serving = ResponsesServing(
            chat.config,
            chat.prompts,
            think_stream=chat.think_stream,
            think_whole=chat.think_whole,
            fuse_stream=chat.fuse_stream,
            fuse_whole=chat.fuse_whole,
            on_finish=lambda prepared, run, outcome: self.finished.append(outcome),
        )

    def prepare(self, **body):
        body.setdefault("model", "token-killer")
        body.setdefault("input", QUESTION)
        return self.serving.prepare(json.dumps(body).encode(), "req-1")

    async def create(self, **body) -> dict:
        return json.loads(self.serving.encode(await self.serving.complete(self.prepare(**body))))

    async def events(self, **body) -> list[dict]:
        """The stream's events, each checked to carry its type in its `event:` line."""
        writes = await self.serving.stream(self.prepare(stream=True, **body))
        text = "".join([write async for write in writes])
        events = []
        for block in text.split("\n\n"):
            if block.startswith("event: "):
                kind, data = block.split("\n")
                event = json.loads(data.removeprefix("data: "))
                assert kind == f"event: {event['type']}"
                events.append(event)
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
        return events


@pytest.fixture
def rig(http_session, upstream):
    return ResponsesRig(http_session, upstream)


def refused(rig, **body) -> APIError:
    with pytest.raises(APIError) as caught:
        rig.prepare(**body)
    assert caught.value.status == 400
    return caught.value


def kinds(events):
    return [e["type"] for e in events]


# --- checking a request --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("previous_response_id", "resp_1"),
        ("conversation", "conv_1"),
        ("prompt", {"id": "pmpt_1"}),
        ("background", True),
        ("background_options", {"completion_window": "2h"}),
        ("context_management", [{"type": "compaction"}]),
        ("moderation", {"model": "omni-moderation-latest"}),
        ("store", True),
        ("service_tier", "flex"),
    ],
)
def test_every_unsupported_field_is_refused_by_name(rig, upstream, field, value):
    error = refused(rig, **{field: value})
    assert (error.param, error.code) == (field, "unsupported_parameter")
    assert upstream.records == []


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"colour": "blue"}, "colour"),
        ({"temperature": "0.5"}, "temperature"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"reasoning": {"effort": "extreme"}}, "reasoning.effort"),
        ({"reasoning": {"mode": "pro"}}, "reasoning.mode"),
        ({"text": {"verbosity": "low"}}, "text.verbosity"),
        ({"text": {"format": {"type": "json_schema"}}}, "text.format"),
        ({"include": ["file_search_call.results", "everything"]}, "include[1]"),
        ({"input": []}, "input"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input[0].content[0].type",
        ),
        ({"input": [{"role": "user", "content": [{"type": "input_text"}]}]}, "input[0].content[0].text"),
        ({"input": [{"role": "robot", "content": "hi"}]}, "input[0].role"),
        ({"input": [{"role": "user", "content": ""}]}, "input[0].content"),
        ({"input": [{"role": "system", "content": "Be brief."}]}, "input"),
        (
            {
                "input": [
                    {"role": "user", "content": "hi"},
                    {"type": "function_call_output", "call_id": "c9", "output": "x"},
                ]
            },
            "input[1].call_id",
        ),
        ({"tools": [{"name": "x"}]}, "tools[0].type"),
        ({"tools": [{**WEATHER, "name": "bad name!"}]}, "tools[0].name"),
        ({"tools": [{"type": "web_search"}], "tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "search"}}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "file_search"}}, "tool_choice"),
    ],
)
def test_a_malformed_or_unsupported_field_is_refused_naming_it(rig, body, param):
    error = refused(rig, **body)
    assert error.param == param
    assert param.split("[")[0].split(".")[0] in error.message


def test_an_unknown_field_is_refused_as_openai_does(rig):
    assert refused(rig, colour="blue").message == "Unrecognized request argument supplied: colour"


def test_a_request_as_codex_sends_it(rig):
    """Codex 0.169's shape: developer and user message items with input_text parts, function,
    namespace and web_search tools, and the fields it always sends."""
    developer = {"type": "message", "id": "msg_1", "role": "developer"}
    prepared = rig.prepare(
        stream=True,
        input=[
            {**developer, "content": [{"type": "input_text", "text": "You are a coding agent."}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "<env>cwd</env>"}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": QUESTION}]},
        ],
        tools=[
            {**WEATHER, "description": "Look up."},
            {"type": "namespace", "name": "agents", "description": "Sub-agents.", "tools": [WEATHER]},
            {"type": "web_search", "external_web_access": False},
        ],
        tool_choice="auto",
        parallel_tool_calls=True,
        reasoning={"summary": "auto"},
        store=False,
        include=["reasoning.encrypted_content"],
        prompt_cache_key="session-1",
        client_metadata={"session_id": "s", "x-codex-turn-metadata": "{}"},
    )
    conversation = prepared.plan.conversation
    assert (conversation.system, conversation.question) == ("You are a coding agent.", QUESTION)
    assert conversation.turns == (("user", "<env>cwd</env>"), ("user", QUESTION))
    assert conversation.tools.startswith("The final answer may call one of these tools:\n- lookup: Look up.")
    assert prepared.plan.answer.params == {
        "tools": [{"type": "function", "function": {"name": "lookup", "description": "Look up.", **_schema()}}],
        "tool_choice": "auto",
        "parallel_tool_calls": True,
    }
    assert prepared.request.not_shown == [{"type": "namespace", "name": "agents"}, {"type": "web_search"}]
    assert prepared.show_reasoning is True


def _schema():
    return {"parameters": WEATHER["parameters"], "strict": False}


def test_items_become_the_conversation_the_run_takes(rig):
    call = {"type": "function_call", "id": "fc_1", "call_id": "c1", "name": "lookup", "arguments": '{"city": "P"}'}
    prepared = rig.prepare(
        instructions="Be brief.",
        input=[
            {"role": "user", "content": "Weather in Paris?"},
            {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "thought"}]},
            {"role": "assistant", "content": [{"type": "output_text", "text": "Let me look.", "annotations": []}]},
            call,
            {**call, "call_id": "c2", "id": "fc_2"},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "warm"}]},
            {"role": "user", "content": "And tomorrow?"},
        ],
        tools=[WEATHER],
    )
    messages = prepared.plan.conversation.messages
    calls = [
        {"id": c, "type": "function", "function": {"name": "lookup", "arguments": '{"city": "P"}'}}
        for c in ("c1", "c2")
    ]
    assert list(messages) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": calls},  # the reasoning is not sent again
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
        {"role": "tool", "content": "warm", "tool_call_id": "c2"},
        {"role": "user", "content": "And tomorrow?"},
    ]
    assert prepared.plan.conversation.question == "And tomorrow?"


def test_the_answer_fields_go_to_the_fuser_in_chat_wire_form(rig):
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    prepared = rig.prepare(
        max_output_tokens=50,
        temperature=0.3,
        top_p=0.9,
        include=["message.output_text.logprobs"],
        top_logprobs=2,
        text={"format": {"type": "json_schema", "name": "A", "schema": schema, "strict": True}},
        tools=[WEATHER, {**WEATHER, "name": "other"}],
        tool_choice={"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "other"}]},
        parallel_tool_calls=False,
    )
    assert prepared.plan.answer.params == {
        "max_tokens": 50,
        "temperature": 0.3,
        "top_p": 0.9,
        "logprobs": True,
        "top_logprobs": 2,
        "response_format": {"type": "json_schema", "json_schema": {"name": "A", "schema": schema, "strict": True}},
        "tools": [{"type": "function", "function": {"name": "other", **_schema()}}],
        "tool_choice": "required",
        "parallel_tool_calls": False,
    }


def test_a_named_function_choice_in_chat_form(rig):
    params = rig.prepare(tools=[WEATHER], tool_choice={"type": "function", "name": "lookup"}).plan.answer.params
    assert params["tool_choice"] == {"type": "function", "function": {"name": "lookup"}}
    assert rig.prepare(text={"format": {"type": "json_object"}}).plan.answer.params == {
        "response_format": {"type": "json_object"}
    }


@pytest.mark.parametrize(
    ("effort", "threads", "steps", "validated"),
    [
        (None, 2, 2, True),
        ("none", 1, 1, False),
        ("minimal", 1, 1, False),
        ("low", 1, 1, True),
        ("medium", 2, 2, True),
        ("high", 2, 4, True),
        ("xhigh", 4, 4, True),
        ("max", 4, 4, True),
    ],
)
def test_reasoning_effort_sets_the_depth_of_thinking(rig, effort, threads, steps, validated):
    reasoning = {} if effort is None else {"reasoning": {"effort": effort}}
    settings = rig.prepare(**reasoning).plan.settings
    assert (settings.thinking.num_threads, settings.thinking.max_steps) == (threads, steps)
    assert settings.validation.enabled is validated


def test_effort_stays_within_the_ceilings_and_yields_to_explicit_overrides(rig):
    profile = rig.serving.config.profile_settings["token-killer"]
    limits = rig.serving.config.limits.model_copy(update={"max_threads": 3, "max_steps": 3})
    assert effort_overrides(profile, "max", limits) == {"thinking": {"num_threads": 3, "max_steps": 3}}
    settings = rig.prepare(reasoning={"effort": "minimal"}, token_killer={"thinking": {"num_threads": 3}}).plan.settings
    assert (settings.thinking.num_threads, settings.thinking.max_steps) == (3, 1)


def test_truncation_auto_drops_the_oldest_turns_and_disabled_refuses(http_session, upstream):
    rig = ResponsesRig(http_session, upstream, limits={"max_total_chars": 100})
    old = [{"role": "user", "content": "x" * 60}, {"role": "assistant", "content": "y" * 30}]
    question = {"role": "user", "content": QUESTION}
    error = refused(rig, input=[*old, question])
    assert (error.param, error.code) == ("input", "context_length_exceeded")
    kept = rig.prepare(input=[*old, question], truncation="auto", instructions="Be brief.").plan.conversation
    assert kept.turns == (("assistant", "y" * 30), ("user", QUESTION)) and kept.system == "Be brief."
    error = refused(rig, input=[{"role": "user", "content": "z" * 101}], truncation="auto")
    assert error.code == "context_length_exceeded"  # the question itself never goes


def test_the_summary_is_shown_unless_the_client_says_not(rig):
    assert rig.prepare().show_reasoning is True  # the service's default (show_reasoning)
    assert rig.prepare(reasoning={"summary": "detailed"}).show_reasoning is True
    assert rig.prepare(reasoning={"summary": None}).show_reasoning is False
    assert rig.prepare(reasoning={"summary": "auto"}, include_reasoning=False).show_reasoning is False


# --- the response object ---------------------------------------------------------------------------


async def test_a_response_has_the_responses_shape_and_exact_usage(rig, upstream):
    body = await rig.create(instructions="Be brief.", metadata={"k": "v"}, temperature=0.5)

    assert (body["id"], body["object"], body["status"], body["model"]) == (
        "resp_req-1",
        "response",
        "completed",
        "token-killer",
    )
    reasoning, message = body["output"]
    assert (reasoning["type"], reasoning["id"], reasoning["encrypted_content"]) == ("reasoning", "rs_req-1", None)
    lines = reasoning["summary"][0]["text"].splitlines()
    assert lines[0] == f"[thread 1 · step 1] {STEP}" and len(lines) == 8
    assert message == {
        "id": "msg_req-1",
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": ANSWER, "annotations": [], "logprobs": []}],
    }
    prompt, completion = upstream.served_usage()
    fuser = sum(r.completion_tokens for r in upstream.records if r.model == "sim-fuser")
    assert body["usage"] == {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": completion - fuser},
        "total_tokens": prompt + completion,
    }
    assert (body["instructions"], body["metadata"], body["temperature"], body["store"]) == (
        "Be brief.",
        {"k": "v"},
        0.5,
        False,
    )
    assert body["token_killer"]["threads_kept"] == 2 and body["token_killer"]["tools_not_shown"] == []
    assert rig.finished == ["ok"]


async def test_a_tool_call_answer_is_a_function_call_item(rig):
    body = await rig.create(tools=[WEATHER], tool_choice="required")
    [call] = [item for item in body["output"] if item["type"] == "function_call"]
    assert (call["name"], call["arguments"], call["status"]) == ("lookup", '{"city": "x"}', "completed")
    assert call["call_id"].startswith("call_") and call["id"] == "fc_req-1_0"
    assert [item["type"] for item in body["output"]] == ["reasoning", "function_call"]


async def test_an_answer_cut_at_max_output_tokens_is_incomplete(rig):
    body = await rig.create(max_output_tokens=3)
    assert (body["status"], body["incomplete_details"]) == ("incomplete", {"reason": "max_output_tokens"})
    assert body["output"][-1]["status"] == "incomplete"


async def test_logprobs_when_included(rig):
    body = await rig.create(include=["message.output_text.logprobs"], top_logprobs=1)
    logprobs = body["output"][-1]["content"][0]["logprobs"]
    assert "".join(entry["token"] for entry in logprobs) == ANSWER


async def test_a_hidden_summary_leaves_no_reasoning_item(rig):
    body = await rig.create(reasoning={"summary": None})
    assert [item["type"] for item in body["output"]] == ["message"]


# --- the stream -----------------------------------------------------------------------------------


async def test_the_stream_is_the_responses_event_sequence(rig):
    events = await rig.events(reasoning={"summary": "auto"})

    reasoning = "rs_req-1"
    head = [(e["type"], e.get("output_index"), e.get("item_id")) for e in events[:4]]
    assert head == [
        ("response.created", None, None),
        ("response.in_progress", None, None),
        ("response.output_item.added", 0, None),
        ("response.reasoning_summary_part.added", 0, reasoning),
    ]
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    # The whole sequence, each run of deltas as one.
    sequence = [k for i, k in enumerate(kinds(events)) if i == 0 or k != kinds(events)[i - 1]]
    assert sequence == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.reasoning_summary_part.added",
        "response.reasoning_summary_text.delta",
        "response.reasoning_summary_text.done",
        "response.reasoning_summary_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    summary = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_summary_text.delta")
    answer = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert answer == ANSWER and summary.count(STEP) == 4
    completed = events[-1]["response"]
    assert completed["status"] == "completed" and completed["usage"]["output_tokens"] > 0
    assert completed["output"][0]["summary"][0]["text"] == summary
    assert completed["output"][1]["content"][0]["text"] == ANSWER
    assert completed["token_killer"]["fusion"]["mode"] == "fused"
    assert all(e["output_index"] == 1 for e in events if e["type"] == "response.output_text.delta")
    assert rig.finished == ["ok"]


async def test_a_streamed_tool_call_is_a_function_call_item_with_argument_deltas(rig):
    events = await rig.events(tools=[WEATHER], tool_choice="required", reasoning={"summary": None})

    added = next(e for e in events if e["type"] == "response.output_item.added")
    assert (added["output_index"], added["item"]["type"], added["item"]["name"]) == (0, "function_call", "lookup")
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta")
    done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    assert deltas == done["arguments"] == '{"city": "x"}'
    assert kinds(events)[-2:] == ["response.output_item.done", "response.completed"]
    assert [item["type"] for item in events[-1]["response"]["output"]] == ["function_call"]


async def test_a_stream_cut_at_max_output_tokens_ends_incomplete(rig):
    events = await rig.events(max_output_tokens=3)
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


async def test_a_stream_that_fails_after_it_began_ends_with_response_failed(rig, upstream):
    upstream.add_rule(Rule(model="sim-fuser", fault="reset"))
    events = await rig.events()
    failed = events[-1]
    assert failed["type"] == "response.failed"
    assert failed["response"]["status"] == "failed"
    assert failed["response"]["error"]["code"] == "fusion_failed"
    assert failed["response"]["output"][-1]["status"] == "incomplete"  # the answer as far as it got
    assert "response.completed" not in kinds(events)
    assert rig.finished == ["failed"]


async def test_a_stream_that_fails_at_once_is_an_http_error(rig, upstream):
    upstream.add_rule(Rule(model="sim-thinker", fault="400"))
    with pytest.raises(APIError) as caught:
        await rig.events()
    assert (caught.value.status, caught.value.code) == (502, "upstream_failed")
