"""The app builders named in serve_config.yaml.

`build_app` loads and validates the configuration once (a bad config stops start-up with the
field named), loads the prompt set once, and wires the deployments: Ingress -> Thinker ->
Validator, Ingress -> Fuser. Every deployment option (replicas, CPUs, queues, autoscaling)
lives in serve_config.yaml, not here.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application
from ray.serve.deployment import Deployment

from actors.config import ServiceConfig, load_config, resolve_config_path
from actors.prompts import PromptSet, load_prompts
from deployments.fuser import Fuser
from deployments.ingress import Ingress
from deployments.thinker import Thinker
from deployments.validator import Validator


def build_app(args: dict[str, Any]) -> Application:
    """Args: `config` — path of the YAML config (the TOKEN_KILLER_CONFIG variable wins)."""
    config = load_config(resolve_config_path(args.get("config")))
    return bind_service(config, load_prompts(config.prompts))


def bind_service(
    config: ServiceConfig,
    prompts: PromptSet,
    *,
    ingress: Deployment = Ingress,
    thinker: Deployment = Thinker,
    validator: Deployment = Validator,
    fuser: Deployment = Fuser,
) -> Application:
    """The deployment graph; the deployments can be swapped (tests use failing variants)."""
    return ingress.bind(
        config, prompts, thinker.bind(config, prompts, validator.bind(config, prompts)), fuser.bind(config, prompts)
    )
