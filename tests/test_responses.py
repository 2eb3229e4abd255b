"""The Responses API (`POST /v1/responses`) through real clients no one here wrote: the openai
SDK (`responses.create`, `.stream`, `.parse`, a function-tool round trip), the OpenAI Agents SDK,
and Codex CLI (`codex exec`), against the real Ray Serve app on the simulated upstream."""

import asyncio
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import openai
import pytest
from pydantic import BaseModel

from tests.conftest import SERVICE_KEY
from tests.simulated_upstream import Rule

pytestmark = pytest.mark.serve

MODEL = "token-killer"
QUESTION = "What is six times seven?"
ANSWER = "The fused final answer is 42."
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}
CALL_WEATHER = Rule(model="sim-fuser", tool_call={"name": "get_weather", "arguments": {"city": "Paris"}}, times=1)


def fuser_calls(sim):
    return [r for r in sim.records if r.model == "sim-fuser"]


def test_create_answers_with_reasoning_then_the_message_and_exact_usage(client, sim):
    response = client.responses.create(model=MODEL, input=QUESTION, reasoning={"summary": "auto"})

    assert (response.object, response.status, response.model) == ("response", "completed", MODEL)
    reasoning, message = response.output
    assert reasoning.type == "reasoning"
    [summary] = reasoning.summary
    assert summary.text.count("We reason about the problem carefully.") == 6  # 3 threads x 2 steps
    assert "[thread 1 · step 1 · passed" in summary.text
    assert (message.type, message.role, message.status) == ("message", "assistant", "completed")
    assert response.output_text == ANSWER
    prompt = sum(r.prompt_tokens for r in sim.records)
    completion = sum(r.completion_tokens for r in sim.records)
    usage = response.usage
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (prompt, completion, prompt + completion)
    answer_tokens = sum(r.completion_tokens for r in fuser_calls(sim))
    assert usage.output_tokens_details.reasoning_tokens == completion - answer_tokens
    assert usage.input_tokens_details.cached_tokens == 0
    extension = response.model_extra["token_killer"]
    assert extension["threads_kept"] == 3 and extension["tools_not_shown"] == []


def test_stream_sends_the_responses_events_in_order(client, sim):
    with client.responses.stream(model=MODEL, input=QUESTION, reasoning={"summary": "auto"}) as stream:
        events = list(stream)
        final = stream.get_final_response()

    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.reasoning_summary_part.added",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert kinds[-1] == "response.completed"
    summary = "".join(e.delta for e in events if e.type == "response.reasoning_summary_text.delta")
    answer = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert answer == final.output_text == ANSWER
    assert summary == final.output[0].summary[0].text and "[thread 3 · step 2]" in summary
    assert kinds.index("response.output_text.delta") > max(
        i for i, k in enumerate(kinds) if k == "response.reasoning_summary_text.delta"
    )
    for done in ("response.reasoning_summary_text.done", "response.output_text.done", "response.content_part.done"):
        assert kinds.count(done) == 1
    assert kinds.count("response.output_item.added") == kinds.count("response.output_item.done") == 2
    assert final.usage.input_tokens == sum(r.prompt_tokens for r in sim.records)
    assert final.model_extra["token_killer"]["fusion"]["mode"] == "fused"


def test_the_first_reasoning_summary_arrives_within_one_upstream_call(client, sim):
    latency = 0.3
    client.responses.create(model=MODEL, input=QUESTION)  # a warm service, as a user meets it
    sim.reset()
    sim.latency = latency
    started = time.monotonic()
    arrivals = []
    for event in client.responses.create(model=MODEL, input=QUESTION, stream=True, reasoning={"summary": "auto"}):
        arrivals.append((time.monotonic() - started, event))

    first_at, first = next((t, e) for t, e in arrivals if e.type == "response.reasoning_summary_text.delta")
    print(f"first reasoning summary delta after {first_at:.3f} s (one upstream call: {latency} s)")
    # One thinker call, not its validation (two more calls deep): the step as written.
    assert first_at < latency + 0.1
    assert first.delta.startswith("[thread ") and "· passed" not in first.delta
    assert arrivals[-1][1].type == "response.completed"


def test_parse_gives_the_typed_answer(client, sim):
    class Verdict(BaseModel):
        answer: str
        confident: bool

    response = client.responses.parse(model=MODEL, input=QUESTION, text_format=Verdict)

    assert isinstance(response.output_parsed, Verdict)
    [call] = fuser_calls(sim)
    assert call.request["response_format"]["type"] == "json_schema"
    assert call.request["response_format"]["json_schema"]["name"] == "Verdict"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_function_tool_round_trip(client, sim, stream):
    sim.add_rule(CALL_WEATHER)
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    if stream:
        with client.responses.stream(model=MODEL, input=question, tools=[WEATHER]) as events:
            kinds = [e.type for e in events]
            first = events.get_final_response()
        assert "response.function_call_arguments.delta" in kinds
        assert "response.function_call_arguments.done" in kinds
    else:
        first = client.responses.create(model=MODEL, input=question, tools=[WEATHER])

    [call] = [item for item in first.output if item.type == "function_call"]
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Paris"})
    assert not [item for item in first.output if item.type == "message"]
    assert fuser_calls(sim)[0].request["tools"] == [
        {"type": "function", "function": {k: WEATHER[k] for k in ("name", "description", "parameters", "strict")}}
    ]
    # The client runs the tool and sends everything back, as the docs show: the output items
    # as they came (reasoning included), then the call's output.
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}
    second = client.responses.create(model=MODEL, input=[*question, *first.output, result], tools=[WEATHER])

    assert second.output_text == ANSWER
    messages = fuser_calls(sim)[-1].messages
    assert {"role": "tool", "content": "sunny, 21 C", "tool_call_id": call.call_id} in messages
    [asked] = [m for m in messages if m.get("tool_calls")]
    assert asked["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": call.arguments}


def test_tools_it_cannot_run_are_not_shown_and_are_listed(client, sim):
    tools = [{"type": "web_search"}, {"type": "namespace", "name": "agents", "description": "d", "tools": []}, WEATHER]
    response = client.responses.create(model=MODEL, input=QUESTION, tools=tools, tool_choice="auto")

    assert response.output_text == ANSWER
    assert response.model_extra["token_killer"]["tools_not_shown"] == [
        {"type": "web_search"},
        {"type": "namespace", "name": "agents"},
    ]
    assert [t["function"]["name"] for t in fuser_calls(sim)[0].request["tools"]] == ["get_weather"]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"store": True}, "store"),
        ({"background": True}, "background"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"text": {"verbosity": "low"}}, "text.verbosity"),
        ({"tool_choice": {"type": "web_search"}}, "tool_choice"),
    ],
)
def test_what_needs_stored_state_or_cannot_be_run_is_refused_by_name(client, sim, fields, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=MODEL, input=QUESTION, **fields)
    assert caught.value.body["param"] == param
    assert sim.records == []


def test_a_stored_response_cannot_be_fetched(client):
    with pytest.raises(openai.NotFoundError, match="stateless"):
        client.responses.retrieve("resp_123")


def test_a_stream_that_fails_after_it_began_ends_with_response_failed(client, sim):
    sim.add_rule(Rule(model="sim-fuser", fault="reset"))  # breaks off after half the answer

    events = list(client.responses.create(model=MODEL, input=QUESTION, stream=True))

    assert events[0].type == "response.created"
    failed = events[-1]
    assert failed.type == "response.failed"
    assert (failed.response.status, failed.response.error.code) == ("failed", "fusion_failed")
    assert any(e.type == "response.reasoning_summary_text.delta" for e in events)
    assert not any(e.type == "response.completed" for e in events)


def test_threads_that_fail_at_once_are_a_real_502(client, sim):
    sim.add_rule(Rule(model="sim-thinker", fault="400"))
    with pytest.raises(openai.APIStatusError, match="every reasoning thread failed") as caught:
        list(client.responses.create(model=MODEL, input=QUESTION, stream=True))
    assert caught.value.status_code == 502


# --- the OpenAI Agents SDK ---------------------------------------------------------------------


@pytest.mark.parametrize("streamed", [False, True], ids=["run", "run_streamed"])
def test_an_agents_sdk_run_with_a_function_tool(service, sim, streamed):
    from agents import Agent, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)  # traces would go to OpenAI's servers
    ran = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        ran.append(city)
        return f"sunny in {city}"

    async def run():
        client = openai.AsyncOpenAI(base_url=f"{service}/v1", api_key=SERVICE_KEY, max_retries=0)
        model = OpenAIResponsesModel(model=MODEL, openai_client=client)
        agent = Agent(name="weather", instructions="Answer with the weather.", tools=[get_weather], model=model)
        try:
            if not streamed:
                return await Runner.run(agent, "What is the weather in Paris?")
            result = Runner.run_streamed(agent, "What is the weather in Paris?")
            async for _ in result.stream_events():
                pass
            return result
        finally:
            await client.close()

    sim.add_rule(CALL_WEATHER)
    result = asyncio.run(run())

    assert ran == ["Paris"]
    assert result.final_output == ANSWER
    first, second = fuser_calls(sim)
    assert first.request["tools"][0]["function"]["name"] == "get_weather"
    assert any(m.get("role") == "tool" and m["content"] == "sunny in Paris" for m in second.messages)


# --- Codex CLI ---------------------------------------------------------------------------------

CODEX = "@openai/codex@0.169.0"


def codex_binary() -> Path | None:
    """Codex CLI from npm, installed once into the user's cache (CI installs it the same way);
    None where npm is missing."""
    npm = shutil.which("npm")
    if npm is None:
        return None
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "token-killer" / CODEX.replace("/", "+")
    binary = cache / "node_modules" / ".bin" / "codex"
    if not binary.exists():
        subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--prefix", str(cache), CODEX],
            check=True,
            capture_output=True,
            timeout=600,
        )
    return binary


@pytest.fixture
def codex(service, tmp_path):
    """`codex exec` with a custom provider pointed at the service, HOME in a temporary directory."""
    binary = codex_binary()
    if binary is None:
        pytest.skip("npm is not installed")
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "CODEX_HOME": str(home), "TK_CODEX_KEY": SERVICE_KEY}
    provider = "model_providers.tokenkiller"
    settings = {
        "model_provider": "tokenkiller",
        f"{provider}.name": '"Token Killer"',
        f"{provider}.base_url": f'"{service}/v1"',
        f"{provider}.env_key": '"TK_CODEX_KEY"',
        f"{provider}.wire_api": '"responses"',
    }
    options = [part for key, value in settings.items() for part in ("-c", f"{key}={value}")]

    def run(*args: str) -> subprocess.CompletedProcess:
        command = [str(binary), "exec", *args[:-1], "--skip-git-repo-check", *options, "-m", MODEL, args[-1]]
        done = subprocess.run(
            command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL
        )
        print(f"$ codex exec {' '.join(args)}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}")
        assert done.returncode == 0, done.stderr[-2000:]
        return done

    return run


def test_codex_exec_answers_through_the_service(codex, sim):
    done = codex(QUESTION)

    assert ANSWER in done.stdout
    assert "[thread 1 · step 1]" in done.stderr  # the threads' steps, shown as Codex's reasoning
    # It spoke the Responses API: its function tools reached the fuser (its namespace and
    # web_search tools did not), its question the thinkers.
    [fuser] = fuser_calls(sim)
    names = [t["function"]["name"] for t in fuser.request["tools"]]
    assert "exec_command" in names and all(t["type"] == "function" for t in fuser.request["tools"])
    assert any(QUESTION in json.dumps(r.messages) for r in sim.records if r.model == "sim-thinker")


def test_codex_runs_a_tool_the_answer_calls_and_resumes_the_session(codex, sim):
    """The answer calls Codex's shell tool; Codex runs it and sends its output back; then a
    follow-up in the same session sends the earlier turns back as items."""
    sim.add_rule(Rule(model="sim-fuser", tool_call={"name": "exec_command", "arguments": {"cmd": "echo hi"}}, times=1))

    done = codex("Say hi with the shell.")

    assert ANSWER in done.stdout
    first, second = fuser_calls(sim)
    [asked] = [m for m in second.messages if m.get("tool_calls")]
    call_id = asked["tool_calls"][0]["id"]
    assert asked["tool_calls"][0]["function"]["name"] == "exec_command"
    [result] = [m for m in second.messages if m["role"] == "tool" and m["tool_call_id"] == call_id]
    assert "hi" in result["content"]  # what `echo hi` printed on this machine

    codex("resume", "--last", "And once more?")

    latest = fuser_calls(sim)[-1].messages
    earlier = latest.index({"role": "assistant", "content": ANSWER})  # its earlier answer, sent back
    assert latest.index({"role": "user", "content": "And once more?"}) > earlier
