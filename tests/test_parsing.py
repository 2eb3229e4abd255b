"""Markers, votes, critics' answers and final answers as models really write them: both
languages, any case, sloppy spacing."""

import pytest

from actors.parsing import Vote, final_answer, found_counterexample, parse_step, parse_vote


@pytest.mark.parametrize(
    ("text", "body", "complete"),
    [
        ("x = 42. [COMPLETE]", "x = 42.", True),
        ("x = 42. [complete]", "x = 42.", True),
        ("x = 42.\n[ Complete ]", "x = 42.", True),
        ("x = 42. **[COMPLETE]**", "x = 42.", True),
        ("x = 42。【完成】", "x = 42。", True),
        ("x = 42。【 完成 】", "x = 42。", True),
        ("First, expand. [CONTINUE]", "First, expand.", False),
        ("First, expand.【继续】", "First, expand.", False),
        ("First, expand. (continue)", "First, expand.", False),
        ("I will write [COMPLETE] at the end... not yet. [CONTINUE]", "I will write  at the end... not yet.", False),
        ("Almost. [CONTINUE] Actually done: [DONE]", "Almost.  Actually done:", True),
        ("No marker at all.", "No marker at all.", False),
        ("", "", False),
        ("The word complete alone is not a marker.", "The word complete alone is not a marker.", False),
    ],
)
def test_parse_step(text, body, complete):
    assert parse_step(text) == (body, complete)


@pytest.mark.parametrize(
    ("text", "vote"),
    [
        ("VOTE: STEP", Vote.STEP),
        ("vote: step - it holds", Vote.STEP),
        ("Vote:STEP", Vote.STEP),
        ("**Vote**: Main thread", Vote.STEP),
        ("VOTE： STEP", Vote.STEP),
        ('Vote - "step"', Vote.STEP),
        ("VOTE: COUNTEREXAMPLE", Vote.COUNTEREXAMPLE),
        ("vote: counter-example, since 6*7=42", Vote.COUNTEREXAMPLE),
        ("Vote: Counter example", Vote.COUNTEREXAMPLE),
        ("投票：主线程", Vote.STEP),
        ("投票: 主线程。理由：正确", Vote.STEP),
        ("投票：反例", Vote.COUNTEREXAMPLE),
        ("投票 ： 反例", Vote.COUNTEREXAMPLE),
        ("Step. The reasoning is fine.", Vote.STEP),
        ("Counterexample wins here.", Vote.COUNTEREXAMPLE),
        ("Verdict: invalid", Vote.COUNTEREXAMPLE),
        ("Verdict: valid", Vote.STEP),
        ("I think the reasoning is correct but vote: counterexample", Vote.COUNTEREXAMPLE),
        ("Hmm, hard to say.", Vote.ABSTAIN),
        ("", Vote.ABSTAIN),
    ],
)
def test_parse_vote(text, vote):
    assert parse_vote(text) is vote


@pytest.mark.parametrize(
    "text",
    [
        "NONE",
        "none",
        "NONE - the step holds.",
        "**NONE**",
        "  None.",
        "Counterexample: none found, the step holds.",
        "Counterexample: NONE",
        "No counterexample.",
        "No counter-examples found.",
        "no errors",
        "No issues with this step.",
        "Nothing found.",
        "无",
        "反例：无",
        "没有反例。",
        "未发现错误",
    ],
)
def test_a_critic_that_found_nothing(text):
    assert found_counterexample(text) is False


@pytest.mark.parametrize(
    "text",
    [
        "Counterexample: the step assumes what it should prove.",
        "6*7 is 42, not 41.",
        "No, the step is wrong: 6*7 = 42.",
        "For x = 0 the division is undefined.",
        # Words that only begin like "none" / "无" / "没有" are not "found nothing".
        "Nonetheless, the step fails for x = 0.",
        "无法成立：x = 0 时除数为零。",
        "没有考虑 x = 0 的情况。",
    ],
)
def test_a_critic_that_raised_something(text):
    assert found_counterexample(text) is True


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("ANSWER: 42", "42"),
        ("so the result is 42. ANSWER: 42 [COMPLETE]", "42"),
        ("We multiply.\nANSWER: 42\n[COMPLETE]", "42"),
        ("Final answer: **Paris**.", "paris"),
        ("final answer:   New    York!", "new york"),
        ("The answer: `x = 3`", "x = 3"),
        ("答案：1,000。", "1000"),
        ("答案: 42【完成】", "42"),
        ("ANSWER: 41\nOn second thought:\nANSWER: 42", "42"),
        ('ANSWER: "yes"', "yes"),
    ],
)
def test_final_answer_is_normalized(text, answer):
    assert final_answer(text) == answer


@pytest.mark.parametrize(
    "text",
    ["We reason about the problem carefully. [CONTINUE]", "", "ANSWER: [COMPLETE]", "Reanswer: 5", "ANSWER 42"],
)
def test_no_final_answer(text):
    assert final_answer(text) is None


def test_final_answers_that_differ_only_in_form_are_equal():
    assert final_answer("ANSWER: 1,000 apples.") == final_answer("answer:  1000   Apples") == "1000 apples"
