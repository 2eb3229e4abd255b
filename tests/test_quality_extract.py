"""bench/quality/extract.py and grade.py: realistic replies, and every generated answer in a few styles."""

from __future__ import annotations

import dataclasses

import pytest

from bench.quality.extract import extract_answer, words_to_number
from bench.quality.grade import is_correct
from bench.quality.problems import NUMBER, WORD, YES_NO, generate

NAMES = ("Ann", "Ben", "Cara", "Dev")

REPLIES = [
    # (reply, compare, expected extraction)
    ("Maya starts with 12, buys 30 more: 12 + 30 = 42.\n\nANSWER: 42", NUMBER, "42"),
    ("12 + 30 = 42\n\n**ANSWER:** **42**", NUMBER, "42"),
    ("### Final answer\n\n**Answer:** 42 marbles.", NUMBER, "42"),
    ("First 3 packs of 12 give 36, then 36 + 5 = 41.\n\nANSWER: 41 stickers (36 + 5)", NUMBER, "41"),
    ("ANSWER:\n  1,234", NUMBER, "1234"),
    ("Now you have your final answer: 1 + 2 * 5 = 15", NUMBER, "15"),
    ("ANSWER: 8.4 km = 8,400 m", NUMBER, "8400"),
    ("The answer is: 17\n\nThis is a decimal conversion of an integer.", NUMBER, "17"),
    ("The total is $1,234.50.", NUMBER, "1234.5"),
    ("8.4 km × 1000 = 8,400 m", NUMBER, "8400"),
    ("So the speed is 21.6 km/h.", NUMBER, "21.6"),
    ("It drops to -4.44 °C.", NUMBER, "-4.44"),
    ("Fahrenheit to Celsius: (24 − 32) × 5/9 = −4.44", NUMBER, "-4.44"),
    ("There are forty-two apples left.", NUMBER, "42"),
    ("The word has three r's.", NUMBER, "3"),
    ("She keeps one pile, so she has 20 left.", NUMBER, "20"),
    ("Counting each letter in turn, the answer is twelve.", NUMBER, "12"),
    ("$\\boxed{17}$", NUMBER, "17"),
    ("In the 2nd step we get 5, and 5 + 2 = 7. The 3rd row checks it.", NUMBER, "7"),
    ("Step 1: 10. Step 2: 15.\nANSWER: <number>\nSo the result is 15.", NUMBER, "15"),
    ("I am not sure how to solve this.", NUMBER, None),
    ("", NUMBER, None),
    ('P is true and Q is false, so "P and not Q" is true.\n\nANSWER: yes', YES_NO, "yes"),
    ("**ANSWER: No.**", YES_NO, "no"),
    ("Since Q is false, the statement is false.", YES_NO, "no"),
    ("Yes, I can do that. Evaluating: R is true, so the whole statement is not true.", YES_NO, "no"),
    ("The statement holds: true.", YES_NO, "yes"),
    ("Let me evaluate the statement step by step.", YES_NO, None),
    ("Ben is taller than Cara and Ann is taller than Ben.\n\nANSWER: Ann", WORD, "Ann"),
    ("ANSWER: **Ann** (taller than Ben and Cara)", WORD, "Ann"),
    ("Cara is shorter than Ben, so the shortest is DEV.", WORD, "Dev"),
    ("The tallest person cannot be determined.", WORD, None),
]


@pytest.mark.parametrize("reply, compare, expected", REPLIES, ids=[r[0][:40] for r in REPLIES])
def test_realistic_replies(reply, compare, expected):
    assert extract_answer(reply, compare, NAMES) == expected


def test_no_reply_at_all_is_no_answer():
    assert extract_answer(None, NUMBER) is None
    assert extract_answer("   \n", YES_NO) is None
    assert extract_answer("ANSWER: Ann", WORD, ()) == "Ann"  # no candidates: the ANSWER line's word
    assert extract_answer("Ann is tallest", WORD, ()) is None


@pytest.mark.parametrize(
    "words, value",
    [
        ("zero", 0),
        ("seven", 7),
        ("nineteen", 19),
        ("forty-two", 42),
        ("ninety nine", 99),
        ("one hundred and five", 105),
        ("two thousand three hundred", 2300),
    ],
)
def test_words_to_number(words, value):
    assert words_to_number(words) == value


SPELLED = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen".split()
)
TENS = {2: "twenty", 3: "thirty", 4: "forty", 5: "fifty", 6: "sixty", 7: "seventy", 8: "eighty", 9: "ninety"}


def spelled(n: int) -> str:
    if n < 20:
        return SPELLED[n]
    tens, units = divmod(n, 10)
    return TENS[tens] + (f"-{SPELLED[units]}" if units else "")


def styles(problem) -> list[str]:
    """The expected answer as replies write it, each after reasoning with distractors of its kind."""
    a = problem.answer
    if problem.compare == NUMBER:
        value = float(a)
        out = [
            f"ANSWER: {a}",
            f"We start from 7 and add 3 twice.\n\n**ANSWER:** {a} units.",
            f"Step 1 gives 10.\nStep 2 gives 12.\nSo the final result is {a}.",
            f"## Result\n> The answer: `{a}`",
        ]
        if value.is_integer() and abs(value) >= 1000:
            out.append(f"Adding up 2 batches: ANSWER: {int(value):,}")
        if value.is_integer() and 0 <= value < 100:
            out.append(f"Counting carefully, the answer is {spelled(int(value))}.")
        return out
    if problem.compare == YES_NO:
        other = "no" if a == "yes" else "yes"
        return [
            f"ANSWER: {a}",
            f"Is it {other}? Let me check.\n\nANSWER: {a.capitalize()}.",
            f"Checking each part... no, wait: the answer is **{a.upper()}**",
        ]
    other = next(c for c in problem.candidates if c != a)
    return [
        f"ANSWER: {a}",
        f"{other} is not it.\n\n**ANSWER:** **{a.upper()}**",
        f"Comparing {other} with the rest, the one asked for is {a}.",
    ]


@pytest.mark.parametrize("problem", generate(150, seed=1), ids=lambda p: p.id)
def test_generated_answers_in_several_styles_are_read_back(problem):
    for reply in styles(problem):
        extracted = extract_answer(reply, problem.compare, problem.candidates)
        assert is_correct(problem, extracted), (reply, extracted, problem.answer)


def test_grading_compares_as_each_problem_says():
    number = next(p for p in generate(20, seed=0) if p.kind == "units" and p.level == 2)
    assert is_correct(number, str(float(number.answer) + number.tolerance / 2))
    assert not is_correct(number, str(float(number.answer) + 2 * number.tolerance + 0.01))
    word = next(p for p in generate(20, seed=0) if p.compare == WORD)
    assert is_correct(word, word.answer.lower()) and not is_correct(word, None)
    exact = dataclasses.replace(word, compare=YES_NO, answer="yes")
    assert is_correct(exact, "yes") and not is_correct(exact, "no")
