"""Markers and votes as models really write them: both languages, any case, sloppy spacing."""

import pytest

from actors.parsing import Vote, parse_step, parse_vote


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
