"""Prompt sets (YAML files in configs/prompts/, validated at start-up) and how a role's prompt
becomes chat messages.

Two layouts, chosen by `economy.cache_friendly_prompts`:
- classic: the role's instructions as the system message, then the earlier turns, then one user
  message with the problem and the role's variable part;
- cache-friendly: the client's conversation exactly as it stands (the same for every role and
  every call of a request, so provider prefix caches serve it), then one user message with the
  role's instructions and its variable part, last.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from actors.config import PROJECT_ROOT, ConfigError
from actors.schemas import Conversation

PROMPTS_DIR = PROJECT_ROOT / "configs" / "prompts"

Messages = list[dict[str, Any]]


class PromptSet(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    problem: str
    tools_header: str
    thinker_system: str
    thinker_task: str
    context_header: str
    context_summary: str
    context_step: str
    revision_feedback: str
    counterexample_system: str
    counterexample_task: str
    voter_system: str
    voter_task: str
    summarizer_system: str
    summarizer_task: str
    summarizer_update: str
    fuser_system: str
    fuser_task: str
    fuser_brief_task: str
    fuser_thread: str
    fuser_step: str
    challenged_label: str


def load_prompts(name_or_path: str) -> PromptSet:
    """`name_or_path` is a set name ("en", "zh") or a path to a YAML file of the same shape."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = PROMPTS_DIR / f"{name_or_path}.yaml"
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        return PromptSet.model_validate(raw)
    except FileNotFoundError as exc:
        raise ConfigError(f"prompts: no prompt set at {path}") from exc
    except (yaml.YAMLError, ValidationError) as exc:
        raise ConfigError(f"prompts: invalid prompt set {path}: {exc}") from exc


def role_messages(
    prompts: PromptSet, conversation: Conversation, instructions: str, task: str, *, cache_friendly: bool
) -> Messages:
    """Messages for a reasoning role (thinker, counterexample, voter) about the conversation."""
    instructions = instructions.strip()
    tools = f"{conversation.tools}\n\n" if conversation.tools else ""
    if cache_friendly:
        system = [{"role": "system", "content": conversation.system}] if conversation.system else []
        turns = [{"role": role, "content": text} for role, text in conversation.turns]
        return [*system, *turns, {"role": "user", "content": f"{tools}{instructions}\n\n{task}"}]
    system = instructions
    if conversation.system:
        system += "\n\nThe user's instructions:\n" + conversation.system
    problem = prompts.problem.format(question=conversation.question)
    return [
        {"role": "system", "content": system},
        *({"role": role, "content": text} for role, text in conversation.history),
        {"role": "user", "content": f"{problem}\n\n{tools}{task}"},
    ]


def fuser_messages(prompts: PromptSet, conversation: Conversation, task: str, *, cache_friendly: bool) -> Messages:
    """The fuser writes what the client reads: it sees the client's messages as they were sent
    (tool calls and tool results included), then the threads to merge."""
    instructions = prompts.fuser_system.strip()
    client = [m for m in conversation.messages if m["role"] not in ("system", "developer")]
    if cache_friendly:
        system = [{"role": "system", "content": conversation.system}] if conversation.system else []
        return [*system, *client, {"role": "user", "content": f"{instructions}\n\n{task}"}]
    if conversation.system:
        instructions += "\n\nThe user's instructions:\n" + conversation.system
    return [{"role": "system", "content": instructions}, *client, {"role": "user", "content": task}]


def summarizer_messages(prompts: PromptSet, steps: str, previous_summary: str | None) -> Messages:
    if previous_summary is None:
        user = prompts.summarizer_task.format(steps=steps)
    else:
        user = prompts.summarizer_update.format(summary=previous_summary, steps=steps)
    return [{"role": "system", "content": prompts.summarizer_system}, {"role": "user", "content": user}]


def render_tools(header: str, tools: list[dict[str, Any]]) -> str:
    """The tools a request offers, as text for the reasoning roles (they plan; the fuser calls)."""
    lines = [header]
    for tool in tools:
        function = tool.get("function") or {}
        parameters = json.dumps(function.get("parameters") or {}, ensure_ascii=False, separators=(",", ":"))
        description = f": {function['description']}" if function.get("description") else ""
        lines.append(f"- {function.get('name', '?')}{description} (parameters: {parameters})")
    return "\n".join(lines)
