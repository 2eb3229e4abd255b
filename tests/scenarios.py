"""Scripted runs of the whole pipeline: role-aware reply functions for the simulated upstream.

A scenario makes a run take the path a real run would (steps that pass, steps challenged but
kept, steps refuted, threads that agree on an answer), for the benchmark
(`python -m tests.simulated_upstream --scenario NAME`) and for tests
(`SimulatedUpstream(default_reply=scenario_reply(NAME))`).

Roles are told apart by the request's model, `sim-<role>`. Only this contract with the
service's prompts is used:
- a thinker call's last user message contains `Write step N.` (N from 1); a revision request
  also contains `was challenged`;
- a thinker's final step contains `ANSWER: <answer>` and ends with `[COMPLETE]`, other steps
  end with `[CONTINUE]`;
- a critic that finds nothing answers starting with `NONE`; a voter answers `VOTE: STEP` or
  `VOTE: COUNTEREXAMPLE`.

Replies depend only on the role and the prompt, never on call order, so n choices of one call
and n separate calls get the same answers.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from tests.simulated_upstream import message_text

SCENARIOS = ("pass", "challenged-pass", "refute", "agree")

_STEP = re.compile(r"Write step (\d+)\.")

_CRITIC = {
    "pass": "NONE - the step holds.",
    "challenged-pass": "Counterexample: the step may skip a case.",
    "refute": "Counterexample: the step assumes what it should prove.",
    "agree": "NONE - the step holds.",
}
_VOTE_STEP = "VOTE: STEP - it holds."
_VOTE_COUNTER = "VOTE: COUNTEREXAMPLE - refuted."
_SUMMARY = "Summary of the earlier steps."
_FUSED = "The answer is 42."
_OTHER = "Simulated answer."  # a model that is no role of ours


def _last_user_text(request: dict) -> str:
    for message in reversed(request.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            return message_text(message.get("content"))
    return ""


def scenario_reply(name: str, complete_at: int | None = None) -> Callable[[dict], str]:
    """The reply function of scenario `name`. Thinkers answer (and complete) at step
    `complete_at`; None: never, except in `agree`, which answers at step 2 by default."""
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; expected one of {SCENARIOS}")
    if name == "agree":
        complete_at = 2 if complete_at is None else complete_at
        final = "so the result is 42. ANSWER: 42 [COMPLETE]"
    else:
        final = "we work through the problem. ANSWER: 42 [COMPLETE]"
    critic = _CRITIC[name]
    vote = _VOTE_COUNTER if name == "refute" else _VOTE_STEP

    def thinker(request: dict) -> str:
        text = _last_user_text(request)
        match = _STEP.search(text)
        step = int(match.group(1)) if match else 1  # no step number: treated as the first
        label = f"Step {step} (revised)" if "was challenged" in text else f"Step {step}"
        if step == complete_at:
            return f"{label}: {final}"
        return f"{label}: we work through the problem. [CONTINUE]"

    replies: dict[str, Callable[[dict], str]] = {
        "sim-thinker": thinker,
        "sim-counterexample": lambda request: critic,
        "sim-voter": lambda request: vote,
        "sim-summarizer": lambda request: _SUMMARY,
        "sim-fuser": lambda request: _FUSED,
    }

    def reply(request: dict) -> str:
        model = request.get("model")
        role = replies.get(model) if isinstance(model, str) else None
        return role(request) if role is not None else _OTHER

    return reply
