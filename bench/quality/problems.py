"""Seeded problems with known answers: arithmetic, units, ordering, truth, counting; levels 1–3.

Nothing is downloaded: every problem is built from a seed, so anyone gets the same set. Problem
`i` of a seed depends only on (seed, i, its kind and level), so a small run asks the first
problems of a larger one. Each problem keeps the structured parameters its answer follows from
(`params`), so the tests can re-derive every answer on their own.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

KINDS = ("arithmetic", "units", "ordering", "truth", "counting")
LEVELS = (1, 2, 3)

# How an extracted answer is compared with the expected one (bench/quality/grade.py).
NUMBER, WORD, YES_NO = "number", "word", "yes_no"

_ANSWER_FORMAT = {
    NUMBER: "ANSWER: <number>",
    WORD: "ANSWER: <name>",
    YES_NO: "ANSWER: yes  or  ANSWER: no",
}


@dataclass(frozen=True)
class Problem:
    id: str
    kind: str
    level: int
    question: str
    answer: str  # canonical: "42", "3.25", "yes", "Cara"
    compare: str  # NUMBER, WORD or YES_NO
    tolerance: float = 0.0  # absolute, for NUMBER
    candidates: tuple[str, ...] = ()  # the names a WORD answer is one of
    params: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def generate(n: int, seed: int = 0, levels: tuple[int, ...] = LEVELS) -> list[Problem]:
    """`n` problems: kinds in turn, and each round of kinds at the next level of `levels`."""
    if not levels or any(level not in LEVELS for level in levels):
        raise ValueError(f"levels must be a non-empty subset of {LEVELS}, not {levels}")
    problems = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        level = levels[(i // len(KINDS)) % len(levels)]
        rng = random.Random(f"bench.quality:{seed}:{i}:{kind}:{level}")
        problem = _GENERATORS[kind](rng, level)
        problems.append(Problem(id=f"s{seed}-{i:03d}-{kind}-L{level}", kind=kind, level=level, **problem))
    return problems


def format_number(value: float) -> str:
    """42.0 -> "42", 3.250 -> "3.25" (no exponent, no thousands separator)."""
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.6f}".rstrip("0").rstrip(".")


def _ask(body: str, compare: str) -> str:
    return f"{body}\n\nEnd your reply with the final answer alone on its own line, as: {_ANSWER_FORMAT[compare]}"


# --- arithmetic: a story of operations on a count -------------------------------------------


_OWNERS = ("Maya", "Omar", "Lena", "Tariq", "Sofia", "Jonas", "Priya", "Kenji")
_ITEMS = ("marbles", "stickers", "books", "stamps", "pencils", "shells")

# Each operation: its sentence (owner, items, *args) and its effect on the count.
_OPERATIONS: dict[str, tuple[str, Callable[..., int]]] = {
    "add": ("Then {owner} buys {0} more {items}.", lambda x, k: x + k),
    "sub": ("Then {owner} gives away {0} {items}.", lambda x, k: x - k),
    "packs": ("Then {owner} buys {0} packs of {1} {items} each.", lambda x, g, s: x + g * s),
    "times": ("Then {owner} trades for enough {items} to have {0} times as many as before.", lambda x, k: x * k),
    "piles": ("Then {owner} splits the {items} into {0} equal piles and keeps only one pile.", lambda x, k: x // k),
    "percent": ("Then {owner} gives away {0}% of the {items}.", lambda x, p: x - x * p // 100),
}
_LEVEL_OPS = {
    1: (2, ("add", "sub")),
    2: (3, ("add", "sub", "packs", "times")),
    3: (5, ("add", "sub", "packs", "times", "piles", "percent")),
}


def _operation_args(rng: random.Random, name: str, x: int, level: int) -> tuple[int, ...] | None:
    """Arguments keeping every intermediate count a positive integer, or None if `name` cannot."""
    big = 10 * level
    if name == "add":
        return (rng.randint(2, big + 5),)
    if name == "sub":
        return (rng.randint(1, max(1, 2 * x // 3)),) if x >= 2 else None
    if name == "packs":
        return (rng.randint(2, 5), rng.randint(3, 12))
    if name == "times":
        return (rng.randint(2, 3),) if x <= 200 else None
    if name == "piles":
        divisors = [k for k in range(2, 7) if x % k == 0]
        return (rng.choice(divisors),) if divisors else None
    if name == "percent":
        shares = [p for p in (10, 20, 25, 50, 75) if x * p % 100 == 0]
        return (rng.choice(shares),) if shares else None
    raise ValueError(name)


def _arithmetic(rng: random.Random, level: int) -> dict[str, Any]:
    owner, items = rng.choice(_OWNERS), rng.choice(_ITEMS)
    steps, allowed = _LEVEL_OPS[level]
    start = rng.randint(5, 20 * level)
    x, operations, sentences = start, [], [f"{owner} has {start} {items}."]
    while len(operations) < steps:
        name = rng.choice(allowed)
        args = _operation_args(rng, name, x, level)
        if args is None:
            continue
        template, effect = _OPERATIONS[name]
        x = effect(x, *args)
        operations.append([name, *args])
        sentences.append(template.format(*args, owner=owner, items=items))
    sentences.append(f"How many {items} does {owner} have now?")
    return {
        "question": _ask(" ".join(sentences), NUMBER),
        "answer": format_number(x),
        "compare": NUMBER,
        "params": {"start": start, "operations": operations},
    }


# --- units: conversions, exact (level 1) or rounded (levels 2 and 3) -----------------------------


# (from unit, to unit, factor): value_in_to = value_in_from * factor
_METRIC = (
    ("kilometres", "metres", 1000),
    ("metres", "centimetres", 100),
    ("centimetres", "millimetres", 10),
    ("kilograms", "grams", 1000),
    ("litres", "millilitres", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("metres", "kilometres", 0.001),
    ("grams", "kilograms", 0.001),
)
_IMPERIAL = (
    ("miles", "kilometres", 1.609344),
    ("kilometres", "miles", 1 / 1.609344),
    ("inches", "centimetres", 2.54),
    ("feet", "metres", 0.3048),
    ("pounds", "kilograms", 0.45359237),
    ("kilograms", "pounds", 1 / 0.45359237),
    ("ounces", "grams", 28.349523125),
    ("US gallons", "litres", 3.785411784),
)
_COMPOUND = (
    ("kilometres per hour", "metres per second", 1 / 3.6),
    ("metres per second", "kilometres per hour", 3.6),
    ("miles per hour", "metres per second", 0.44704),
    ("square metres", "square centimetres", 10000),
)


def _units(rng: random.Random, level: int) -> dict[str, Any]:
    if level == 1:
        source, target, factor = rng.choice(_METRIC)
        value = rng.choice((rng.randint(2, 50), rng.randint(11, 99) / 10))
        exact = value * factor
        return _conversion(
            f"Convert {format_number(value)} {source} to {target}.",
            exact,
            1e-6 * max(1.0, abs(exact)),
            {"value": value, "from": source, "to": target},
        )
    if level == 2:
        source, target, factor = rng.choice(_IMPERIAL)
        value = rng.choice((rng.randint(2, 200), rng.randint(11, 999) / 10))
        return _rounded(
            f"Convert {format_number(value)} {source} to {target}.",
            value * factor,
            {"value": value, "from": source, "to": target},
        )
    shape = rng.choice(("compound", "temperature", "duration"))
    if shape == "compound":
        source, target, factor = rng.choice(_COMPOUND)
        value = rng.randint(3, 150)
        return _rounded(
            f"Convert {value} {source} to {target}.", value * factor, {"value": value, "from": source, "to": target}
        )
    if shape == "temperature":
        if rng.random() < 0.5:
            value = rng.randint(-4, 212)
            return _rounded(
                f"Convert {value} degrees Fahrenheit to degrees Celsius.",
                (value - 32) * 5 / 9,
                {"value": value, "from": "degrees Fahrenheit", "to": "degrees Celsius"},
            )
        value = rng.randint(-20, 100)
        return _rounded(
            f"Convert {value} degrees Celsius to degrees Fahrenheit.",
            value * 9 / 5 + 32,
            {"value": value, "from": "degrees Celsius", "to": "degrees Fahrenheit"},
        )
    hours, minutes, seconds = rng.randint(1, 9), rng.randint(1, 59), rng.randint(1, 59)
    return _conversion(
        f"Convert {hours} hours, {minutes} minutes and {seconds} seconds to seconds.",
        hours * 3600 + minutes * 60 + seconds,
        1e-6,
        {"hours": hours, "minutes": minutes, "seconds": seconds, "to": "seconds"},
    )


def _rounded(body: str, exact: float, params: dict[str, Any]) -> dict[str, Any]:
    # Half a percent: a reply rounding an intermediate step, or using 2.2 lb/kg, is still right.
    return _conversion(f"{body} Round to 2 decimal places.", round(exact, 2), max(0.01, 0.005 * abs(exact)), params)


def _conversion(body: str, answer: float, tolerance: float, params: dict[str, Any]) -> dict[str, Any]:
    return {
        "question": _ask(body, NUMBER),
        "answer": format_number(answer),
        "compare": NUMBER,
        "tolerance": tolerance,
        "params": params,
    }


# --- ordering: who is tallest, from pairwise comparisons -----------------------------------------


_NAMES = ("Ann", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivan", "Kim", "Leo", "Nora")
# (more, less, most, least): "A is taller than B"; "the tallest".
_DIMENSIONS = (
    ("taller", "shorter", "tallest", "shortest"),
    ("older", "younger", "oldest", "youngest"),
    ("faster", "slower", "fastest", "slowest"),
    ("heavier", "lighter", "heaviest", "lightest"),
)
_ORDINALS = ("", "second ", "third ", "fourth ")
_LEVEL_PEOPLE = {1: (3, 0, (1,)), 2: (4, 0, (1, 2)), 3: (5, 2, (2, 3))}  # people, extra clues, ranks asked


def _ordering(rng: random.Random, level: int) -> dict[str, Any]:
    people, extra, ranks = _LEVEL_PEOPLE[level]
    order = rng.sample(_NAMES, people)  # most first (tallest, oldest, …)
    more, less, most, least = rng.choice(_DIMENSIONS)
    # Every adjacent pair is stated (it is what makes the order unique); level 3 adds redundant pairs.
    pairs = [(i, i + 1) for i in range(people - 1)]
    pairs += rng.sample([(i, j) for i, j in itertools.combinations(range(people), 2) if j - i >= 2], extra)
    rng.shuffle(pairs)
    clues = [
        f"{order[i]} is {more} than {order[j]}." if rng.random() < 0.5 else f"{order[j]} is {less} than {order[i]}."
        for i, j in pairs
    ]
    rank, from_top = rng.choice(ranks), rng.random() < 0.5
    answer = order[rank - 1] if from_top else order[-rank]
    question = f"{' '.join(clues)} Who is the {_ORDINALS[rank - 1]}{most if from_top else least}?"
    return {
        "question": _ask(question, WORD),
        "answer": answer,
        "compare": WORD,
        "candidates": tuple(sorted(order)),
        "params": {"order": order, "more": more, "rank": rank, "from_top": from_top},
    }


# --- truth: evaluate a statement (levels 1, 2), count true rows of its truth table (level 3) ---


# Expressions as JSON-able lists: "P" | ["not", e] | ["and" | "or" | "implies", a, b].


def render(expr: Any) -> str:
    """["or", ["and", "P", ["not", "Q"]], "R"] -> "(P and not Q) or R"."""
    if isinstance(expr, str):
        return expr
    if expr[0] == "not":
        return f"not {_operand(expr[1])}"
    left, right = _operand(expr[1]), _operand(expr[2])
    return f"if {left} then {right}" if expr[0] == "implies" else f"{left} {expr[0]} {right}"


def _operand(expr: Any) -> str:
    return render(expr) if isinstance(expr, str) or expr[0] == "not" else f"({render(expr)})"


def evaluate(expr: Any, values: dict[str, bool]) -> bool:
    if isinstance(expr, str):
        return values[expr]
    if expr[0] == "not":
        return not evaluate(expr[1], values)
    a, b = evaluate(expr[1], values), evaluate(expr[2], values)
    return {"and": a and b, "or": a or b, "implies": (not a) or b}[expr[0]]


def _maybe_not(rng: random.Random, expr: Any, chance: float = 0.35) -> Any:
    return ["not", expr] if rng.random() < chance else expr


def _truth(rng: random.Random, level: int) -> dict[str, Any]:
    names = ["P", "Q"] if level == 1 else ["P", "Q", "R"]
    operators = ("and", "or") if level == 1 else ("and", "or", "implies")
    atoms = [_maybe_not(rng, name) for name in rng.sample(names, len(names))]
    expr = [rng.choice(operators), atoms[0], atoms[1]]
    if level > 1:
        inner = _maybe_not(rng, expr, 0.25)
        expr = (
            [rng.choice(operators), inner, atoms[2]] if rng.random() < 0.5 else [rng.choice(operators), atoms[2], inner]
        )
    statement = render(expr)
    if level < 3:
        values = {name: rng.random() < 0.5 for name in names}
        facts = [f"{name} is {'true' if values[name] else 'false'}" for name in names]
        given = f"{', '.join(facts[:-1])} and {facts[-1]}"
        body = f'Suppose {given}. Is the statement "{statement}" true? Answer yes or no.'
        return {
            "question": _ask(body, YES_NO),
            "answer": "yes" if evaluate(expr, values) else "no",
            "compare": YES_NO,
            "params": {"expr": expr, "values": values},
        }
    rows = [dict(zip(names, bits, strict=True)) for bits in itertools.product((True, False), repeat=len(names))]
    true_rows = sum(evaluate(expr, row) for row in rows)
    body = (
        f'Consider the statement "{statement}" over every combination of true and false values of '
        f"{', '.join(names[:-1])} and {names[-1]} ({len(rows)} rows of its truth table). "
        f"In how many rows is the statement true?"
    )
    return {
        "question": _ask(body, NUMBER),
        "answer": str(true_rows),
        "compare": NUMBER,
        "params": {"expr": expr, "variables": names},
    }


# --- counting: letters in a word, an item in a list, letters in a phrase -------------------------


_WORDS = (
    "strawberry",
    "banana",
    "mississippi",
    "bookkeeper",
    "committee",
    "assessment",
    "parallel",
    "raspberry",
    "successful",
    "tomorrow",
    "engineering",
    "necessary",
    "possession",
    "occurrence",
    "millennium",
    "referee",
    "balloon",
    "coffee",
    "letter",
    "address",
    "butterfly",
    "pepper",
    "grammar",
    "cinnamon",
)
_LIST_ITEMS = ("apple", "pear", "plum", "fig", "kiwi", "lime", "peach", "grape")


def _counting(rng: random.Random, level: int) -> dict[str, Any]:
    if level == 1:
        word = rng.choice(_WORDS)
        letter = rng.choice(sorted(set(word)))
        body = f'How many times does the letter "{letter}" appear in the word "{word}"?'
        return _count(body, word.count(letter), {"letter": letter, "text": word})
    if level == 2:
        vocabulary = rng.sample(_LIST_ITEMS, 5)
        items = [rng.choice(vocabulary) for _ in range(rng.randint(8, 12))]
        target = rng.choice(items)
        body = f'How many times does "{target}" appear in this list: {", ".join(items)}?'
        return _count(body, items.count(target), {"item": target, "items": items})
    phrase = " ".join(rng.sample(_WORDS, rng.randint(3, 5)))
    letter = rng.choice(sorted(c for c in set(phrase) if c != " " and phrase.count(c) >= 2))
    body = f'How many times does the letter "{letter}" appear in the text "{phrase}"?'
    return _count(body, phrase.count(letter), {"letter": letter, "text": phrase})


def _count(body: str, count: int, params: dict[str, Any]) -> dict[str, Any]:
    return {"question": _ask(body, NUMBER), "answer": str(count), "compare": NUMBER, "params": params}


_GENERATORS: dict[str, Callable[[random.Random, int], dict[str, Any]]] = {
    "arithmetic": _arithmetic,
    "units": _units,
    "ordering": _ordering,
    "truth": _truth,
    "counting": _counting,
}
