"""Internal data passed between roles (and, under Ray, between replicas).

The OpenAI wire format lives apart, in `actors/protocol.py`; nothing here is sent to clients as is.
Plain slotted dataclasses: cheap to build and to pickle across handle calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from actors.config import RunSettings
from actors.parsing import Vote


@dataclass(slots=True)
class RoleUsage:
    """What the upstreams reported for one role: never estimated."""

    calls: int = 0
    failed_calls: int = 0
    # Calls stopped (deadline, speculation, disconnect) before their usage arrived: not billed here.
    aborted_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cost_usd: float = 0.0
    seconds: float = 0.0

    def add(self, other: RoleUsage) -> None:
        self.calls += other.calls
        self.failed_calls += other.failed_calls
        self.aborted_calls += other.aborted_calls
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.cached_tokens += other.cached_tokens
        self.cost_usd += other.cost_usd
        self.seconds += other.seconds


@dataclass(slots=True)
class UsageLedger:
    """Token and call accounting by role; merged as results travel up to the ingress."""

    roles: dict[str, RoleUsage] = field(default_factory=dict)

    def entry(self, role: str) -> RoleUsage:
        entry = self.roles.get(role)
        if entry is None:
            entry = self.roles[role] = RoleUsage()
        return entry

    def record(
        self, role: str, prompt: int, completion: int, cached: int = 0, cost: float = 0.0, seconds: float = 0.0
    ) -> None:
        entry = self.entry(role)
        entry.calls += 1
        entry.prompt_tokens += prompt
        entry.completion_tokens += completion
        entry.cached_tokens += cached
        entry.cost_usd += cost
        entry.seconds += seconds

    def record_failure(self, role: str, seconds: float) -> None:
        entry = self.entry(role)
        entry.failed_calls += 1
        entry.seconds += seconds

    def record_aborted(self, role: str, seconds: float, calls: int = 1) -> None:
        entry = self.entry(role)
        entry.aborted_calls += calls
        entry.seconds += seconds

    def merge(self, other: UsageLedger | None) -> None:
        if other is not None:
            for role, usage in other.roles.items():
                self.entry(role).add(usage)

    def take(self) -> UsageLedger | None:
        """Hand over what was recorded so far and start empty (None when there is nothing)."""
        if not self.roles:
            return None
        taken = UsageLedger(self.roles)
        self.roles = {}
        return taken

    @property
    def prompt_tokens(self) -> int:
        return sum(u.prompt_tokens for u in self.roles.values())

    @property
    def completion_tokens(self) -> int:
        return sum(u.completion_tokens for u in self.roles.values())

    @property
    def cached_tokens(self) -> int:
        return sum(u.cached_tokens for u in self.roles.values())

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def calls(self) -> int:
        return sum(u.calls for u in self.roles.values())

    @property
    def aborted_calls(self) -> int:
        return sum(u.aborted_calls for u in self.roles.values())

    @property
    def cost_usd(self) -> float:
        return sum(u.cost_usd for u in self.roles.values())

    def totals(self) -> dict[str, int]:
        return {"calls": self.calls, "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}


@dataclass(frozen=True, slots=True)
class Conversation:
    """The client's conversation, in the two forms the roles need.

    `messages` is what the client sent (text contents, tool calls and tool results kept), for the
    fuser, which writes the answer the client reads. The reasoning roles see it as text: `system`
    (the client's system/developer messages) and `turns` (every other message in order, as
    (role "user" | "assistant", text)); `question_at` is the index in `turns` of the last user
    message, and `tools` the tools the answer may call, rendered as text.
    """

    question: str
    system: str = ""
    turns: tuple[tuple[str, str], ...] = ()
    question_at: int = 0
    tools: str = ""
    messages: tuple[dict[str, Any], ...] = ()

    @property
    def history(self) -> tuple[tuple[str, str], ...]:
        """Every turn but the question."""
        return self.turns[: self.question_at] + self.turns[self.question_at + 1 :]

    def transcript(self) -> str:
        """The conversation as one text, for judging roles and for size estimates."""
        lines = [f"[system] {self.system}"] if self.system else []
        lines += [f"[{role}] {text}" for role, text in self.turns]
        if self.tools:
            lines.append(self.tools)
        return "\n".join(lines)


class VerdictStatus(StrEnum):
    PASSED = "passed"
    FAILED = "failed"
    UNVALIDATED = "unvalidated"  # the validators could not be reached or answer; the step is kept
    SKIPPED = "skipped"  # not validated: the budget or the deadline left no room


@dataclass(slots=True)
class Verdict:
    status: VerdictStatus
    votes: list[Vote] = field(default_factory=list)
    counterexamples: list[str] = field(default_factory=list)
    usage: UsageLedger | None = None
    # Why the step was not validated (budget, deadline, validator lost, no votes).
    reason: str = ""
    # Every critic found nothing, so no vote was asked (economy: skip_vote_without_counterexample).
    unchallenged: bool = False

    @property
    def failed(self) -> bool:
        return self.status is VerdictStatus.FAILED


@dataclass(slots=True)
class Step:
    index: int  # 0-based position in the thread
    text: str
    complete: bool
    revised: bool = False  # redone once after a failed verdict
    flagged: bool = False  # kept although validation failed
    verdict: Verdict | None = None


@dataclass(frozen=True, slots=True)
class ThinkJob:
    """Every thread of one request: what a Thinker replica needs to run them."""

    request_id: str
    conversation: Conversation
    settings: RunSettings
    # Wall-clock time (time.time(), comparable across processes) at which thinking stops.
    stop_at: float | None = None
    # Tokens thinking may spend (the request's budget less what fusion needs); None: unbounded.
    budget_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class ValidationJob:
    """One step to check, with what the thread had seen when it wrote it."""

    request_id: str
    conversation: Conversation
    settings: RunSettings
    context: str
    step_text: str
    stop_at: float | None = None
    # Tokens the validation may spend (reserved for it by the thread); None: unbounded.
    budget_tokens: int | None = None


# --- what the thinking of one request reports, as it happens ----------------------------------


@dataclass(slots=True)
class StepWritten:
    """A thread wrote a step (speculatively: its validation has just started)."""

    thread: int
    index: int
    text: str
    revision: bool = False


@dataclass(slots=True)
class StepChecked:
    """A step's validation ended (or was skipped); `revising`: it failed and is being redone."""

    thread: int
    index: int
    verdict: Verdict
    revising: bool = False
    flagged: bool = False


@dataclass(slots=True)
class StepDropped:
    """A written step was abandoned: an earlier step failed, or the budget or deadline stopped it."""

    thread: int
    index: int
    reason: str


@dataclass(slots=True)
class ThinkingTokens:
    """Tokens of a step as the thinker writes them (only with `thinking.live_tokens`)."""

    thread: int
    index: int
    text: str


@dataclass(slots=True)
class ThreadResult:
    thread: int
    steps: list[Step]
    error: str | None = None  # the thread failed; steps may still hold what it had written

    @property
    def conclusion(self) -> str:
        return self.steps[-1].text if self.steps else ""

    def quality(self) -> tuple[int, int, int]:
        """Rank for picking the best thread: finished, unchallenged, longer."""
        finished = int(bool(self.steps) and self.steps[-1].complete)
        challenged = sum(1 for s in self.steps if s.flagged)
        return finished, -challenged, len(self.steps)


@dataclass(slots=True)
class ThreadEnded:
    result: ThreadResult


@dataclass(slots=True)
class Skipped:
    """Work not started because the budget or the deadline left no room."""

    what: str  # "thread 3", "step 2 of thread 1", "validation of step 2 of thread 1"
    reason: Literal["budget", "deadline"]


ThinkEvent = StepWritten | StepChecked | StepDropped | ThinkingTokens | ThreadEnded | Skipped


@dataclass(slots=True)
class ThinkUpdate:
    """One message from a Thinker: the events since the last one and the usage they cost."""

    events: list[ThinkEvent]
    usage: UsageLedger | None = None
    final: bool = False  # the thinking of this request is over; nothing follows


# --- fusion ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AnswerSpec:
    """What the client asked of the answer: passed to the fuser's upstream call as is.

    `params` holds the sampling and shaping fields (max_tokens, temperature, stop, response_format,
    tools, tool_choice, logprobs, ...) in their wire form.
    """

    params: dict[str, Any] = field(default_factory=dict)

    @property
    def tools_required(self) -> bool:
        choice = self.params.get("tool_choice")
        return bool(self.params.get("tools")) and (choice == "required" or isinstance(choice, dict))

    @property
    def structured(self) -> bool:
        """The answer must be JSON (response_format) or may be a tool call: only the fuser can."""
        fmt = (self.params.get("response_format") or {}).get("type")
        return fmt in ("json_object", "json_schema") or self.tools_required

    @property
    def constrained(self) -> bool:
        """Anything beyond plain text with the configured limits: needs an upstream call."""
        return bool(self.params)


@dataclass(frozen=True, slots=True)
class FusionJob:
    request_id: str
    conversation: Conversation
    threads: tuple[ThreadResult, ...]
    settings: RunSettings
    answer: AnswerSpec = AnswerSpec()
    deadline: float | None = None  # time.time() at which the answer is cut
    budget_tokens: int | None = None  # what fusion may spend; None: unbounded
    # A non-stream client: a fusion that fails midway can be redone (nothing was sent yet).
    can_restart: bool = False


@dataclass(slots=True)
class FusionDelta:
    """A piece of the answer; the last one carries how fusion ended and what it cost."""

    text: str = ""
    tool_calls: list[dict[str, Any]] | None = None  # wire-form `delta.tool_calls` pieces
    logprobs: list[dict[str, Any]] | None = None  # wire-form `logprobs.content` entries
    finish_reason: str | None = None
    usage: UsageLedger | None = None
    final: bool = False
    # How the answer was made: "fused", "brief" (agreement), "agreed" (no call), "concat",
    # "majority", "best_thread" (fallback), with the thread used and whether it was redone.
    mode: str = ""
    thread: int | None = None
    restarted: bool = False
    reason: str = ""  # why a fallback or a cut happened
