"""Serving chat completions without Ray: every check of a request, the JSON reply, the SSE
stream, the `token_killer` extension and the errors clients see."""

import asyncio
import json
import time

import pytest

from actors.fusion import Fuser, FusionBroken, FusionUnavailable
from actors.model_client import role_clients
from actors.pipeline import NothingToFuse
from actors.prompts import load_prompts
from actors.protocol import APIError, ChatCompletion
from actors.schemas import UsageLedger
from actors.serving_chat import ChatServing
from actors.thinking import RequestThinking
from actors.validation import StepValidator, ValidationBatches
from tests.simulated_upstream import Rule
from tests.support import sim_config, until

PROMPTS = load_prompts("en")
QUESTION = "What is six times seven?"
USER = {"role": "user", "content": QUESTION}
ANSWER = "The fused final answer is 42."
STEP = "We reason about the problem carefully."
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


class Rig:
    """ChatServing on the simulated upstream, the roles bound as the deployments bind them."""

    def __init__(self, session, upstream, **sections):
        sections.setdefault("thinking", {"num_threads": 2, "max_steps": 2})
        self.config = sim_config(upstream.base_url, **sections)
        clients = role_clients(session, self.config)
        validator = StepValidator(PROMPTS, clients["counterexample"], clients["voter"])
        fuser = Fuser(PROMPTS, clients["fuser"])
        self.finished: list[str] = []

        async def send(jobs):
            return list(await asyncio.gather(*(validator.validate(job) for job in jobs)))

        def think(job):
            thinking = RequestThinking(job, PROMPTS, clients, None)
            if job.settings.validation.enabled:
                thinking.validate = ValidationBatches(send, lambda: thinking.live).validate
            return thinking.updates()

        async def fuse_whole(job):
            yield await fuser.answer(job)

        def on_finish(prepared, run, outcome):
            self.finished.append(outcome)

        self.serving = ChatServing(
            self.config,
            PROMPTS,
            think_stream=think,
            think_whole=think,
            fuse_stream=fuser.fuse,
            fuse_whole=fuse_whole,
            on_finish=on_finish,
        )

    def prepare(self, **body):
        body.setdefault("model", "token-killer")
        body.setdefault("messages", [USER])
        return self.serving.prepare(json.dumps(body).encode(), "req-1")

    async def complete(self, **body) -> ChatCompletion:
        return await self.serving.complete(self.prepare(**body))

    async def stream(self, **body) -> list[str]:
        """The SSE events of a stream, one per item (a write may carry several)."""
        writes = await self.serving.stream(self.prepare(stream=True, **body))
        text = "".join([write async for write in writes])
        return [event + "\n\n" for event in text.split("\n\n") if event]


@pytest.fixture
def rig(http_session, upstream):
    return Rig(http_session, upstream)


def refused(rig, raw=None, **body) -> APIError:
    with pytest.raises(APIError) as caught:
        if raw is not None:
            rig.serving.prepare(raw, "req-1")
        else:
            rig.prepare(**body)
    assert caught.value.status in (400, 404)
    return caught.value


def chunks(lines):
    """The JSON payloads of SSE lines (comments and [DONE] left out)."""
    return [json.loads(line[6:]) for line in lines if line.startswith("data: {")]


# --- checking a request ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("modalities", ["text", "audio"]),
        ("audio", {"voice": "alloy", "format": "mp3"}),
        ("prediction", {"type": "content", "content": "x"}),
        ("reasoning_effort", "high"),
        ("verbosity", "low"),
        ("web_search_options", {}),
        ("functions", [{"name": "f"}]),
        ("function_call", "auto"),
        ("store", True),
        ("service_tier", "flex"),
    ],
)
def test_every_unsupported_field_is_refused_by_name(rig, upstream, field, value):
    error = refused(rig, **{field: value})
    assert (error.status, error.param, error.code) == (400, field, "unsupported_parameter")
    assert error.message.startswith(f"'{field}': ")
    assert upstream.records == []


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"colour": "blue"}, "colour"),
        ({"n": 2}, "n"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stream": "yes"}, "stream"),  # JSON types are strict
        ({"temperature": "0.5"}, "temperature"),
        ({"temperature": 3}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content[0].type",
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ],
)
def test_a_malformed_field_is_refused_naming_it(rig, body, param):
    error = refused(rig, **body)
    assert (error.status, error.param) == (400, param)
    assert param in error.message


def test_an_unknown_field_is_refused_as_openai_does(rig):
    error = refused(rig, colour="blue")
    assert error.message == "Unrecognized request argument supplied: colour"


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe", b"[1, 2]", b'"text"'])
def test_a_body_that_is_not_a_json_object_is_refused(rig, raw):
    error = refused(rig, raw=raw)
    assert error.status == 400 and error.type == "invalid_request_error"


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([{"role": "user"}], "messages[0].content"),
        ([{"role": "user", "content": None}], "messages[0].content"),
        ([{"role": "user", "content": []}], "messages[0].content"),
        ([{"role": "system"}, USER], "messages[0].content"),
        ([{"role": "developer", "content": []}, USER], "messages[0].content"),
        ([USER, {"role": "assistant"}], "messages[1].content"),
        ([USER, {"role": "assistant", "content": None, "tool_calls": []}], "messages[1].content"),
        ([USER, {"role": "tool", "tool_call_id": "call_1"}], "messages[1].content"),
        ([USER, {"role": "tool", "content": "sunny"}], "messages[1].tool_call_id"),
        ([{"role": "user", "content": "hi", "tool_calls": []}], "messages[0].tool_calls"),
        ([{"role": "system", "content": "Be brief."}], "messages"),  # no user message
        ([{"role": "assistant", "content": "Hello."}], "messages"),
    ],
)
def test_message_rules(rig, messages, param):
    error = refused(rig, messages=messages)
    assert (error.status, error.param) == (400, param)


CALL = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"city": "Paris"}'}}


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "6*7?"}]}],
        [
            USER,
            {"role": "assistant", "content": None, "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            USER,
        ],
        [USER, {"role": "assistant", "content": None, "refusal": "I cannot."}, USER],
        [{"role": "developer", "content": "Be brief."}, USER, {"role": "assistant", "content": "42", "name": "bot"}],
    ],
)
def test_messages_that_follow_the_rules_are_accepted(rig, messages):
    assert rig.prepare(messages=messages).plan.conversation.question


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"tool_choice": "auto"}, "tool_choice", "only allowed when 'tools'"),
        ({"parallel_tool_calls": True}, "parallel_tool_calls", "only allowed when 'tools'"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "search"}}},
            "tool_choice",
            "'search'",
        ),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name", ""),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type", ""),
    ],
)
def test_tool_rules(rig, body, param, says):
    error = refused(rig, **body)
    assert (error.status, error.param) == (400, param)
    assert says in error.message


def test_accepted_fields_that_change_nothing(rig):
    prepared = rig.prepare(
        user="u-1",
        safety_identifier="s",
        metadata={"k": "v"},
        store=False,
        service_tier="auto",
        prompt_cache_key="p",
        modalities=["text"],
        n=1,
        stream_options={"include_usage": False, "include_obfuscation": False},
    )
    assert prepared.plan.answer.params == {}


def test_the_answer_fields_go_to_the_fuser_in_wire_form(rig):
    named = {"type": "function", "function": {"name": "lookup"}}
    prepared = rig.prepare(
        max_tokens=100,
        max_completion_tokens=50,
        temperature=0.3,
        stop="END",
        logprobs=True,
        top_logprobs=2,
        response_format={"type": "json_object"},
        tools=TOOLS,
        tool_choice=named,
        parallel_tool_calls=False,
    )
    assert prepared.plan.answer.params == {
        "max_tokens": 50,  # max_completion_tokens supersedes max_tokens
        "temperature": 0.3,
        "stop": "END",
        "logprobs": True,
        "top_logprobs": 2,
        "parallel_tool_calls": False,
        "response_format": {"type": "json_object"},
        "tools": TOOLS,
        "tool_choice": named,
    }
    assert prepared.plan.answer.structured and prepared.plan.answer.tools_required


def test_a_text_response_format_is_no_constraint(rig):
    assert rig.prepare(response_format={"type": "text"}).plan.answer.params == {}


def test_the_conversation_keeps_every_message(rig):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": "Use metric units."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 20 C"},
        {"role": "user", "content": "And tomorrow?"},
    ]
    conversation = rig.prepare(messages=messages, tools=TOOLS).plan.conversation
    assert conversation.system == "Be brief.\n\nUse metric units."
    assert conversation.turns == (
        ("user", "Weather in Paris?"),
        ("assistant", '[called tool lookup with {"city": "Paris"}]'),
        ("user", "[result of tool call call_1] sunny, 20 C"),
        ("user", "And tomorrow?"),
    )
    assert (conversation.question, conversation.question_at) == ("And tomorrow?", 3)
    assert conversation.tools.startswith("The final answer may call one of these tools:\n- lookup")
    assert conversation.messages[3] == {"role": "assistant", "content": None, "tool_calls": [CALL]}
    assert conversation.messages[4] == {"role": "tool", "content": "sunny, 20 C", "tool_call_id": "call_1"}


def test_tool_choice_none_hides_the_tools_from_the_reasoning(rig):
    assert rig.prepare(tools=TOOLS, tool_choice="none").plan.conversation.tools == ""


def test_the_profile_comes_from_the_model(rig):
    classic = rig.prepare(model="token-killer-classic")
    assert classic.profile == "token-killer-classic"
    assert classic.plan.settings.economy.n_sampling is False
    assert rig.prepare(model="token-killer-deep").plan.settings.thinking.max_steps == 6


def test_an_unknown_model_is_a_404_naming_the_available_ones(rig):
    error = refused(rig, model="gpt-4o")
    assert (error.status, error.param, error.code) == (404, "model", "model_not_found")
    assert "'gpt-4o'" in error.message and "'token-killer-classic'" in error.message


def test_models_lists_the_profiles(rig):
    assert [m.id for m in rig.serving.models().data] == ["token-killer", "token-killer-classic", "token-killer-deep"]
    assert rig.serving.model("token-killer-deep").id == "token-killer-deep"
    with pytest.raises(APIError) as caught:
        rig.serving.model("nope")
    assert caught.value.status == 404


def test_overrides_apply_to_the_request(rig):
    prepared = rig.prepare(token_killer={"thinking": {"num_threads": 1}, "validation": {"on_fail": "flag"}})
    assert prepared.plan.settings.thinking.num_threads == 1
    assert prepared.plan.settings.validation.on_fail == "flag"


@pytest.mark.parametrize(
    ("overrides", "param"),
    [
        ({"thinking": {"num_threads": 99}}, "token_killer.thinking.num_threads"),
        ({"thinking": {"num_threads": "2"}}, "token_killer.thinking.num_threads"),
        ({"thinking": {"speed": 2}}, "token_killer.thinking.speed"),
        ({"budget_tokens": -5}, "token_killer.budget_tokens"),
    ],
)
def test_a_bad_override_is_a_400_naming_the_field(rig, overrides, param):
    error = refused(rig, token_killer=overrides)
    assert (error.status, error.param) == (400, param)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": TOOLS, "tool_choice": "required"}, "tool_choice"),
    ],
)
def test_a_structured_answer_needs_the_fuser_model(rig, body, param):
    error = refused(rig, token_killer={"fusion": {"strategy": "majority"}}, **body)
    assert (error.status, error.param) == (400, param)


def test_limits_on_messages(http_session, upstream):
    rig = Rig(http_session, upstream, limits={"max_messages": 2, "max_total_chars": 30})
    error = refused(rig, messages=[USER, {"role": "assistant", "content": "x"}, USER])
    assert (error.param, error.code) == ("messages", "too_many_messages")
    error = refused(rig, messages=[{"role": "user", "content": "x" * 31}])
    assert (error.param, error.code) == ("messages", "context_length_exceeded")


def test_the_deadline_keeps_time_for_fusion(http_session, upstream):
    rig = Rig(http_session, upstream, limits={"deadline_s": 60, "fusion_reserve_s": 5})
    before = time.time()
    plan = rig.prepare().plan
    assert before + 60 <= plan.deadline <= time.time() + 60
    assert plan.deadline - plan.thinking_stop_at == pytest.approx(5)
    short = rig.prepare(deadline_s=4).plan
    assert short.deadline - short.thinking_stop_at == pytest.approx(2)  # at most half of a short one
    assert rig.prepare(deadline_s=600).plan.deadline <= time.time() + 60  # never beyond the limit


def test_reasoning_is_shown_as_configured_unless_the_request_says(http_session, upstream):
    rig = Rig(http_session, upstream)
    assert rig.prepare().show_reasoning is True
    assert rig.prepare(include_reasoning=False).show_reasoning is False
    hidden = Rig(http_session, upstream, show_reasoning=False)
    assert hidden.prepare().show_reasoning is False
    assert hidden.prepare(include_reasoning=True).show_reasoning is True


def test_only_a_whole_answer_can_restart_its_fusion(rig):
    assert rig.prepare().plan.can_restart_fusion is True
    assert rig.prepare(stream=True).plan.can_restart_fusion is False


# --- the JSON reply --------------------------------------------------------------------------


async def test_a_completion_has_the_openai_shape_and_exact_usage(rig, upstream):
    completion = await rig.complete()

    body = json.loads(completion.model_dump_json(exclude_unset=True))
    assert set(body) == {"id", "object", "created", "model", "choices", "usage", "token_killer"}
    assert (body["id"], body["object"], body["model"]) == ("chatcmpl-req-1", "chat.completion", "token-killer")
    [choice] = body["choices"]
    assert (choice["index"], choice["finish_reason"], choice["logprobs"]) == (0, "stop", None)
    message = choice["message"]
    assert set(message) == {"role", "content", "reasoning_content", "reasoning", "refusal"}
    assert (message["role"], message["content"], message["refusal"]) == ("assistant", ANSWER, None)
    assert message["reasoning"] == message["reasoning_content"]  # vLLM's and OpenRouter's name too
    lines = message["reasoning_content"].splitlines()
    for thread in (1, 2):
        for step in (1, 2):
            written = lines.index(f"[thread {thread} · step {step}] {STEP}")
            checked = lines.index(f"[thread {thread} · step {step} · passed, no counterexample found]")
            assert written < checked
    assert len(lines) == 8
    prompt, completion_tokens = upstream.served_usage()
    fuser_completion = sum(r.completion_tokens for r in upstream.records if r.model == "sim-fuser")
    assert body["usage"] == {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": completion_tokens - fuser_completion},
    }
    assert fuser_completion == 6
    assert rig.finished == ["ok"]


async def test_the_extension_field_reports_the_run(rig, upstream):
    extension = (await rig.complete()).token_killer
    assert {
        k: extension[k]
        for k in (
            "profile",
            "calls_aborted",
            "cost",
            "budget_tokens",
            "threads_kept",
            "threads_failed",
            "steps_validated",
            "steps_failed",
            "steps_revised",
            "steps_flagged",
            "steps_unchallenged",
            "skipped",
            "fusion",
            "fusion_fallback_thread",
        )
    } == {
        "profile": "token-killer",
        "calls_aborted": 0,
        "cost": None,
        "budget_tokens": None,
        "threads_kept": 2,
        "threads_failed": [],
        "steps_validated": 4,
        "steps_failed": 0,
        "steps_revised": 0,
        "steps_flagged": 0,
        "steps_unchallenged": 4,
        "skipped": [],
        "fusion": {"mode": "fused", "thread": None, "restarted": False, "reason": None},
        "fusion_fallback_thread": None,
    }
    by_role = extension["usage_by_role"]
    assert sorted(by_role) == ["counterexample", "fuser", "thinker"]  # no vote: no critic found anything
    assert {role: u["calls"] for role, u in by_role.items()} == {"counterexample": 4, "fuser": 1, "thinker": 4}
    for role, usage in by_role.items():
        served = [r for r in upstream.records if r.model == f"sim-{role}"]
        assert (usage["prompt_tokens"], usage["completion_tokens"]) == (
            sum(r.prompt_tokens for r in served),
            sum(r.completion_tokens for r in served),
        )


async def test_the_cost_is_reported_when_models_have_prices(http_session, upstream):
    config = sim_config(upstream.base_url).models
    models = {role: m.model_dump(exclude={"api_key", "fallbacks"}) for role, m in config.items()}
    for model in models.values():
        model["price"] = {"input": 1.0, "output": 2.0}
    rig = Rig(http_session, upstream, models=models)
    completion = await rig.complete()
    prompt, completion_tokens = upstream.served_usage()
    assert completion.token_killer["cost"]["total_usd"] == pytest.approx((prompt + 2 * completion_tokens) / 1e6)


async def test_the_economy_profile_answers_alike_for_fewer_tokens(rig, upstream):
    totals = {}
    for model in ("token-killer", "token-killer-classic"):
        upstream.reset()
        completion = await rig.complete(model=model)
        assert completion.choices[0].message.content == ANSWER
        assert completion.usage.total_tokens == sum(upstream.served_usage())
        totals[model] = completion.usage.total_tokens, len(upstream.records)
    assert totals["token-killer"][0] < totals["token-killer-classic"][0]
    assert totals["token-killer"][1] < totals["token-killer-classic"][1]


async def test_the_reasoning_goes_under_the_configured_names(http_session, upstream):
    rig = Rig(http_session, upstream, reasoning_fields=["reasoning"])
    message = json.loads((await rig.complete()).model_dump_json(exclude_unset=True))["choices"][0]["message"]
    assert "reasoning_content" not in message and "[thread 1 · step 1]" in message["reasoning"]
    deltas = [c["choices"][0]["delta"] for c in chunks(await rig.stream())[1:-1]]
    assert {key for delta in deltas for key in delta} == {"reasoning", "content"}


async def test_hidden_reasoning_is_left_out_of_the_reply(rig):
    body = json.loads((await rig.complete(include_reasoning=False)).model_dump_json(exclude_unset=True))
    assert "reasoning_content" not in body["choices"][0]["message"]


async def test_a_tool_call_answer(rig):
    completion = await rig.complete(tools=TOOLS, tool_choice="required")
    [choice] = completion.choices
    assert (choice.finish_reason, choice.message.content) == ("tool_calls", None)
    [call] = choice.message.tool_calls
    assert call["function"] == {"name": "lookup", "arguments": '{"city": "x"}'} and call["id"].startswith("call_")


async def test_a_json_answer(rig):
    completion = await rig.complete(response_format={"type": "json_object"})
    assert json.loads(completion.choices[0].message.content) == {"answer": ANSWER}


async def test_logprobs_in_the_reply(rig):
    completion = await rig.complete(logprobs=True, top_logprobs=1)
    entries = completion.choices[0].logprobs["content"]
    assert "".join(e["token"] for e in entries) == ANSWER


async def test_every_thread_failing_is_a_502_that_says_not_to_retry(rig, upstream):
    upstream.add_rule(Rule(model="sim-thinker", fault="400"))
    with pytest.raises(APIError) as caught:
        await rig.complete()
    error = caught.value
    assert (error.status, error.type, error.code) == (502, "upstream_error", "upstream_failed")
    assert error.headers == {"x-should-retry": "false"}
    assert "HTTP 400" in error.message
    assert rig.finished == ["failed"]


# --- the SSE stream --------------------------------------------------------------------------


async def test_a_stream_has_the_openai_shape(rig, upstream):
    lines = await rig.stream(stream_options={"include_usage": True})

    assert all(line.endswith("\n\n") for line in lines)
    assert lines[-1] == "data: [DONE]\n\n"
    payloads = chunks(lines)
    assert len(payloads) == len(lines) - 1  # no keepalive needed here
    first, *middle, last_choice, usage_chunk = payloads
    assert first["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}
    ]
    for chunk in payloads:
        assert (chunk["id"], chunk["object"], chunk["model"]) == (
            "chatcmpl-req-1",
            "chat.completion.chunk",
            "token-killer",
        )
    for chunk in [first, *middle, last_choice]:
        assert chunk["usage"] is None and len(chunk["choices"]) == 1
    for chunk in middle:
        delta = chunk["choices"][0]["delta"]
        # Never reasoning and answer in one chunk; the reasoning under both names.
        assert set(delta) in ({"content"}, {"reasoning_content", "reasoning"})
        assert delta.get("reasoning") == delta.get("reasoning_content")
    assert last_choice["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop", "logprobs": None}
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in middle)
    assert content == ANSWER
    reasoning = "".join(c["choices"][0]["delta"].get("reasoning_content", "") for c in middle)
    assert reasoning.count(STEP) == 4 and reasoning.count("passed") == 4
    kinds = [next(iter(c["choices"][0]["delta"])) for c in middle]
    assert kinds.index("content") > max(i for i, k in enumerate(kinds) if k == "reasoning_content")
    assert usage_chunk["choices"] == []
    prompt, completion_tokens = upstream.served_usage()
    assert (usage_chunk["usage"]["prompt_tokens"], usage_chunk["usage"]["completion_tokens"]) == (
        prompt,
        completion_tokens,
    )
    assert usage_chunk["token_killer"]["threads_kept"] == 2
    assert rig.finished == ["ok"]


async def test_a_stream_without_include_usage_has_no_usage_at_all(rig):
    lines = await rig.stream()
    assert all("usage" not in chunk for chunk in chunks(lines))
    assert chunks(lines)[-1]["choices"][0]["finish_reason"] == "stop"


async def test_hidden_reasoning_is_left_out_of_the_stream(rig):
    lines = await rig.stream(include_reasoning=False)
    assert not any("reasoning_content" in c["choices"][0]["delta"] for c in chunks(lines))
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks(lines)) == ANSWER


async def test_live_tokens_stream_as_reasoning(rig):
    lines = await rig.stream(token_killer={"thinking": {"num_threads": 1, "max_steps": 1, "live_tokens": True}})
    reasoning = "".join(c["choices"][0]["delta"].get("reasoning_content", "") for c in chunks(lines))
    assert f"[thread 1 · step 1] {STEP} [CONTINUE]\n" in reasoning


async def test_a_stream_sends_keepalive_comments_while_nothing_shows(http_session, upstream):
    upstream.latency = 0.15
    rig = Rig(http_session, upstream, stream_keepalive_s=0.05, thinking={"num_threads": 1, "max_steps": 1})
    lines = await rig.stream()
    assert ": keepalive\n\n" in lines
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks(lines)) == ANSWER


async def test_a_stream_that_fails_at_once_is_an_http_error_not_an_event(rig, upstream):
    upstream.add_rule(Rule(model="sim-thinker", fault="400"))
    with pytest.raises(APIError) as caught:
        await rig.stream()
    assert (caught.value.status, caught.value.code) == (502, "upstream_failed")
    assert rig.finished == ["failed"]


async def test_a_stream_that_fails_after_it_started_reports_the_error_in_band(rig, upstream):
    upstream.add_rule(Rule(model="sim-fuser", fault="reset"))  # breaks off after half the answer
    lines = await rig.stream()

    assert lines[-1] == "data: [DONE]\n\n"
    error = chunks(lines)[-1]
    assert set(error) == {"error"}
    assert (error["error"]["type"], error["error"]["code"]) == ("upstream_error", "fusion_failed")
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks(lines)[:-1])
    # What reached us before the break reached the client (aiohttp drops what it had buffered
    # when the connection resets, so at least the first piece, at most the half that was sent).
    assert content and "The fused final".startswith(content)
    assert rig.finished == ["failed"]


async def test_leaving_a_stream_stops_every_upstream_call(rig, upstream):
    upstream.add_rule(Rule(model="sim-counterexample", latency=5))
    upstream.add_rule(Rule(model="sim-thinker", contains="Write step 2", latency=5))
    lines = await rig.serving.stream(rig.prepare(stream=True))
    async for line in lines:
        if "reasoning_content" in line:
            break
    await until(lambda: upstream.in_flight >= 4)  # both threads' critics and their next steps
    await lines.aclose()
    await until(lambda: upstream.in_flight == 0)
    assert rig.finished == ["cancelled"]


# --- errors clients see ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (NothingToFuse("every reasoning thread failed: x"), 502, "upstream_failed"),
        (NothingToFuse("the deadline came", deadline=True), 504, "deadline_exceeded"),
        (NothingToFuse("replica lost", capacity=True), 503, "overloaded"),
        (FusionUnavailable("the fuser could not answer"), 502, "fusion_failed"),
        (FusionBroken("the fuser failed mid-answer", UsageLedger()), 502, "fusion_failed"),
    ],
)
def test_failures_map_to_their_status(rig, exc, status, code):
    error = rig.serving.error_for(exc, "req-9")
    assert (error.status, error.code) == (status, code)
    assert error.message.endswith(str(exc))
    if status == 503:
        assert error.headers == {"Retry-After": "1"}
    else:
        assert error.headers == {"x-should-retry": "false"}


def test_an_unexpected_failure_is_a_500_with_the_request_id_and_no_detail(rig):
    error = rig.serving.error_for(RuntimeError("secret at 10.1.2.3:8000 key sk-abc"), "req-9")
    assert (error.status, error.type, error.code) == (500, "server_error", "internal_error")
    assert "req-9" in error.message
    assert "10.1.2.3" not in error.message and "sk-abc" not in error.message and "secret" not in error.message


def test_an_api_error_passes_through(rig):
    original = APIError(429, "slow down")
    assert rig.serving.error_for(original, "req-9") is original


async def test_a_stream_that_fails_after_a_keepalive_reports_the_error_in_band(http_session, upstream):
    upstream.add_rule(Rule(model="sim-thinker", fault="400", latency=0.2))
    rig = Rig(http_session, upstream, stream_keepalive_s=0.05)

    lines = await rig.stream()

    assert lines[1] == ": keepalive\n\n"  # after the role chunk: the status was already sent
    error = chunks(lines)[-1]
    assert (error["error"]["code"], lines[-1]) == ("upstream_failed", "data: [DONE]\n\n")


async def test_a_streamed_tool_call_arrives_in_pieces_a_client_can_merge(rig):
    lines = await rig.stream(tools=TOOLS, tool_choice="required")
    pieces = [c["choices"][0]["delta"]["tool_calls"] for c in chunks(lines) if "tool_calls" in c["choices"][0]["delta"]]
    calls = {}
    for piece in pieces:
        for call in piece:
            merged = calls.setdefault(call["index"], {"id": None, "name": "", "arguments": ""})
            merged["id"] = merged["id"] or call.get("id")
            merged["name"] += call.get("function", {}).get("name") or ""
            merged["arguments"] += call.get("function", {}).get("arguments") or ""
    [call] = calls.values()
    assert (call["name"], call["arguments"]) == ("lookup", '{"city": "x"}') and call["id"].startswith("call_")
    assert chunks(lines)[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_cache_friendly_prompts_let_the_providers_prefix_cache_serve_more(http_session, upstream):
    upstream.prefix_cache = True
    rig = Rig(http_session, upstream)
    system = {"role": "system", "content": " ".join(f"rule{i}" for i in range(64))}
    cached = {}
    for friendly in (True, False):
        upstream.reset()
        completion = await rig.complete(
            messages=[system, USER], token_killer={"economy": {"cache_friendly_prompts": friendly}}
        )
        cached[friendly] = completion.usage.prompt_tokens_details.cached_tokens
        assert cached[friendly] == upstream.served_cached_tokens()
        assert completion.token_killer["usage_by_role"]["fuser"]["cached_tokens"] == sum(
            r.cached_tokens for r in upstream.records if r.model == "sim-fuser"
        )
    assert cached[True] > cached[False]


async def test_an_answer_still_being_written_at_the_deadline_is_cut(rig, upstream):
    upstream.token_interval = 0.05
    upstream.add_rule(Rule(model="sim-fuser", reply=" ".join(f"w{i}" for i in range(40))))
    started = time.monotonic()

    completion = await rig.complete(deadline_s=0.5)

    assert time.monotonic() - started < 1.5
    assert completion.choices[0].finish_reason == "length"
    assert completion.choices[0].message.content.startswith("w0 w1")
    assert completion.token_killer["fusion"]["reason"] == "deadline"
    assert completion.token_killer["calls_aborted"] == 1
    await until(lambda: upstream.in_flight == 0)
