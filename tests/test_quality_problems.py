"""bench/quality/problems.py: every stated answer re-derived here, on its own, from the question.

Arithmetic, units, ordering and counting answers are computed by parsing the question text (so
a question that says something other than what the generator computed fails); truth statements
are parsed from the text by a small parser of this file's own. Nothing here calls the
generator's solver.
"""

from __future__ import annotations

import itertools
import re

import pytest

from bench.quality.problems import KINDS, LEVELS, NUMBER, WORD, YES_NO, generate

PROBLEMS = generate(300, seed=0) + generate(90, seed=7, levels=(3,)) + generate(45, seed=123, levels=(1, 2))


def body(problem) -> str:
    return problem.question.split("\n")[0]


# --- arithmetic ----------------------------------------------------------------------------------


def derive_arithmetic(text: str) -> float:
    sentences = [s.strip() for s in re.split(r"(?<=[.?])\s+", text) if s.strip()]
    start = re.fullmatch(r"(\w+) has (\d+) (\w+)\.", sentences[0])
    assert start, sentences[0]
    count = int(start[2])
    for sentence in sentences[1:-1]:
        if m := re.search(r"buys (\d+) more ", sentence):
            count += int(m[1])
        elif m := re.search(r"gives away (\d+)% of", sentence):
            assert count * int(m[1]) % 100 == 0, sentence
            count -= count * int(m[1]) // 100
        elif m := re.search(r"gives away (\d+) \w+\.$", sentence):
            count -= int(m[1])
        elif m := re.search(r"buys (\d+) packs of (\d+) ", sentence):
            count += int(m[1]) * int(m[2])
        elif m := re.search(r"to have (\d+) times as many", sentence):
            count *= int(m[1])
        elif m := re.search(r"into (\d+) equal piles", sentence):
            assert count % int(m[1]) == 0, f"{count} does not split into {m[1]}: {text}"
            count //= int(m[1])
        else:
            raise AssertionError(f"unparsed sentence: {sentence}")
        assert count > 0, f"count fell to {count}: {text}"
    assert sentences[-1].startswith("How many ")
    return count


# --- units ---------------------------------------------------------------------------------------

# Each unit in an SI base unit (m, g, L, s, m/s, m²); looked up, not taken from the generator.
SI = {
    "kilometres": 1000,
    "metres": 1,
    "centimetres": 0.01,
    "millimetres": 0.001,
    "miles": 1609.344,
    "inches": 0.0254,
    "feet": 0.3048,
    "kilograms": 1000,
    "grams": 1,
    "pounds": 453.59237,
    "ounces": 453.59237 / 16,
    "litres": 1,
    "millilitres": 0.001,
    "US gallons": 231 * 0.0254**3 * 1000,
    "hours": 3600,
    "minutes": 60,
    "seconds": 1,
    "kilometres per hour": 1000 / 3600,
    "metres per second": 1,
    "miles per hour": 1609.344 / 3600,
    "square metres": 1,
    "square centimetres": 0.0001,
}


def derive_units(text: str) -> tuple[float, bool]:
    """(value, whether the question asks for rounding)."""
    rounded = text.endswith("Round to 2 decimal places.")
    if m := re.match(r"Convert (\d+) hours, (\d+) minutes and (\d+) seconds to seconds\.", text):
        return int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3]), rounded
    m = re.match(r"Convert (-?[\d.]+) ([A-Za-z ]+?) to ([A-Za-z ]+?)\.", text)
    assert m, text
    value, source, target = float(m[1]), m[2], m[3]
    if source == "degrees Fahrenheit" and target == "degrees Celsius":
        return (value - 32) / 1.8, rounded
    if source == "degrees Celsius" and target == "degrees Fahrenheit":
        return value * 1.8 + 32, rounded
    return value * SI[source] / SI[target], rounded


# --- ordering ------------------------------------------------------------------------------------

MORE = {"taller", "older", "faster", "heavier"}
LESS = {"shorter", "younger", "slower", "lighter"}
TOP = {"tallest", "oldest", "fastest", "heaviest"}
RANKS = {None: 1, "second": 2, "third": 3, "fourth": 4}


def derive_ordering(text: str) -> tuple[str, set[str]]:
    """Brute force: the one order of the people every clue allows; None if not exactly one."""
    above = []  # (a, b): a has more of the quality than b
    for a, comparative, b in re.findall(r"(\w+) is (\w+) than (\w+)\.", text):
        assert comparative in MORE | LESS, comparative
        above.append((a, b) if comparative in MORE else (b, a))
    people = {name for pair in above for name in pair}
    orders = [
        order
        for order in itertools.permutations(sorted(people))
        if all(order.index(a) < order.index(b) for a, b in above)
    ]
    assert len(orders) == 1, f"{len(orders)} orders fit: {text}"
    m = re.search(r"Who is the (?:(second|third|fourth) )?(\w+)\?", text)
    rank, superlative = RANKS[m[1]], m[2]
    order = orders[0]
    return (order[rank - 1] if superlative in TOP else order[-rank]), people


# --- truth ---------------------------------------------------------------------------------------


def parse_statement(statement: str):
    """English statement -> a function of the variable values. Grammar (operands are a name,
    `not` operand, or a parenthesised statement): 'if' operand 'then' operand | operand [and|or operand]."""
    tokens = re.findall(r"\(|\)|\w+", statement)
    position = 0

    def take(expected=None):
        nonlocal position
        token = tokens[position]
        assert expected is None or token == expected, (expected, token, statement)
        position += 1
        return token

    def operand():
        token = take()
        if token == "not":
            inner = operand()
            return lambda v: not inner(v)
        if token == "(":
            inner = statement_()
            take(")")
            return inner
        assert re.fullmatch(r"[A-Z]", token), token
        return lambda v: v[token]

    def statement_():
        if tokens[position] == "if":
            take("if")
            condition = operand()
            take("then")
            consequence = operand()
            return lambda v: (not condition(v)) or consequence(v)
        left = operand()
        if position < len(tokens) and tokens[position] in ("and", "or"):
            op, right = take(), operand()
            return (lambda v: left(v) and right(v)) if op == "and" else (lambda v: left(v) or right(v))
        return left

    function = statement_()
    assert position == len(tokens), f"left over: {tokens[position:]}"
    return function


def derive_truth(text: str):
    statement = re.search(r'statement "([^"]+)"', text)[1]
    function = parse_statement(statement)
    if text.startswith("Suppose"):
        values = {name: value == "true" for name, value in re.findall(r"\b([A-Z]) is (true|false)", text)}
        return "yes" if function(values) else "no"
    names = re.findall(r"\b([A-Z])\b", text.split("values of")[1].split("(")[0])
    rows = [dict(zip(names, bits, strict=True)) for bits in itertools.product((True, False), repeat=len(names))]
    assert f"({len(rows)} rows" in text
    return sum(function(row) for row in rows)


# --- counting ------------------------------------------------------------------------------------


def derive_counting(text: str) -> int:
    if m := re.search(r'the letter "(\w)" appear in the (?:word|text) "([^"]+)"', text):
        return sum(1 for character in m[2] if character == m[1])
    m = re.search(r'does "(\w+)" appear in this list: ([\w, ]+)\?', text)
    assert m, text
    return sum(1 for item in m[2].split(", ") if item == m[1])


# --- the tests -----------------------------------------------------------------------------------


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.id)
def test_every_stated_answer_is_rederived_independently(problem):
    text = body(problem)
    if problem.kind == "arithmetic":
        assert problem.compare == NUMBER and problem.tolerance == 0
        assert float(problem.answer) == derive_arithmetic(text)
    elif problem.kind == "units":
        value, rounded = derive_units(text)
        assert problem.compare == NUMBER
        # A rounded answer is within half a cent of the exact value; an exact one is exact.
        assert abs(float(problem.answer) - value) <= (0.005 + 1e-9 if rounded else 1e-9 * max(1, abs(value)))
        assert problem.tolerance <= max(0.011, 0.006 * abs(value))
    elif problem.kind == "ordering":
        answer, people = derive_ordering(text)
        assert problem.compare == WORD and problem.answer == answer
        assert set(problem.candidates) == people
    elif problem.kind == "truth":
        expected = derive_truth(text)
        if problem.level < 3:
            assert problem.compare == YES_NO and problem.answer == expected
        else:
            assert problem.compare == NUMBER and int(problem.answer) == expected
    elif problem.kind == "counting":
        count = derive_counting(text)
        assert count >= 1 and int(problem.answer) == count
    else:
        raise AssertionError(problem.kind)


def test_every_question_asks_for_an_answer_line():
    for problem in PROBLEMS:
        last_line = problem.question.splitlines()[-1]
        assert "ANSWER: <" in last_line or "ANSWER: yes" in last_line, problem.question
        assert problem.compare in (NUMBER, WORD, YES_NO) and problem.answer
        assert problem.id.endswith(f"{problem.kind}-L{problem.level}")


def test_same_seed_same_problems_other_seed_other_problems():
    assert generate(30, seed=5) == generate(30, seed=5)
    assert [p.question for p in generate(30, seed=5)] != [p.question for p in generate(30, seed=6)]
    # A smaller run asks the first problems of a larger one.
    assert generate(12, seed=5) == generate(30, seed=5)[:12]


def test_all_kinds_and_levels_appear_and_levels_filter():
    first_round = generate(len(KINDS) * len(LEVELS), seed=0)
    assert {(p.kind, p.level) for p in first_round} == set(itertools.product(KINDS, LEVELS))
    assert len({p.id for p in PROBLEMS}) == len(PROBLEMS)
    assert {p.level for p in generate(20, seed=1, levels=(2,))} == {2}
    assert {p.kind for p in generate(5, seed=1, levels=(1,))} == set(KINDS)
    with pytest.raises(ValueError):
        generate(3, seed=0, levels=(4,))
