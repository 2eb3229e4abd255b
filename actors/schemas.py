"""Internal data passed between roles (and, under Ray, between replicas).

The OpenAI wire format lives apart, in `actors/protocol.py`; nothing here is sent to clients as is.
These are plain dataclasses: cheap to build and to pickle across handle calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Literal

from actors.parsing import Vote


@dataclass
class RoleUsage:
    """What the upstreams reported for one role: never estimated."""

    calls: int = 0
    failed_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0


@dataclass
class UsageLedger:
    """Token and call accounting by role; merged as events travel up to the ingress."""

    roles: dict[str, RoleUsage] = field(default_factory=dict)

    def record(self, role: str, prompt_tokens: int, completion_tokens: int, seconds: float) -> None:
        entry = self.roles.setdefault(role, RoleUsage())
        entry.calls += 1
        entry.prompt_tokens += prompt_tokens
        entry.completion_tokens += completion_tokens
        entry.seconds += seconds

    def record_failure(self, role: str, seconds: float) -> None:
        entry = self.roles.setdefault(role, RoleUsage())
        entry.failed_calls += 1
        entry.seconds += seconds

    def merge(self, other: "UsageLedger") -> None:
        for role, usage in other.roles.items():
            entry = self.roles.setdefault(role, RoleUsage())
            entry.calls += usage.calls
            entry.failed_calls += usage.failed_calls
            entry.prompt_tokens += usage.prompt_tokens
            entry.completion_tokens += usage.completion_tokens
            entry.seconds += usage.seconds

    def take(self) -> "UsageLedger":
        """Hand over what was recorded so far and start empty (for per-event deltas)."""
        taken = UsageLedger(self.roles)
        self.roles = {}
        return taken

    def totals(self) -> dict[str, int]:
        return {"calls": self.calls, "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}

    @property
    def prompt_tokens(self) -> int:
        return sum(u.prompt_tokens for u in self.roles.values())

    @property
    def completion_tokens(self) -> int:
        return sum(u.completion_tokens for u in self.roles.values())

    @property
    def calls(self) -> int:
        return sum(u.calls for u in self.roles.values())


@dataclass(frozen=True)
class ChatTurn:
    role: Literal["user", "assistant"]
    content: str


@dataclass(frozen=True)
class Conversation:
    """The client's conversation, reduced to what every role needs.

    `system` gathers the client's system/developer messages; `history` the turns before the
    question; `question` the last user message. Nothing the client said is dropped.
    """

    question: str
    system: str = ""
    history: tuple[ChatTurn, ...] = ()

    def messages(self, role_system: str, final_user: str) -> list[dict[str, str]]:
        """Chat messages for an upstream call: our role prompt, then the client's conversation."""
        system = role_system.strip()
        if self.system:
            system += "\n\nThe user's instructions:\n" + self.system
        return [
            {"role": "system", "content": system},
            *({"role": t.role, "content": t.content} for t in self.history),
            {"role": "user", "content": final_user},
        ]

    def transcript(self) -> str:
        """The question with its earlier turns, as text for roles that judge rather than chat."""
        if not self.history and not self.system:
            return self.question
        lines = [f"[system] {self.system}"] if self.system else []
        lines += [f"[{t.role}] {t.content}" for t in self.history]
        lines.append(f"[user] {self.question}")
        return "\n".join(lines)


class VerdictStatus(str, Enum):
    PASSED = "passed"
    FAILED = "failed"
    UNVALIDATED = "unvalidated"  # the validators could not be reached; the step is kept


@dataclass
class Verdict:
    status: VerdictStatus
    votes: list[Vote] = field(default_factory=list)
    counterexamples: list[str] = field(default_factory=list)
    usage: UsageLedger = field(default_factory=UsageLedger)

    @property
    def failed(self) -> bool:
        return self.status is VerdictStatus.FAILED


@dataclass
class Step:
    index: int  # 0-based position in the thread
    text: str
    complete: bool
    revised: bool = False  # redone once after a failed verdict
    flagged: bool = False  # kept although validation failed
    verdict: Verdict | None = None


@dataclass(frozen=True)
class ThreadJob:
    """Everything a thinker needs to run one thread of one request."""

    request_id: str
    thread_index: int
    conversation: Conversation
    # Wall-clock time (time.time(), comparable across processes) after which no step starts.
    stop_starting_at: float | None = None


@dataclass(frozen=True)
class ValidationJob:
    """One step to check, with what the thread had seen when it wrote it."""

    request_id: str
    conversation: Conversation
    context: str
    step_text: str


@dataclass
class StepEvent:
    """A thread finished a step (accepted, or rejected and about to be redone)."""

    thread_index: int
    step: Step
    rejected: bool
    usage: UsageLedger  # spent since the thread's previous event


@dataclass
class ThreadResult:
    thread_index: int
    steps: list[Step]

    @property
    def conclusion(self) -> str:
        return self.steps[-1].text if self.steps else ""

    def quality(self) -> tuple[int, int, int]:
        """Rank for picking the best thread when fusion fails: finished, unchallenged, longer."""
        finished = int(bool(self.steps) and self.steps[-1].complete)
        challenged = sum(1 for s in self.steps if s.flagged)
        return finished, -challenged, len(self.steps)


@dataclass(frozen=True)
class FusionJob:
    request_id: str
    conversation: Conversation
    threads: tuple[ThreadResult, ...]


@dataclass
class FusionDelta:
    """A piece of the fused answer, or (at the end) the usage the fuser spent."""

    text: str = ""
    usage: UsageLedger | None = None
    fallback_from_thread: int | None = None  # set when fusion failed and a thread answer is used
