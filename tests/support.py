"""Shared test helpers: a service config pointed at the simulated upstream, role-aware replies.

Each role calls its own model name (`sim-thinker`, `sim-voter`, ...) so a test can script one
role with `Rule(model=...)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from actors.config import ROLES, ServiceConfig

ROLE_REPLIES = {
    "sim-thinker": "We reason about the problem carefully. [CONTINUE]",
    "sim-counterexample": "Counterexample: none found, the step holds.",
    "sim-voter": "VOTE: STEP because it holds.",
    "sim-summarizer": "Summary of the middle steps.",
    "sim-fuser": "The fused final answer is 42.",
}


def role_aware_reply(request: dict[str, Any]) -> str:
    return ROLE_REPLIES.get(request.get("model", ""), "Simulated answer.")


def sim_config_dict(base_url: str, **sections: Any) -> dict[str, Any]:
    """A config as the YAML file would hold it; `sections` override top-level keys."""
    models = {
        role: {"base_url": base_url, "model": f"sim-{role}", "max_tokens": 64, "timeout_s": 2}
        for role in ROLES
    }
    config: dict[str, Any] = {
        "served_model_name": "token-killer",
        "models": models,
        "thinking": {"num_threads": 3, "max_steps": 2},
        "validation": {"enabled": True, "num_counterexamples": 3, "num_voters": 3, "pass_threshold": 2},
        "upstream": {"max_attempts": 3, "backoff_initial_s": 0.01, "backoff_max_s": 0.05},
    }
    config.update(sections)
    return config


def sim_config(base_url: str, **sections: Any) -> ServiceConfig:
    return ServiceConfig.model_validate(sim_config_dict(base_url, **sections))


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path
