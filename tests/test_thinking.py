"""A reasoning thread against the simulated upstream, without Ray: speculation, revise, flag."""

import json

import pytest

from actors.fusion import Fuser
from actors.model_client import role_clients
from actors.pipeline import AllThreadsFailed, DeepThinkingRun
from actors.prompts import load_prompts
from actors.schemas import Conversation, ThreadJob, VerdictStatus
from actors.thinking import ThreadRunner
from actors.validation import StepValidator
from tests.simulated_upstream import Rule
from tests.support import sim_config

PROMPTS = load_prompts("en")
JOB = ThreadJob("req-1", 0, Conversation("What is 6*7?"))


def make_runner(session, upstream, **sections):
    config = sim_config(upstream.base_url, **sections)
    clients = role_clients(session, config)
    validator = StepValidator(config.validation, PROMPTS, clients["counterexample"], clients["voter"])
    runner = ThreadRunner(config, PROMPTS, clients["thinker"], clients["summarizer"], validator.validate)
    return runner, config, clients


async def collect(runner, job=JOB):
    return [event async for event in runner.run(job)]


async def test_the_next_step_is_written_while_the_previous_one_is_validated(http_session, upstream):
    upstream.latency = 0.1
    runner, _, _ = make_runner(http_session, upstream, thinking={"num_threads": 1, "max_steps": 3})

    events = await collect(runner)

    assert [e.step.index for e in events] == [0, 1, 2]
    assert all(e.step.verdict.status is VerdictStatus.PASSED for e in events)
    thinker = [r for r in upstream.records if r.model == "sim-thinker"]
    first_verdict = min(r.finished for r in upstream.records if r.model == "sim-voter")
    # Steps 2 and 3 were written, and step 2 validated, before step 1's verdict existed:
    # validation never waits for an earlier verdict, and thinking never waits for validation.
    assert thinker[2].started < first_verdict
    second_step_checks = [r for r in upstream.records if r.model == "sim-counterexample" and r.started > thinker[1].finished]
    assert min(r.started for r in second_step_checks) < first_verdict
    assert len(thinker) == 3  # nothing wasted when every step passes


async def test_a_failed_step_cancels_the_speculation_and_is_revised_with_the_counterexamples(
    http_session, upstream
):
    upstream.latency = 0.05
    upstream.add_rule(Rule(model="sim-counterexample", reply="Counterexample: 6*7 is 42, not 41.", times=3))
    upstream.add_rule(Rule(model="sim-voter", reply="VOTE: COUNTEREXAMPLE", times=3))
    upstream.add_rule(Rule(model="sim-thinker", contains="Write step 2", latency=1.0, times=1))
    runner, _, _ = make_runner(http_session, upstream, thinking={"num_threads": 1, "max_steps": 2})

    events = await collect(runner)

    assert [(e.step.index, e.rejected) for e in events] == [(0, True), (0, False), (1, False)]
    assert events[1].step.revised and not events[1].step.flagged
    speculative = [r for r in upstream.records if r.model == "sim-thinker" and r.cancelled]
    assert len(speculative) == 1  # the speculative step 2 was aborted upstream
    revision = [r for r in upstream.records if "was challenged" in json.dumps(r.messages)]
    assert len(revision) == 1 and "6*7 is 42, not 41" in json.dumps(revision[0].messages)


async def test_on_fail_flag_keeps_the_step_and_marks_it(http_session, upstream):
    upstream.add_rule(Rule(model="sim-voter", reply="VOTE: COUNTEREXAMPLE", times=3))
    runner, _, _ = make_runner(
        http_session,
        upstream,
        thinking={"num_threads": 1, "max_steps": 2},
        validation={"on_fail": "flag"},
    )

    events = await collect(runner)

    assert [(e.step.index, e.rejected, e.step.flagged) for e in events] == [(0, False, True), (1, False, False)]
    assert not any("was challenged" in json.dumps(r.messages) for r in upstream.records)


async def test_validation_disabled_makes_no_validator_calls(http_session, upstream):
    runner, _, _ = make_runner(
        http_session, upstream, thinking={"num_threads": 1, "max_steps": 2}, validation={"enabled": False}
    )
    events = await collect(runner)
    assert [e.step.verdict for e in events] == [None, None]
    assert {r.model for r in upstream.records} == {"sim-thinker"}


async def test_a_complete_marker_ends_the_thread(http_session, upstream):
    upstream.add_rule(Rule(model="sim-thinker", reply="It is 42. [COMPLETE]"))
    runner, _, _ = make_runner(http_session, upstream, thinking={"num_threads": 1, "max_steps": 5})
    events = await collect(runner)
    assert len(events) == 1 and events[0].step.complete and events[0].step.text == "It is 42."


async def test_failing_validators_leave_the_step_unvalidated(http_session, upstream):
    upstream.add_rule(Rule(model="sim-counterexample", fault="400"))
    runner, _, _ = make_runner(http_session, upstream, thinking={"num_threads": 1, "max_steps": 2})
    events = await collect(runner)
    assert [e.step.verdict.status for e in events] == [VerdictStatus.UNVALIDATED] * 2
    assert not any(e.rejected for e in events)


async def test_usage_of_every_event_sums_to_what_the_upstream_served(http_session, upstream):
    upstream.add_rule(Rule(model="sim-voter", reply="VOTE: COUNTEREXAMPLE", times=3))
    runner, _, _ = make_runner(http_session, upstream, thinking={"num_threads": 1, "max_steps": 3})
    events = await collect(runner)
    prompt = sum(e.usage.prompt_tokens for e in events)
    completion = sum(e.usage.completion_tokens for e in events)
    assert (prompt, completion) == upstream.served_usage()


@pytest.mark.parametrize("num_threads", [1, 5])
async def test_the_pipeline_fuses_any_number_of_threads(http_session, upstream, num_threads):
    runner, config, clients = make_runner(http_session, upstream, thinking={"num_threads": num_threads, "max_steps": 1})
    fuser = Fuser(config.fusion, PROMPTS, clients["fuser"])
    run = DeepThinkingRun("req-1", Conversation("Q?"), num_threads, runner.run, fuser.fuse)

    events = [e async for e in run.events()]

    answer = "".join(getattr(e, "text", "") for e in events)
    assert answer == "The fused final answer is 42."
    fuser_call = next(r for r in upstream.records if r.model == "sim-fuser")
    assert f"Thread {num_threads}:" in fuser_call.messages[-1]["content"]
    assert run.stats.threads_kept == num_threads
    assert (run.stats.usage.prompt_tokens, run.stats.usage.completion_tokens) == upstream.served_usage()


async def test_the_pipeline_fails_only_when_every_thread_fails(http_session, upstream):
    upstream.add_rule(Rule(model="sim-thinker", fault="400"))
    runner, config, clients = make_runner(http_session, upstream)
    fuser = Fuser(config.fusion, PROMPTS, clients["fuser"])
    run = DeepThinkingRun("req-1", Conversation("Q?"), 3, runner.run, fuser.fuse)

    with pytest.raises(AllThreadsFailed, match="HTTP 400"):
        [e async for e in run.events()]
    assert len(run.stats.threads_failed) == 3
