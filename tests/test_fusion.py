"""Fusion: the threads merged into the answer the client reads, or a cheaper way to it when the
threads agree, the budget is short, the deadline comes or the fuser fails."""

import json
import time

import pytest

from actors.fusion import (
    MIN_ANSWER_TOKENS,
    Fuser,
    FusionBroken,
    FusionUnavailable,
    agreed_thread,
    majority_thread,
    merge_delta,
    merge_tool_calls,
)
from actors.model_client import role_clients
from actors.prompts import fuser_messages, load_prompts
from actors.schemas import AnswerSpec, Conversation, FusionDelta, FusionJob, Step, ThreadResult, UsageLedger
from tests.simulated_upstream import Rule
from tests.support import sim_config, until

PROMPTS = load_prompts("en")
FUSED = "The fused final answer is 42."  # the fuser's reply: 6 words
QUESTION = "What is 6*7?"
CONVERSATION = Conversation(
    QUESTION,
    system="Be brief.",
    turns=(("user", QUESTION),),
    messages=({"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}),
)
THREADS = (
    ThreadResult(0, [Step(0, "a", False), Step(1, "the answer is 41", False, flagged=True)]),
    ThreadResult(1, [Step(0, "b", False), Step(1, "the answer is 42", True)]),
)
AGREEING = (
    ThreadResult(0, [Step(0, "We multiply six by seven step by step.", False), Step(1, "So ANSWER: 42", False)]),
    ThreadResult(1, [Step(0, "Six sevens are forty-two, as we can check.", False), Step(1, "ANSWER: 42.", True)]),
    ThreadResult(2, [Step(0, "Seven sixes make forty-two in the end.", False), Step(1, "answer: **42**", True)]),
)
JSON_ANSWER = AnswerSpec({"response_format": {"type": "json_object"}})
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
TOOL_ANSWER = AnswerSpec({"tools": TOOLS, "tool_choice": "required"})


def make(session, upstream, **sections):
    config = sim_config(upstream.base_url, **sections)
    return Fuser(PROMPTS, role_clients(session, config)["fuser"]), config.profile_settings["token-killer"]


def fusion_job(settings, threads=THREADS, **fields):
    return FusionJob("req-1", CONVERSATION, threads, settings, **fields)


async def fuse_all(fuser, job):
    return [d async for d in fuser.fuse(job)]


def fuser_calls(upstream):
    return [r for r in upstream.records if r.model == "sim-fuser"]


# --- intelligent fusion ----------------------------------------------------------------------


async def test_intelligent_fusion_streams_and_marks_challenged_steps(http_session, upstream):
    fuser, settings = make(http_session, upstream)
    deltas = await fuse_all(fuser, fusion_job(settings))

    assert [d.text for d in deltas[:-1]] == ["The", " fused", " final", " answer", " is", " 42."]  # token by token
    final = deltas[-1]
    assert (final.final, final.finish_reason, final.mode, final.text) == (True, "stop", "fused", "")
    assert not any(d.final for d in deltas[:-1])
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == upstream.served_usage()
    [call] = upstream.records
    # Cache-friendly layout: the client's conversation first, as sent, then the task.
    assert call.messages[:2] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}]
    task = call.messages[-1]["content"]
    assert "Thread 1:\n- Step 1: a\n- Step 2 (CHALLENGED): the answer is 41" in task
    assert "Thread 2:\n- Step 1: b\n- Step 2: the answer is 42" in task
    assert call.request["max_tokens"] == 64


async def test_classic_prompts_put_the_fuser_instructions_first_with_the_clients_system_text(http_session, upstream):
    fuser, settings = make(http_session, upstream, economy=False)
    await fuse_all(fuser, fusion_job(settings))
    system = upstream.records[0].messages[0]
    assert system["role"] == "system"
    assert system["content"].startswith("You merge several independent lines of reasoning")
    assert system["content"].endswith("The user's instructions:\nBe brief.")


async def test_the_clients_answer_fields_go_to_the_fuser(http_session, upstream):
    fuser, settings = make(http_session, upstream)
    answer = AnswerSpec({"max_tokens": 4, "temperature": 0.2, "stop": ["never"], "seed": 3})
    deltas = await fuse_all(fuser, fusion_job(settings, answer=answer))
    request = upstream.records[0].request
    assert {k: request[k] for k in ("max_tokens", "temperature", "stop", "seed")} == answer.params
    assert "".join(d.text for d in deltas) == "The fused final answer"
    assert deltas[-1].finish_reason == "length"


async def test_the_client_cannot_raise_max_tokens_above_the_configured_one(http_session, upstream):
    fuser, settings = make(http_session, upstream)
    await fuse_all(fuser, fusion_job(settings, answer=AnswerSpec({"max_tokens": 5000})))
    assert upstream.records[0].request["max_tokens"] == 64


async def test_logprobs_are_relayed(http_session, upstream):
    fuser, settings = make(http_session, upstream)
    deltas = await fuse_all(fuser, fusion_job(settings, answer=AnswerSpec({"logprobs": True, "top_logprobs": 1})))
    entries = [e for d in deltas for e in (d.logprobs or [])]
    assert "".join(e["token"] for e in entries) == FUSED


async def test_a_json_answer_comes_from_the_fuser(http_session, upstream):
    fuser, settings = make(http_session, upstream)
    deltas = await fuse_all(fuser, fusion_job(settings, answer=JSON_ANSWER))
    assert json.loads("".join(d.text for d in deltas)) == {"answer": FUSED}
    assert upstream.records[0].request["response_format"] == {"type": "json_object"}


async def test_a_required_tool_call_comes_from_the_fuser(http_session, upstream):
    fuser, settings = make(http_session, upstream)
    deltas = await fuse_all(fuser, fusion_job(settings, answer=TOOL_ANSWER))
    whole = FusionDelta()
    for delta in deltas:
        merge_delta(whole, delta)
    [call] = whole.tool_calls
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"] == {"name": "lookup", "arguments": '{"city": "x"}'}
    assert (whole.text, whole.finish_reason, whole.mode) == ("", "tool_calls", "fused")


# --- strategies without a call ---------------------------------------------------------------


async def test_concat_fusion_makes_no_call(http_session, upstream):
    fuser, settings = make(http_session, upstream, fusion={"strategy": "concat"})
    [delta] = await fuse_all(fuser, fusion_job(settings))
    assert (delta.text, delta.mode, delta.final) == ("[1] the answer is 41\n\n[2] the answer is 42", "concat", True)
    assert upstream.records == [] and delta.usage.calls == 0


async def test_majority_fusion_answers_what_most_threads_concluded(http_session, upstream):
    fuser, settings = make(http_session, upstream, fusion={"strategy": "majority"})
    threads = (
        ThreadResult(0, [Step(0, "ANSWER: 41", True)]),
        ThreadResult(1, [Step(0, "x", False), Step(1, "ANSWER: 42", False)]),
        ThreadResult(2, [Step(0, "answer: 42.", True)]),
    )
    [delta] = await fuse_all(fuser, fusion_job(settings, threads))
    assert (delta.text, delta.mode, delta.thread) == ("answer: 42.", "majority", 2)  # of the 42s, the finished one
    assert upstream.records == []


def test_majority_ties_go_to_the_best_thread():
    threads = [ThreadResult(0, [Step(0, "ANSWER: 1", False)]), ThreadResult(1, [Step(0, "ANSWER: 2", True)])]
    assert majority_thread(threads).thread == 1


async def test_threads_without_steps_are_left_out_and_none_at_all_is_an_error(http_session, upstream):
    fuser, settings = make(http_session, upstream, fusion={"strategy": "concat"})
    [delta] = await fuse_all(fuser, fusion_job(settings, (ThreadResult(0, [], "failed"), THREADS[1])))
    assert delta.text == "the answer is 42"
    with pytest.raises(ValueError):
        await fuse_all(fuser, fusion_job(settings, (ThreadResult(0, [], "failed"),)))


# --- agreement shortcut ----------------------------------------------------------------------


def test_threads_agree_when_every_last_step_states_the_same_answer():
    assert agreed_thread(list(AGREEING)).thread == 1  # the best of them: finished, then longest
    assert agreed_thread(list(THREADS)) is None  # no ANSWER: lines
    assert agreed_thread([AGREEING[0], ThreadResult(3, [Step(0, "ANSWER: 41", True)])]) is None


async def test_agreeing_threads_are_fused_briefly_from_the_conclusion(http_session, upstream):
    prompt_tokens = {}
    for shortcut in ("brief", "off"):
        upstream.reset()
        fuser, settings = make(http_session, upstream, economy={"agreement_shortcut": shortcut})
        deltas = await fuse_all(fuser, fusion_job(settings, AGREEING))
        assert "".join(d.text for d in deltas) == FUSED
        assert deltas[-1].mode == ("brief" if shortcut == "brief" else "fused")
        prompt_tokens[shortcut] = deltas[-1].usage.prompt_tokens
        task = upstream.records[0].messages[-1]["content"]
        if shortcut == "brief":
            assert "all reached this conclusion:\nANSWER: 42." in task and "Thread 1:" not in task
    assert prompt_tokens["brief"] < prompt_tokens["off"]


async def test_agreeing_threads_answer_without_a_call_with_no_call(http_session, upstream):
    fuser, settings = make(http_session, upstream, economy={"agreement_shortcut": "no_call"})
    [delta] = await fuse_all(fuser, fusion_job(settings, AGREEING))
    assert (delta.text, delta.mode, delta.thread, delta.finish_reason) == ("ANSWER: 42.", "agreed", 1, "stop")
    assert upstream.records == []


@pytest.mark.parametrize("answer", [AnswerSpec({"max_tokens": 20}), JSON_ANSWER, TOOL_ANSWER])
async def test_no_call_still_calls_the_fuser_for_a_constrained_answer(http_session, upstream, answer):
    fuser, settings = make(http_session, upstream, economy={"agreement_shortcut": "no_call"})
    deltas = await fuse_all(fuser, fusion_job(settings, AGREEING, answer=answer))
    assert deltas[-1].mode == "brief"
    assert len(upstream.records) == 1


async def test_disagreeing_threads_are_fused_in_full_whatever_the_shortcut(http_session, upstream):
    fuser, settings = make(http_session, upstream, economy={"agreement_shortcut": "no_call"})
    deltas = await fuse_all(fuser, fusion_job(settings))
    assert deltas[-1].mode == "fused" and "Thread 2:" in upstream.records[0].messages[-1]["content"]


# --- budget ----------------------------------------------------------------------------------


def estimates(fuser, threads=THREADS):
    """The fuser's prompt estimates for the full and the brief fusion of `threads`."""
    full = PROMPTS.fuser_task.format(threads=fuser.render_threads(list(threads)))
    best = max(threads, key=ThreadResult.quality)
    brief = PROMPTS.fuser_brief_task.format(conclusion=best.conclusion)
    return tuple(
        fuser.client.estimate_prompt(fuser_messages(PROMPTS, CONVERSATION, task, cache_friendly=True))
        for task in (full, brief)
    )


LONG_THREADS = tuple(
    ThreadResult(i, [Step(0, "a long first step " * 10, False), Step(1, f"conclusion {i}", i == 1)]) for i in range(2)
)


async def test_a_budget_bounds_the_fusers_answer(http_session, upstream):
    fuser, settings = make(http_session, upstream)
    full, _ = estimates(fuser, LONG_THREADS)
    deltas = await fuse_all(fuser, fusion_job(settings, LONG_THREADS, budget_tokens=full + 20))
    assert deltas[-1].mode == "fused"
    assert upstream.records[0].request["max_tokens"] == 20
    assert deltas[-1].usage.total_tokens <= full + 20


async def test_a_budget_too_small_for_the_full_fusion_fuses_briefly(http_session, upstream):
    fuser, settings = make(http_session, upstream)
    full, brief = estimates(fuser, LONG_THREADS)
    assert brief + MIN_ANSWER_TOKENS < full + MIN_ANSWER_TOKENS - 1
    budget = full + MIN_ANSWER_TOKENS - 1
    deltas = await fuse_all(fuser, fusion_job(settings, LONG_THREADS, budget_tokens=budget))
    assert deltas[-1].mode == "brief"
    assert upstream.records[0].request["max_tokens"] == min(64, budget - brief)
    assert "conclusion 1" in upstream.records[0].messages[-1]["content"]  # the best thread's


async def test_a_budget_too_small_for_any_fusion_answers_with_the_best_thread(http_session, upstream):
    fuser, settings = make(http_session, upstream)
    _, brief = estimates(fuser, LONG_THREADS)
    [delta] = await fuse_all(fuser, fusion_job(settings, LONG_THREADS, budget_tokens=brief + MIN_ANSWER_TOKENS - 1))
    assert (delta.text, delta.mode, delta.thread, delta.reason) == ("conclusion 1", "best_thread", 1, "budget")
    assert upstream.records == []


async def test_a_structured_answer_that_the_budget_cannot_pay_for_is_unavailable(http_session, upstream):
    fuser, settings = make(http_session, upstream)
    with pytest.raises(FusionUnavailable):
        await fuse_all(fuser, fusion_job(settings, budget_tokens=10, answer=JSON_ANSWER))
    assert upstream.records == []


# --- failures and deadlines ------------------------------------------------------------------


async def test_a_fuser_that_fails_before_any_text_falls_back_to_the_best_thread(http_session, upstream):
    upstream.add_rule(Rule(model="sim-fuser", fault="400"))
    fuser, settings = make(http_session, upstream)
    [delta] = await fuse_all(fuser, fusion_job(settings))
    assert (delta.text, delta.mode, delta.thread, delta.final) == ("the answer is 42", "best_thread", 1, True)
    assert "HTTP 400" in delta.reason
    assert delta.usage.roles["fuser"].failed_calls == 1


@pytest.mark.parametrize("answer", [JSON_ANSWER, TOOL_ANSWER])
async def test_a_structured_answer_cannot_fall_back_to_a_thread(http_session, upstream, answer):
    upstream.add_rule(Rule(model="sim-fuser", fault="400"))
    fuser, settings = make(http_session, upstream)
    with pytest.raises(FusionUnavailable):
        await fuse_all(fuser, fusion_job(settings, answer=answer))


async def test_a_fuser_that_breaks_midway_raises_with_its_usage(http_session, upstream):
    upstream.add_rule(Rule(model="sim-fuser", fault="reset"))
    fuser, settings = make(http_session, upstream)
    texts = []
    with pytest.raises(FusionBroken) as caught:
        async for delta in fuser.fuse(fusion_job(settings)):
            texts.append(delta.text)
    assert "".join(texts) == "The fused final"
    assert caught.value.usage.roles["fuser"].failed_calls == 1


async def test_the_answer_is_cut_at_the_deadline(http_session, upstream):
    upstream.token_interval = 0.05
    upstream.add_rule(Rule(model="sim-fuser", reply=" ".join(f"w{i}" for i in range(40))))
    fuser, settings = make(http_session, upstream)
    started = time.monotonic()

    deltas = await fuse_all(fuser, fusion_job(settings, deadline=time.time() + 0.25))

    assert time.monotonic() - started < 1
    final = deltas[-1]
    assert (final.finish_reason, final.mode, final.reason) == ("length", "fused", "deadline")
    assert 0 < len([d for d in deltas if d.text]) < 40
    assert final.usage.roles["fuser"].aborted_calls == 1
    await until(lambda: upstream.in_flight == 0)


async def test_the_cut_holds_when_the_wall_clock_lags_the_loop_clock(http_session, upstream, monkeypatch):
    # The deadline is wall-clock time; asyncio's timers run on the monotonic clock. When the wall
    # clock runs a little slow against it, the timer that fires is still the deadline's cut.
    upstream.token_interval = 0.05
    upstream.add_rule(Rule(model="sim-fuser", reply=" ".join(f"w{i}" for i in range(40))))
    fuser, settings = make(http_session, upstream)
    job = fusion_job(settings, deadline=time.time() + 0.25)
    real_time, start = time.time, time.time()
    monkeypatch.setattr("actors.fusion.time.time", lambda: start + (real_time() - start) * 0.9)

    deltas = await fuse_all(fuser, job)

    final = deltas[-1]
    assert (final.finish_reason, final.mode, final.reason) == ("length", "fused", "deadline")
    await until(lambda: upstream.in_flight == 0)


async def test_a_deadline_before_any_text_answers_with_the_best_thread(http_session, upstream):
    upstream.add_rule(Rule(model="sim-fuser", latency=2))
    fuser, settings = make(http_session, upstream)
    [delta] = await fuse_all(fuser, fusion_job(settings, deadline=time.time() + 0.1))
    assert (delta.text, delta.mode, delta.reason) == ("the answer is 42", "best_thread", "deadline")
    await until(lambda: upstream.in_flight == 0)


async def test_leaving_the_fusion_early_aborts_the_fuser_call(http_session, upstream):
    upstream.token_interval = 0.05
    upstream.add_rule(Rule(model="sim-fuser", reply=" ".join(f"w{i}" for i in range(40))))
    fuser, settings = make(http_session, upstream)
    deltas = fuser.fuse(fusion_job(settings))
    await anext(deltas)
    await deltas.aclose()
    await until(lambda: upstream.in_flight == 0)
    assert upstream.records[0].cancelled


# --- the whole answer ------------------------------------------------------------------------


async def test_answer_returns_the_whole_answer_in_one_delta(http_session, upstream):
    fuser, settings = make(http_session, upstream)
    whole = await fuser.answer(fusion_job(settings))
    assert (whole.text, whole.finish_reason, whole.mode, whole.final, whole.restarted) == (
        FUSED,
        "stop",
        "fused",
        True,
        False,
    )
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == upstream.served_usage()


async def test_answer_restarts_once_when_the_fuser_breaks_midway(http_session, upstream):
    upstream.add_rule(Rule(model="sim-fuser", fault="reset", times=1))
    fuser, settings = make(http_session, upstream)

    whole = await fuser.answer(fusion_job(settings, can_restart=True))

    assert (whole.text, whole.mode, whole.restarted) == (FUSED, "fused", True)  # nothing twice
    assert len(fuser_calls(upstream)) == 2
    assert (whole.usage.roles["fuser"].calls, whole.usage.roles["fuser"].failed_calls) == (1, 1)
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == upstream.served_usage()


async def test_answer_falls_back_to_the_best_thread_when_the_restart_breaks_too(http_session, upstream):
    upstream.add_rule(Rule(model="sim-fuser", fault="reset"))
    fuser, settings = make(http_session, upstream)
    whole = await fuser.answer(fusion_job(settings, can_restart=True))
    assert (whole.text, whole.mode, whole.thread, whole.restarted) == ("the answer is 42", "best_thread", 1, True)
    assert len(fuser_calls(upstream)) == 2
    assert whole.usage.roles["fuser"].failed_calls == 2


async def test_answer_without_restart_falls_back_at_once(http_session, upstream):
    upstream.add_rule(Rule(model="sim-fuser", fault="reset"))
    fuser, settings = make(http_session, upstream)
    whole = await fuser.answer(fusion_job(settings, can_restart=False))
    assert (whole.mode, whole.restarted) == ("best_thread", False)
    assert len(fuser_calls(upstream)) == 1


async def test_a_structured_answer_that_breaks_twice_is_unavailable(http_session, upstream):
    upstream.add_rule(Rule(model="sim-fuser", fault="reset", reply="one two three four"))
    fuser, settings = make(http_session, upstream)
    with pytest.raises(FusionUnavailable):
        await fuser.answer(fusion_job(settings, can_restart=True, answer=JSON_ANSWER))


# --- merging pieces --------------------------------------------------------------------------


def test_merge_tool_calls_joins_pieces_by_index():
    pieces = [
        [{"index": 0, "id": "call_a", "type": "function", "function": {"name": "f", "arguments": ""}}],
        [
            {"index": 0, "function": {"arguments": '{"x": '}},
            {"index": 1, "id": "call_b", "type": "function", "function": {"name": "g", "arguments": "{}"}},
        ],
        [{"index": 0, "function": {"arguments": "1}"}}],
    ]
    calls = []
    for piece in pieces:
        calls = merge_tool_calls(calls, piece)
    assert calls == [
        {"index": 0, "id": "call_a", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
        {"index": 1, "id": "call_b", "type": "function", "function": {"name": "g", "arguments": "{}"}},
    ]


def test_merge_tool_calls_does_not_change_its_input():
    first = [{"index": 0, "id": "c", "type": "function", "function": {"name": "f", "arguments": "{"}}]
    merge_tool_calls(first, [{"index": 0, "function": {"arguments": "}"}}])
    assert first[0]["function"]["arguments"] == "{"


def test_merge_delta_keeps_text_logprobs_and_the_final_fields():
    whole = FusionDelta()
    merge_delta(whole, FusionDelta("a", logprobs=[{"token": "a"}]))
    usage = UsageLedger()
    merge_delta(
        whole, FusionDelta("b", logprobs=[{"token": "b"}], finish_reason="stop", usage=usage, final=True, mode="fused")
    )
    assert (whole.text, whole.logprobs, whole.finish_reason, whole.final, whole.mode) == (
        "ab",
        [{"token": "a"}, {"token": "b"}],
        "stop",
        True,
        "fused",
    )
    assert whole.usage is usage
