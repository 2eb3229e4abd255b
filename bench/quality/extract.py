"""The final answer of a free-text reply: an `ANSWER:` line wins, else the last answer-like token.

    extract_answer("… so 12 + 30 = 42.\n\n**ANSWER:** 42 apples", "number")  ->  "42"

Within an `ANSWER:` line the FIRST value counts ("ANSWER: Ann (taller than Ben)" is Ann), or the
first after its last "=" ("ANSWER: 12 + 30 = 42"); in free text the LAST one does (reasoning
comes before its conclusion). Numbers come back in the
canonical form of `problems.format_number` ("1,234.50" -> "1234.5"), yes/no as "yes"/"no",
names in the spelling of the candidates. None when nothing answer-like is found.
"""

from __future__ import annotations

import re

from bench.quality.problems import NUMBER, WORD, YES_NO, format_number

# "ANSWER: x", "Final answer: x", "**Answer**: x" (markdown is stripped first); the value may
# also sit alone on the next line.
_ANSWER_LINE = re.compile(r"\banswer\s*(?:is)?\s*[:：]\s*(?P<rest>[^\n]*)(?:\n\s*(?P<next>[^\n]*))?", re.IGNORECASE)

# 1,234,567.89 | 1234.5 | -3 | 25% ; not the "1" of "1st"; thin/no-break spaces as thousands too.
_NUMBER = re.compile(
    r"(?<![\w.])(?P<sign>[-−])?(?P<digits>\d{1,3}(?:[,\u00a0\u202f\u2009]\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)(?!\d|st\b|nd\b|rd\b|th\b)"
)
_SIGN_CONTEXT = re.compile(r"(?:^|[\s(=:\[])$")  # a minus sign is one only after these

_UNITS_WORDS = {
    "zero": 0,
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
    "eleven": 11,
    "twelve": 12,
    "thirteen": 13,
    "fourteen": 14,
    "fifteen": 15,
    "sixteen": 16,
    "seventeen": 17,
    "eighteen": 18,
    "nineteen": 19,
    "twenty": 20,
    "thirty": 30,
    "forty": 40,
    "fifty": 50,
    "sixty": 60,
    "seventy": 70,
    "eighty": 80,
    "ninety": 90,
}
_SCALES = {"hundred": 100, "thousand": 1000}
_NUMBER_WORD = "(?:" + "|".join(sorted([*_UNITS_WORDS, *_SCALES], key=len, reverse=True)) + r")\b"
# "and" joins only after a scale ("one hundred and five"), not two numbers ("two and three").
_WORD_NUMBER = re.compile(
    rf"\b{_NUMBER_WORD}(?:(?:(?:(?<=hundred)|(?<=thousand))\s+and\s+|[\s-]+){_NUMBER_WORD})*", re.IGNORECASE
)
# "the one on the left", "no one": a pronoun, not a number.
_PRONOUN_ONE = re.compile(r"\b(?:the|this|that|which|each|any|no|every|some|another)\s+$", re.IGNORECASE)

_YES_NO = re.compile(r"\b(?P<word>not\s+true|not\s+false|yes|no|true|false|correct|incorrect)\b", re.IGNORECASE)
_YES_WORDS = {"yes", "true", "correct", "not false"}


def extract_answer(reply: str | None, compare: str, candidates: tuple[str, ...] = ()) -> str | None:
    if not reply or not reply.strip():
        return None
    text = _strip_markdown(reply)
    for match in reversed(list(_ANSWER_LINE.finditer(text))):
        for segment in (match["rest"], match["next"]):
            if segment and segment.strip():
                value = _answer_segment(segment, compare, candidates)
                if value is not None:
                    return value
                break  # a non-empty value that is not an answer: try an earlier ANSWER line
    return _find(text, compare, candidates, first=False)


def _answer_segment(segment: str, compare: str, candidates: tuple[str, ...]) -> str | None:
    """ "ANSWER: 12 + 30 = 42" states its result after the last "="; else its first value counts."""
    if "=" in segment:
        value = _find(segment.rsplit("=", 1)[1], compare, candidates, first=True)
        if value is not None:
            return value
    return _find(segment, compare, candidates, first=True)


def _strip_markdown(text: str) -> str:
    text = re.sub(r"\\boxed\{([^{}]*)\}", r"\1", text)
    text = re.sub(r"\\text\{([^{}]*)\}", r"\1", text)
    text = re.sub(r"\\[()\[\]]", " ", text)
    text = re.sub(r"[*`$]|(?<!\w)_+|_+(?!\w)", "", text)
    return re.sub(r"(?m)^\s*(?:#+|>+|[-+]\s)\s*", "", text)


def _find(text: str, compare: str, candidates: tuple[str, ...], first: bool) -> str | None:
    if compare == NUMBER:
        return _number(text, first)
    if compare == YES_NO:
        return _yes_no(text, first)
    if compare == WORD:
        return _name(text, candidates, first)
    raise ValueError(f"unknown comparison {compare!r}")


def _pick(matches: list, first: bool):
    if not matches:
        return None
    return matches[0] if first else matches[-1]


def _number(text: str, first: bool) -> str | None:
    """Numbers in digits; spelled-out ones only where none is written in digits, since a reply
    that computes in digits states its result in digits ("keeps one pile" must not beat "20")."""
    digits = [m for m in _NUMBER.finditer(text) if m["sign"] is None or _SIGN_CONTEXT.search(text[: m.start()])]
    match = _pick(digits, first)
    if match is not None:
        value = float(re.sub(r"[,\u00a0\u202f\u2009]", "", match["digits"]))
        return format_number(-value if match["sign"] else value)
    words = [
        m for m in _WORD_NUMBER.finditer(text) if not (m[0].lower() == "one" and _PRONOUN_ONE.search(text[: m.start()]))
    ]
    match = _pick(words, first)
    return None if match is None else format_number(words_to_number(match[0]))


def words_to_number(words: str) -> int:
    """ "forty-two" -> 42, "one hundred and five" -> 105, "two thousand three hundred" -> 2300."""
    total = current = 0
    for word in re.split(r"[\s-]+", words.lower()):
        if word in _UNITS_WORDS:
            current += _UNITS_WORDS[word]
        elif word == "hundred":
            current = max(current, 1) * 100
        elif word == "thousand":
            total += max(current, 1) * 1000
            current = 0
    return total + current


def _yes_no(text: str, first: bool) -> str | None:
    match = _pick(list(_YES_NO.finditer(text)), first)
    if match is None:
        return None
    return "yes" if re.sub(r"\s+", " ", match["word"].lower()) in _YES_WORDS else "no"


def _name(text: str, candidates: tuple[str, ...], first: bool) -> str | None:
    if not candidates:  # no list to choose from: the first word of an ANSWER line, if any
        word = re.match(r"\s*([A-Za-z][\w'-]*)", text) if first else None
        return word[1] if word else None
    pattern = re.compile(r"\b(" + "|".join(re.escape(c) for c in candidates) + r")\b", re.IGNORECASE)
    match = _pick(list(pattern.finditer(text)), first)
    if match is None:
        return None
    return next(c for c in candidates if c.lower() == match[1].lower())
