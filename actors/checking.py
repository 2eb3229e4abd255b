"""Checking a request: from what a client asked, in any wire format, to the plan of its run.

Each wire format (`actors/serving_chat.py`, `actors/serving_responses.py`) parses its own body
and hands over an `Ask`: the conversation as chat messages, the answer-shaping fields in the
fuser's wire form, and the service's extensions. Everything that can fail fast fails here, before
any upstream call: the profile, the limits, the overrides, the budget. No wire format, no Ray.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from actors.config import LimitsConfig, RunSettings, ServiceConfig, SettingsError, merge_settings, request_settings
from actors.fusion import MIN_ANSWER_TOKENS
from actors.model_client import DEFAULT_TOKENS_PER_CHAR, prompt_chars
from actors.pipeline import RunPlan
from actors.prompts import PromptSet, fuser_messages, render_tools, role_messages
from actors.protocol import APIError, ChatMessage
from actors.schemas import AnswerSpec, Conversation

if TYPE_CHECKING:
    from actors.admission import Grant


@dataclass(frozen=True)
class Ask:
    """A request in no particular wire format: what the checks and the run need of it."""

    model: str
    messages: list[ChatMessage]  # the conversation, as chat messages (checked by the wire format)
    answer: dict[str, Any]  # the answer-shaping fields, as the fuser's upstream call takes them
    stream: bool = False
    overrides: dict[str, Any] | None = None  # `token_killer`: the profile's settings for this request
    deadline_s: float | None = None
    include_reasoning: bool | None = None
    user: str | None = None  # for the log: the client's user or safety identifier
    metadata: dict[str, str] | None = None
    # How hard to think (the Responses API's `reasoning.effort`): scales the profile's depth.
    effort: str | None = None
    # Over the limits, drop the oldest turns instead of refusing (the Responses API's `truncation`).
    truncate: bool = False
    # The client's names for the fields an error may name, where they differ from chat's
    # ("messages" is "input" in the Responses API).
    names: Mapping[str, str] = field(default_factory=dict)

    def name(self, param: str) -> str:
        return self.names.get(param, param)


def unknown_model(config: ServiceConfig, model_id: str) -> APIError:
    available = ", ".join(f"'{name}'" for name in config.profiles)
    return APIError(
        404,
        f"The model '{model_id}' does not exist. Available: {available}.",
        param="model",
        code="model_not_found",
    )


def plan_run(
    config: ServiceConfig, prompts: PromptSet, ask: Ask, request_id: str, grant: Grant | None = None
) -> RunPlan:
    """The run a request asks for, or an APIError saying why it cannot have it. `grant`: what the
    client's key allows (its profiles, the tokens it has left)."""
    limits = config.limits
    profile = config.profile_settings.get(ask.model)
    if profile is None:
        raise unknown_model(config, ask.model)
    ask = replace(ask, messages=_within_limits(config, ask))
    overrides = ask.overrides
    if ask.effort is not None:  # what the client sets itself wins over what the effort implies
        overrides = merge_settings(effort_overrides(profile, ask.effort, limits), overrides or {})
    try:
        settings = request_settings(profile, overrides, limits)
    except SettingsError as exc:
        raise APIError(400, str(exc), param=exc.param) from None
    if grant is not None:
        settings = grant.settings(ask.model, settings)
    answer = AnswerSpec(ask.answer)
    if settings.fusion.strategy != "intelligent" and answer.structured:
        param = ask.name("tool_choice" if answer.tools_required else "response_format")
        raise APIError(
            400,
            f"The '{ask.model}' profile answers without the fuser model (fusion.strategy: "
            f"{settings.fusion.strategy}), which cannot call tools or write JSON; use another profile.",
            param=param,
        )
    conversation = conversation_of(prompts, ask)
    try:
        fusion_tokens = _check_budget(config, prompts, settings, conversation, answer)
    except APIError as exc:
        raise (grant.budget_error(exc, settings) if grant else exc) from None
    seconds = min(ask.deadline_s or limits.deadline_s, limits.deadline_s)
    deadline = time.time() + seconds
    return RunPlan(
        request_id=request_id,
        conversation=conversation,
        settings=settings,
        answer=answer,
        deadline=deadline,
        thinking_stop_at=deadline - min(limits.fusion_reserve_s, seconds / 2),  # a short one still thinks
        fusion_budget_tokens=fusion_tokens,
        can_restart_fusion=not ask.stream,
    )


def effort_overrides(profile: RunSettings, effort: str, limits: LimitsConfig) -> dict[str, Any]:
    """How deep a reasoning effort thinks, relative to the profile (`medium` is the profile as
    it is), within the service's ceilings: none/minimal one thread of one step, unvalidated;
    low half the threads and steps; high twice the steps; xhigh/max twice both."""
    threads, steps = profile.thinking.num_threads, profile.thinking.max_steps

    def more(value: int, ceiling: int) -> int:
        return max(value, min(2 * value, ceiling))

    if effort in ("none", "minimal"):
        return {"thinking": {"num_threads": 1, "max_steps": 1}, "validation": {"enabled": False}}
    if effort == "low":
        return {"thinking": {"num_threads": -(-threads // 2), "max_steps": -(-steps // 2)}}
    if effort == "high":
        return {"thinking": {"max_steps": more(steps, limits.max_steps)}}
    if effort in ("xhigh", "max"):
        deeper = {"num_threads": more(threads, limits.max_threads), "max_steps": more(steps, limits.max_steps)}
        return {"thinking": deeper}
    return {}


def _within_limits(config: ServiceConfig, ask: Ask) -> list[ChatMessage]:
    """The messages, or an APIError when they exceed the limits. With `ask.truncate`, the
    oldest turns are dropped until they fit (system and developer text, and the question with
    what follows it, are kept)."""
    limits = config.limits
    messages = list(ask.messages)

    def fits() -> bool:
        return len(messages) <= limits.max_messages and sum(len(m.text()) for m in messages) <= limits.max_total_chars

    if ask.truncate:
        question = max(i for i, m in enumerate(messages) if m.role == "user")
        oldest = 0
        while not fits() and oldest < question:
            if messages[oldest].role in ("system", "developer"):
                oldest += 1
                continue
            del messages[oldest]
            question -= 1
            # A tool result whose call was dropped goes with it.
            while oldest < question and messages[oldest].role == "tool":
                del messages[oldest]
                question -= 1
    param = ask.name("messages")
    if len(messages) > limits.max_messages:
        raise APIError(
            400,
            f"Too many messages: {len(messages)}; this service takes at most {limits.max_messages}.",
            param=param,
            code="too_many_messages",
        )
    total = sum(len(m.text()) for m in messages)
    if total > limits.max_total_chars:
        raise APIError(
            400,
            f"The messages hold {total} characters; this service takes at most {limits.max_total_chars}.",
            param=param,
            code="context_length_exceeded",
        )
    return messages


def conversation_of(prompts: PromptSet, ask: Ask) -> Conversation:
    """Every message counts: system/developer text, earlier turns, tool calls and results."""
    messages = ask.messages
    system = "\n\n".join(m.text() for m in messages if m.role in ("system", "developer") and m.text())
    turns: list[tuple[str, str]] = []
    question_at = 0
    for message in messages:
        if message.role in ("system", "developer"):
            continue
        text = message.text()
        if message.role == "user":
            question_at = len(turns)
            turns.append(("user", text))
        elif message.role == "assistant":
            calls = "".join(
                f"\n[called tool {c.function.name} with {c.function.arguments}]" for c in message.tool_calls or ()
            )
            turns.append(("assistant", (text + calls).strip()))
        else:
            turns.append(("user", f"[result of tool call {message.tool_call_id}] {text}"))
    tools = ""
    if ask.answer.get("tools") and ask.answer.get("tool_choice") != "none":
        tools = render_tools(prompts.tools_header, ask.answer["tools"])
    return Conversation(
        question=turns[question_at][1],
        system=system,
        turns=tuple(turns),
        question_at=question_at,
        tools=tools,
        messages=tuple(m.wire() for m in messages),
    )


def _check_budget(
    config: ServiceConfig, prompts: PromptSet, settings: RunSettings, conversation: Conversation, answer: AnswerSpec
) -> int | None:
    """Tokens kept aside for fusion; a budget too small for one thinking call and the least
    fusion is refused, saying the minimum."""
    budget = settings.budget_tokens
    if budget is None:
        return None
    models = config.models

    def estimate(messages: list[dict]) -> int:
        return int(prompt_chars(messages) * DEFAULT_TOKENS_PER_CHAR) + 8

    cache_friendly = settings.economy.cache_friendly_prompts
    thinker = role_messages(
        prompts,
        conversation,
        prompts.thinker_system,
        prompts.thinker_task.format(context="", step_number=1),
        cache_friendly=cache_friendly,
    )
    thinking = estimate(thinker) + models["thinker"].max_tokens
    fusion = 0
    if settings.fusion.strategy == "intelligent":
        conclusion = "x" * int(models["thinker"].max_tokens / DEFAULT_TOKENS_PER_CHAR)
        brief = fuser_messages(
            prompts,
            conversation,
            prompts.fuser_brief_task.format(conclusion=conclusion),
            cache_friendly=cache_friendly,
        )
        answer_tokens = min(answer.params.get("max_tokens") or models["fuser"].max_tokens, models["fuser"].max_tokens)
        fusion = estimate(brief) + answer_tokens
        floor = estimate(brief) + min(MIN_ANSWER_TOKENS, answer_tokens)
    else:
        floor = 0
    minimum = thinking + floor
    if budget < minimum:
        raise APIError(
            400,
            f"'token_killer.budget_tokens' is {budget}; this request needs at least {minimum} "
            f"(one thinking call and the fusion).",
            param="token_killer.budget_tokens",
            code="budget_too_small",
        )
    return min(fusion, budget - thinking)
