"""The thinking of one request against the simulated upstream, without Ray: threads, live steps,
speculation, revise and flag, deadlines, cancellation; and the pipeline that fuses them."""

import asyncio
import json
import time

import pytest

from actors.fusion import Fuser, FusionBroken
from actors.model_client import role_clients
from actors.pipeline import GRACE_S, DeepThinkingRun, NothingToFuse, RunPlan, StageLost
from actors.prompts import load_prompts
from actors.schemas import (
    AnswerSpec,
    Conversation,
    FusionDelta,
    Skipped,
    StepChecked,
    StepDropped,
    StepWritten,
    ThinkingTokens,
    ThinkJob,
    ThinkUpdate,
    ThreadEnded,
    UsageLedger,
    VerdictStatus,
)
from actors.thinking import RequestThinking
from actors.validation import StepValidator, ValidationBatches
from tests.simulated_upstream import Rule
from tests.support import sim_config, until

PROMPTS = load_prompts("en")
QUESTION = "What is 6*7?"
CONVERSATION = Conversation(QUESTION, turns=(("user", QUESTION),), messages=({"role": "user", "content": QUESTION},))
STEP_TEXT = "We reason about the problem carefully."  # the thinker's reply without its marker
REFUTING = "Counterexample: 6*7 is 42, not 41."
PASSED = VerdictStatus.PASSED


class Rig:
    """The roles of one test, wired as the Thinker deployment wires them (without Ray)."""

    def __init__(self, session, upstream, **sections):
        sections.setdefault("thinking", {"num_threads": 1, "max_steps": 2})
        self.upstream = upstream
        self.config = sim_config(upstream.base_url, **sections)
        self.settings = self.config.profile_settings["token-killer"]
        self.clients = role_clients(session, self.config)
        self.validator = StepValidator(PROMPTS, self.clients["counterexample"], self.clients["voter"])
        self.fuser = Fuser(PROMPTS, self.clients["fuser"])

    async def _send(self, jobs):
        return list(await asyncio.gather(*(self.validator.validate(job) for job in jobs)))

    def think(self, job: ThinkJob):
        thinking = RequestThinking(job, PROMPTS, self.clients, None)
        if job.settings.validation.enabled:
            thinking.validate = ValidationBatches(self._send, lambda: thinking.live).validate
        return thinking.updates()

    def job(self, *, stop_at=None, budget=None):
        return ThinkJob("req-1", CONVERSATION, self.settings, stop_at=stop_at, budget_tokens=budget)

    async def run(self, **job):
        """Every update, and every event with its arrival time (time.monotonic())."""
        updates, events = [], []
        async for update in self.think(self.job(**job)):
            updates.append(update)
            events += [(time.monotonic(), event) for event in update.events]
        return updates, events

    def plan(self, *, stop_in=10.0, deadline_in=20.0, answer=AnswerSpec()):
        now = time.time()
        return RunPlan("req-1", CONVERSATION, self.settings, answer, now + deadline_in, now + stop_in, None, False)


def only(events, kind, thread=None):
    return [e for _, e in events if isinstance(e, kind) and (thread is None or _thread(e) == thread)]


def _thread(event):
    return event.result.thread if isinstance(event, ThreadEnded) else event.thread


def usage_of(updates):
    total = UsageLedger()
    for update in updates:
        total.merge(update.usage)
    return total


def calls(upstream, model):
    return [r for r in upstream.records if r.model == model]


# --- threads, steps, verdicts ----------------------------------------------------------------


async def test_every_thread_reports_its_steps_their_verdicts_and_its_end(http_session, upstream):
    rig = Rig(http_session, upstream, thinking={"num_threads": 3, "max_steps": 2})

    updates, events = await rig.run()

    assert updates[-1].final and not any(u.final for u in updates[:-1])
    assert updates[-1].events == []
    for thread in range(3):
        mine = [e for _, e in events if _thread(e) == thread]
        written = [(e.index, e.text, e.revision) for e in mine if isinstance(e, StepWritten)]
        assert written == [(0, STEP_TEXT, False), (1, STEP_TEXT, False)]
        checked = [(e.index, e.verdict.status, e.verdict.unchallenged) for e in mine if isinstance(e, StepChecked)]
        assert checked == [(0, PASSED, True), (1, PASSED, True)]
        assert isinstance(mine[-1], ThreadEnded)
        result = mine[-1].result
        assert (result.error, [s.text for s in result.steps]) == (None, [STEP_TEXT] * 2)
        assert [s.verdict.status for s in result.steps] == [PASSED, PASSED]
    usage = usage_of(updates)
    assert (usage.prompt_tokens, usage.completion_tokens) == upstream.served_usage()
    assert usage.calls == len(upstream.records) == 3 * 2 * 2  # a thinker and a critic call per step


async def test_the_next_step_is_written_while_the_previous_one_is_validated(http_session, upstream):
    upstream.latency = 0.05
    rig = Rig(http_session, upstream, thinking={"num_threads": 1, "max_steps": 3}, economy=False)

    await rig.run()

    thinker = calls(upstream, "sim-thinker")
    first_verdict = min(r.finished for r in calls(upstream, "sim-voter"))
    # Steps 2 and 3 were written, and step 2's validation started, before step 1's verdict
    # existed: validation never waits for an earlier verdict, and thinking never waits for it.
    assert thinker[2].started < first_verdict
    second_step_checks = [r for r in calls(upstream, "sim-counterexample") if r.started > thinker[1].finished]
    assert min(r.started for r in second_step_checks) < first_verdict
    assert len(thinker) == 3  # nothing wasted when every step passes


async def test_a_step_shows_the_moment_it_is_written_before_its_validation_ends(http_session, upstream):
    upstream.add_rule(Rule(model="sim-counterexample", latency=0.3))
    rig = Rig(http_session, upstream, thinking={"num_threads": 1, "max_steps": 1})

    _, events = await rig.run()

    written_at = next(t for t, e in events if isinstance(e, StepWritten))
    checked_at = next(t for t, e in events if isinstance(e, StepChecked))
    [critic] = calls(upstream, "sim-counterexample")
    assert written_at < critic.finished - 0.2  # not held back by its validation
    assert checked_at >= critic.finished


async def test_live_tokens_stream_each_step_as_the_thinker_writes_it(http_session, upstream):
    rig = Rig(http_session, upstream, thinking={"num_threads": 1, "max_steps": 2, "live_tokens": True})

    _, events = await rig.run()

    for index in (0, 1):
        kinds = [
            e for _, e in events if getattr(e, "index", None) == index and isinstance(e, (ThinkingTokens, StepWritten))
        ]
        tokens = [e.text for e in kinds if isinstance(e, ThinkingTokens)]
        assert "".join(tokens) == STEP_TEXT + " [CONTINUE]" and len(tokens) == 7
        assert isinstance(kinds[-1], StepWritten) and kinds[-1].text == STEP_TEXT  # the step after its tokens
    assert all(r.stream for r in calls(upstream, "sim-thinker"))


async def test_a_complete_marker_ends_the_thread(http_session, upstream):
    upstream.add_rule(Rule(model="sim-thinker", reply="It is 42. ANSWER: 42 [COMPLETE]"))
    rig = Rig(http_session, upstream, thinking={"num_threads": 1, "max_steps": 5})

    _, events = await rig.run()

    [ended] = only(events, ThreadEnded)
    assert [(s.text, s.complete) for s in ended.result.steps] == [("It is 42. ANSWER: 42", True)]
    assert len(calls(upstream, "sim-thinker")) == 1  # no speculative step after a complete one


async def test_validation_disabled_makes_no_validator_calls(http_session, upstream):
    rig = Rig(http_session, upstream, validation={"enabled": False})
    _, events = await rig.run()
    assert only(events, StepChecked) == []
    assert [s.verdict for s in only(events, ThreadEnded)[0].result.steps] == [None, None]
    assert {r.model for r in upstream.records} == {"sim-thinker"}


async def test_failing_validators_leave_the_step_unvalidated(http_session, upstream):
    upstream.add_rule(Rule(model="sim-counterexample", fault="400"))
    rig = Rig(http_session, upstream)
    updates, events = await rig.run()
    assert [e.verdict.status for e in only(events, StepChecked)] == [VerdictStatus.UNVALIDATED] * 2
    assert not any(e.revising or e.flagged for e in only(events, StepChecked))
    assert usage_of(updates).roles["counterexample"].failed_calls == 2


async def test_a_thread_whose_thinker_fails_ends_with_the_error_and_the_others_go_on(http_session, upstream):
    upstream.add_rule(Rule(model="sim-thinker", fault="400", times=1))
    rig = Rig(http_session, upstream, thinking={"num_threads": 2, "max_steps": 1})

    _, events = await rig.run()

    results = sorted((e.result for e in only(events, ThreadEnded)), key=lambda r: r.error or "")
    assert [(len(r.steps), r.error) for r in results] == [
        (1, None),
        (0, "thinker upstream: HTTP 400 (invalid_request_error, invalid_request)"),
    ]


# --- failed steps: revise or flag ------------------------------------------------------------


def refute_first_step(upstream, latency=None):
    upstream.add_rule(Rule(model="sim-counterexample", reply=REFUTING, times=1, latency=latency))
    upstream.add_rule(Rule(model="sim-voter", reply="VOTE: COUNTEREXAMPLE", times=1))


async def test_a_failed_step_cancels_the_speculation_and_is_revised_with_the_counterexamples(http_session, upstream):
    refute_first_step(upstream)
    upstream.add_rule(Rule(model="sim-thinker", contains="Write step 2", latency=5.0, times=1))
    rig = Rig(http_session, upstream)
    started = time.monotonic()

    updates, events = await rig.run()

    assert time.monotonic() - started < 2  # the 5 s speculative call was not waited for
    summary = [
        (type(e).__name__, e.index, getattr(e, "revision", False) or getattr(e, "revising", False))
        for _, e in events
        if isinstance(e, (StepWritten, StepChecked, StepDropped))
    ]
    assert summary[:3] == [("StepWritten", 0, False), ("StepChecked", 0, True), ("StepWritten", 0, True)]
    assert sorted(summary[3:]) == [("StepChecked", 0, False), ("StepChecked", 1, False), ("StepWritten", 1, False)]
    [failed] = [e for e in only(events, StepChecked) if e.revising]
    assert failed.verdict.status is VerdictStatus.FAILED and failed.verdict.counterexamples == [REFUTING] * 3
    steps = only(events, ThreadEnded)[0].result.steps
    assert [(s.index, s.revised, s.flagged) for s in steps] == [(0, True, False), (1, False, False)]
    revision = [r for r in calls(upstream, "sim-thinker") if "was challenged" in json.dumps(r.messages)]
    assert len(revision) == 1 and "6*7 is 42, not 41" in revision[0].messages[-1]["content"]
    await until(lambda: upstream.in_flight == 0)
    assert len([r for r in calls(upstream, "sim-thinker") if r.cancelled]) == 1  # the speculative step 2
    usage = usage_of(updates)
    assert (usage.prompt_tokens, usage.completion_tokens) == upstream.served_usage()
    assert usage.roles["thinker"].aborted_calls == 1


async def test_a_speculative_step_already_written_is_dropped_and_its_validation_still_counted(http_session, upstream):
    refute_first_step(upstream, latency=0.3)  # step 2 is written and checked while step 1 is
    rig = Rig(http_session, upstream)

    updates, events = await rig.run()

    [dropped] = only(events, StepDropped)
    assert (dropped.thread, dropped.index, dropped.reason) == (0, 1, "step 1 is being revised")
    written = [(e.index, e.revision) for e in only(events, StepWritten)]
    assert written == [(0, False), (1, False), (0, True), (1, False)]
    assert len(calls(upstream, "sim-counterexample")) == 4  # steps 1, 2 (dropped), 1 revised, 2
    usage = usage_of(updates)
    assert (usage.prompt_tokens, usage.completion_tokens) == upstream.served_usage()


async def test_on_fail_flag_keeps_the_step_and_marks_it(http_session, upstream):
    refute_first_step(upstream)
    rig = Rig(http_session, upstream, validation={"on_fail": "flag"})

    _, events = await rig.run()

    assert [(e.index, e.verdict.status, e.flagged, e.revising) for e in only(events, StepChecked)] == [
        (0, VerdictStatus.FAILED, True, False),
        (1, PASSED, False, False),
    ]
    steps = only(events, ThreadEnded)[0].result.steps
    assert [(s.flagged, s.revised) for s in steps] == [(True, False), (False, False)]
    assert not any("was challenged" in json.dumps(r.messages) for r in upstream.records)


async def test_a_step_is_revised_once_then_flagged(http_session, upstream):
    upstream.add_rule(Rule(model="sim-counterexample", reply=REFUTING))
    upstream.add_rule(Rule(model="sim-voter", reply="VOTE: COUNTEREXAMPLE"))
    rig = Rig(http_session, upstream, thinking={"num_threads": 1, "max_steps": 1})

    _, events = await rig.run()

    assert [(e.revising, e.flagged) for e in only(events, StepChecked)] == [(True, False), (False, True)]
    [step] = only(events, ThreadEnded)[0].result.steps
    assert (step.revised, step.flagged) == (True, True)
    assert len(calls(upstream, "sim-thinker")) == 2


# --- deadline and cancellation ----------------------------------------------------------------


async def test_at_the_deadline_no_new_work_starts_and_every_token_spent_is_reported(http_session, upstream):
    upstream.latency = 0.1
    rig = Rig(http_session, upstream, thinking={"num_threads": 2, "max_steps": 6})
    stop_in = 0.25
    stop_mono, stop_at = time.monotonic() + stop_in, time.time() + stop_in

    updates, events = await rig.run(stop_at=stop_at)

    assert time.monotonic() < stop_mono + 0.5  # stopped, not run to max_steps
    assert updates[-1].final
    assert max(r.started for r in upstream.records) <= stop_mono + 0.05
    skipped = only(events, Skipped)
    assert skipped and {s.reason for s in skipped} == {"deadline"}
    assert all(r.steps for r in (e.result for e in only(events, ThreadEnded)))
    await until(lambda: upstream.in_flight == 0)
    usage = usage_of(updates)
    assert (usage.prompt_tokens, usage.completion_tokens) == upstream.served_usage()
    cut = [r for r in upstream.records if not r.usage_reported]
    assert usage.aborted_calls == len(cut) > 0


async def test_a_job_past_its_deadline_starts_nothing(http_session, upstream):
    rig = Rig(http_session, upstream, thinking={"num_threads": 2, "max_steps": 2})
    updates, events = await rig.run(stop_at=time.time() - 1)
    assert upstream.records == []
    assert sorted(s.what for s in only(events, Skipped)) == ["step 1 of thread 1", "step 1 of thread 2"]
    assert [e.result.steps for e in only(events, ThreadEnded)] == [[], []]
    assert usage_of(updates).calls == 0


async def test_leaving_the_updates_stops_every_upstream_call(http_session, upstream):
    upstream.add_rule(Rule(model="sim-counterexample", latency=5))
    upstream.add_rule(Rule(model="sim-thinker", contains="Write step 2", latency=5))
    rig = Rig(http_session, upstream, thinking={"num_threads": 3, "max_steps": 3})
    updates = rig.think(rig.job()).__aiter__()
    first = await anext(updates)
    assert any(isinstance(e, StepWritten) for e in first.events)
    await until(lambda: upstream.in_flight >= 6)  # critics of step 1 and step 2 of every thread

    started = time.monotonic()
    await updates.aclose()

    assert time.monotonic() - started < 1
    await until(lambda: upstream.in_flight == 0)
    assert all(r.cancelled or r.completed for r in upstream.records)


# --- the pipeline ------------------------------------------------------------------------------


async def collect_run(run):
    return [event async for event in run.events()]


@pytest.mark.parametrize("num_threads", [1, 5])
async def test_the_pipeline_fuses_any_number_of_threads(http_session, upstream, num_threads):
    rig = Rig(http_session, upstream, thinking={"num_threads": num_threads, "max_steps": 1})
    run = DeepThinkingRun(rig.plan(), rig.think, rig.fuser.fuse)

    events = await collect_run(run)

    deltas = [e for e in events if isinstance(e, FusionDelta)]
    assert events[-len(deltas) :] == deltas  # thinking first, then the answer
    assert "".join(d.text for d in deltas) == "The fused final answer is 42."
    [fuser_call] = calls(upstream, "sim-fuser")
    assert f"Thread {num_threads}:" in fuser_call.messages[-1]["content"]
    stats = run.stats
    assert (stats.threads_kept, stats.steps_validated, stats.steps_unchallenged) == (num_threads,) * 3
    assert (stats.steps_failed, stats.steps_revised, stats.steps_flagged, stats.threads_failed) == (0, 0, 0, {})
    assert stats.fusion.mode == "fused" and stats.fusion.final
    assert (stats.usage.prompt_tokens, stats.usage.completion_tokens) == upstream.served_usage()


async def test_the_pipeline_counts_revisions_and_flags(http_session, upstream):
    upstream.add_rule(Rule(model="sim-counterexample", reply=REFUTING))
    upstream.add_rule(Rule(model="sim-voter", reply="VOTE: COUNTEREXAMPLE"))
    rig = Rig(http_session, upstream, thinking={"num_threads": 1, "max_steps": 1})
    run = DeepThinkingRun(rig.plan(), rig.think, rig.fuser.fuse)
    await collect_run(run)
    stats = run.stats
    assert (stats.steps_validated, stats.steps_failed, stats.steps_revised, stats.steps_flagged) == (2, 2, 1, 1)
    assert "(CHALLENGED)" in calls(upstream, "sim-fuser")[0].messages[-1]["content"]


async def test_the_pipeline_fails_only_when_every_thread_fails(http_session, upstream):
    upstream.add_rule(Rule(model="sim-thinker", fault="400"))
    rig = Rig(http_session, upstream, thinking={"num_threads": 3, "max_steps": 2})
    run = DeepThinkingRun(rig.plan(), rig.think, rig.fuser.fuse)

    with pytest.raises(NothingToFuse, match="HTTP 400") as caught:
        await collect_run(run)

    assert not caught.value.deadline and not caught.value.capacity
    assert sorted(run.stats.threads_failed) == [0, 1, 2]
    assert calls(upstream, "sim-fuser") == []


async def test_nothing_to_fuse_because_of_the_deadline_says_so(http_session, upstream):
    rig = Rig(http_session, upstream)
    run = DeepThinkingRun(rig.plan(stop_in=-0.5), rig.think, rig.fuser.fuse)
    with pytest.raises(NothingToFuse) as caught:
        await collect_run(run)
    assert caught.value.deadline and upstream.records == []


async def test_thinking_that_overruns_its_deadline_is_cut(http_session, upstream):
    async def stuck(job):
        await asyncio.Event().wait()
        yield ThinkUpdate([])

    rig = Rig(http_session, upstream)
    run = DeepThinkingRun(rig.plan(stop_in=-GRACE_S), stuck, rig.fuser.fuse)
    with pytest.raises(NothingToFuse) as caught:
        await collect_run(run)
    assert caught.value.deadline
    assert run.stats.thinking_cut and run.stats.usage.roles["thinker"].aborted_calls == 1


def lost_after(*events):
    async def think(job):
        if events:
            yield ThinkUpdate(list(events))
        raise StageLost(ConnectionError("replica died"))

    return think


async def test_a_thinker_lost_midway_fuses_the_steps_that_arrived(http_session, upstream):
    rig = Rig(http_session, upstream)
    think = lost_after(
        StepWritten(0, 0, "kept step"),
        StepWritten(0, 1, "dropped step"),
        StepDropped(0, 1, "step 1 is being revised"),
        StepWritten(1, 0, "other thread"),
    )
    run = DeepThinkingRun(rig.plan(), think, rig.fuser.fuse)

    events = await collect_run(run)

    assert "".join(e.text for e in events if isinstance(e, FusionDelta)) == "The fused final answer is 42."
    task = calls(upstream, "sim-fuser")[0].messages[-1]["content"]
    assert "kept step" in task and "other thread" in task and "dropped step" not in task
    assert run.stats.threads_kept == 2


async def test_a_thinker_lost_before_any_step_is_a_capacity_problem(http_session, upstream):
    rig = Rig(http_session, upstream)
    run = DeepThinkingRun(rig.plan(), lost_after(), rig.fuser.fuse)
    with pytest.raises(NothingToFuse) as caught:
        await collect_run(run)
    assert caught.value.capacity


async def test_a_fuser_lost_before_any_text_answers_with_the_best_thread(http_session, upstream):
    async def lost(job):
        raise StageLost(ConnectionError("replica died"))
        yield  # an async generator

    rig = Rig(http_session, upstream, thinking={"num_threads": 1, "max_steps": 1})
    run = DeepThinkingRun(rig.plan(), rig.think, lost)
    events = await collect_run(run)
    final = events[-1]
    assert (final.text, final.mode, final.reason) == (STEP_TEXT, "best_thread", "fuser unavailable")
    assert run.stats.fusion is final


async def test_a_fuser_lost_after_text_breaks_the_answer(http_session, upstream):
    async def lost(job):
        yield FusionDelta("The")
        raise StageLost(ConnectionError("replica died"))

    rig = Rig(http_session, upstream, thinking={"num_threads": 1, "max_steps": 1})
    run = DeepThinkingRun(rig.plan(), rig.think, lost)
    with pytest.raises(FusionBroken):
        await collect_run(run)


async def test_a_fusion_that_breaks_midway_still_counts_its_call(http_session, upstream):
    upstream.add_rule(Rule(model="sim-fuser", fault="reset"))  # breaks off after half the answer
    rig = Rig(http_session, upstream, thinking={"num_threads": 1, "max_steps": 1})
    run = DeepThinkingRun(rig.plan(), rig.think, rig.fuser.fuse)

    with pytest.raises(FusionBroken):
        await collect_run(run)

    fuser = run.stats.usage.roles.get("fuser")
    assert fuser is not None and fuser.failed_calls == 1
    assert (run.stats.usage.prompt_tokens, run.stats.usage.completion_tokens) == upstream.served_usage()
