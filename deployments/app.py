"""The app builders named in serve_config.yaml.

`build_app` loads and validates the configuration once (a bad config stops start-up with the
field named) and wires the deployments: Ingress -> Thinker -> Validator, Ingress -> Fuser.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from actors.config import load_config, resolve_config_path
from actors.prompts import load_prompts
from deployments.fuser import Fuser
from deployments.ingress import Ingress
from deployments.thinker import Thinker
from deployments.validator import Validator


def build_app(args: dict[str, Any]) -> Application:
    """Args: `config` — path of the YAML config (the TOKEN_KILLER_CONFIG variable wins)."""
    config = load_config(resolve_config_path(args.get("config")))
    load_prompts(config.prompts)  # fail now, not on the first request
    validator = Validator.bind(config)
    thinker = Thinker.bind(config, validator)
    fuser = Fuser.bind(config)
    return Ingress.bind(config, thinker, fuser)
