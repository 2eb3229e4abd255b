"""Prompt sets: YAML files in configs/prompts/, one per language, validated at start-up."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from actors.config import PROJECT_ROOT, ConfigError

PROMPTS_DIR = PROJECT_ROOT / "configs" / "prompts"


class PromptSet(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    thinker_system: str
    thinker_step: str
    context_header: str
    context_summary: str
    context_step: str
    revision_feedback: str
    counterexample_system: str
    counterexample_user: str
    voter_system: str
    voter_user: str
    summarizer_system: str
    summarizer_user: str
    fuser_system: str
    fuser_user: str
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
