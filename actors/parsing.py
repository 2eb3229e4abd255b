"""Tolerant reading of what models write: step markers and votes, in English or Chinese.

Models add spaces, change case, swap ASCII and full-width brackets and colons, wrap markers in
markdown, or forget them. Parsing never raises: an unreadable vote is an abstention, and a step
without a marker is "not complete yet".
"""

from __future__ import annotations

import re
from enum import StrEnum

_OPEN = r"[\[【(（<]"
_CLOSE = r"[\]】)）>]"
_COMPLETE_WORDS = r"complete|completed|done|final|finished|完成|结束"
_CONTINUE_WORDS = r"continue|continued|next|继续|未完成"
_MARKER = re.compile(
    rf"\**{_OPEN}\s*(?P<word>{_COMPLETE_WORDS}|{_CONTINUE_WORDS})\s*{_CLOSE}\**",
    re.IGNORECASE,
)
_COMPLETE = re.compile(rf"^(?:{_COMPLETE_WORDS})$", re.IGNORECASE)


def parse_step(text: str) -> tuple[str, bool]:
    """Return (step text without markers, whether the step marked itself complete).

    When several markers appear, the last one decides: models often restate the instruction
    ("...then write [CONTINUE]") before their real verdict.
    """
    matches = list(_MARKER.finditer(text))
    if not matches:
        return text.strip(), False
    complete = bool(_COMPLETE.match(matches[-1].group("word").strip()))
    return _MARKER.sub("", text).strip(), complete


class Vote(StrEnum):
    STEP = "step"  # the step survives the counterexamples
    COUNTEREXAMPLE = "counterexample"  # a counterexample refutes the step
    ABSTAIN = "abstain"  # unreadable


_STEP_WORDS = r"main[\s_-]*thread|step|thread|valid|correct|pass(?:es|ed)?|主线程|主线|步骤|正确|通过"
_COUNTER_WORDS = r"counter[\s_-]*examples?|counter|refuted|invalid|incorrect|wrong|fail(?:s|ed)?|反例|错误|驳倒"
_VOTE = re.compile(
    rf"(?:vote|verdict|投票|结论)\**\s*[:：=\-—]?\s*[\"'“”*【\[]*\s*"
    rf"(?:(?P<counter>{_COUNTER_WORDS})|(?P<step>{_STEP_WORDS}))",
    re.IGNORECASE,
)
_LEADING = re.compile(rf"^\W*(?:(?P<counter>{_COUNTER_WORDS})|(?P<step>{_STEP_WORDS}))\b", re.IGNORECASE)


def parse_vote(text: str) -> Vote:
    """Read a voter's answer. An explicit "VOTE: X" wins; else a leading choice word counts."""
    match = _VOTE.search(text)
    if match is None:
        match = _LEADING.search(text.strip())
    if match is None:
        return Vote.ABSTAIN
    return Vote.COUNTEREXAMPLE if match.group("counter") else Vote.STEP


_NO_COUNTEREXAMPLE = re.compile(
    r"^\W*(?:(?:none|no\s+counter[\s_-]*examples?|no\s+(?:errors?|issues?|problems?)|nothing\s+found)\b"
    r"|(?:无|没有|未发现)(?:反例|错误|问题)?(?![\u4e00-\u9fff]))",
    re.IGNORECASE,
)


def found_counterexample(text: str) -> bool:
    """Whether a critic raised something. "NONE" (however decorated) means it found nothing."""
    body = re.sub(r"^\W*(?:counter[\s_-]*example|反例)\s*[:：]\s*", "", text.strip(), flags=re.IGNORECASE)
    return not (_NO_COUNTEREXAMPLE.match(text.strip()) or _NO_COUNTEREXAMPLE.match(body))


_ANSWER = re.compile(r"(?<![A-Za-z])(?:final\s+)?(?:answer|答案)\**\s*[:：]\s*(?P<answer>[^\n]+)", re.IGNORECASE)


def final_answer(text: str) -> str | None:
    """The answer a step states as "ANSWER: ...", normalized for comparison; None if none."""
    matches = list(_ANSWER.finditer(text))
    if not matches:
        return None
    answer = _MARKER.sub("", matches[-1].group("answer"))
    answer = re.sub(r"[*_`\"'“”]", "", answer).strip().rstrip(".。!！").strip()
    answer = re.sub(r"\s+", " ", answer).casefold()
    answer = re.sub(r"(?<=\d),(?=\d{3}\b)", "", answer)  # 1,000 and 1000 are one answer
    return answer or None
