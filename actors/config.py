"""Service configuration: one YAML file (structure) plus the environment (secrets).

Loaded and validated once at start-up; every later component receives the validated
`ServiceConfig` and never reads files or the environment again.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_PATH = PROJECT_ROOT / "configs" / "default.yaml"
CONFIG_ENV_VAR = "TOKEN_KILLER_CONFIG"
# Comma-separated keys clients must send as `Authorization: Bearer ...`; unset = open service.
SERVICE_KEYS_ENV_VAR = "TOKEN_KILLER_API_KEYS"

Role = Literal["thinker", "counterexample", "voter", "summarizer", "fuser"]
ROLES: tuple[Role, ...] = ("thinker", "counterexample", "voter", "summarizer", "fuser")


class ConfigError(Exception):
    """The configuration cannot be used; the message names the offending field."""


class _Strict(BaseModel):
    # A typo in the YAML must stop start-up, not be silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    """One upstream model used for one role."""

    base_url: str
    model: str
    api_key_env: str | None = None
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    max_tokens: int = Field(256, gt=0)
    timeout_s: float = Field(60.0, gt=0)
    # Resolved from `api_key_env` at load time; never serialised into logs (SecretStr).
    api_key: SecretStr | None = None
    # Tried in order when this model keeps failing (after its retries).
    fallbacks: tuple["ModelConfig", ...] = ()


class ThinkingConfig(_Strict):
    num_threads: int = Field(3, ge=1, le=32)
    max_steps: int = Field(3, ge=1, le=50)


class ValidationConfig(_Strict):
    enabled: bool = True
    num_counterexamples: int = Field(3, ge=1, le=16)
    num_voters: int = Field(3, ge=1, le=16)
    pass_threshold: int = Field(2, ge=1)
    on_fail: Literal["revise", "flag"] = "revise"

    @model_validator(mode="after")
    def _threshold_reachable(self) -> "ValidationConfig":
        if self.pass_threshold > self.num_voters:
            raise ValueError(
                f"pass_threshold ({self.pass_threshold}) exceeds num_voters ({self.num_voters})"
            )
        return self


class ContextConfig(_Strict):
    strategy: Literal["smart", "full", "minimal"] = "smart"
    preserve_recent_steps: int = Field(2, ge=1)


class FusionConfig(_Strict):
    strategy: Literal["intelligent", "concat"] = "intelligent"


class UpstreamConfig(_Strict):
    max_attempts: int = Field(3, ge=1, le=10)
    backoff_initial_s: float = Field(0.2, ge=0)
    backoff_max_s: float = Field(5.0, ge=0)
    # Size of each replica's connection pool; 0 means unlimited. Never a silent cap.
    max_connections: int = Field(0, ge=0)


class LimitsConfig(_Strict):
    """What one request may ask for, and how much the service takes on at once."""

    max_body_bytes: int = Field(1_048_576, gt=0)
    max_messages: int = Field(256, gt=0)
    max_total_chars: int = Field(200_000, gt=0)
    # Requests one ingress replica runs at once; beyond it: 503 + Retry-After, immediately.
    max_in_flight: int = Field(1000, gt=0)
    retry_after_s: int = Field(1, ge=0)
    # Whole-request budget; near it no new step starts and what exists is fused.
    deadline_s: float = Field(600.0, gt=0)
    # Time kept for fusion before the deadline.
    fusion_reserve_s: float = Field(20.0, ge=0)


class ServiceConfig(_Strict):
    served_model_name: str = "token-killer"
    prompts: str = "en"
    show_reasoning: bool = True
    # SSE comment lines during silent phases, so proxies and clients don't drop the stream.
    stream_keepalive_s: float = Field(10.0, gt=0)
    models: dict[Role, ModelConfig]
    thinking: ThinkingConfig = ThinkingConfig()
    validation: ValidationConfig = ValidationConfig()
    context: ContextConfig = ContextConfig()
    fusion: FusionConfig = FusionConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    limits: LimitsConfig = LimitsConfig()
    # From the environment only (TOKEN_KILLER_API_KEYS), never from the YAML file.
    service_api_keys: tuple[SecretStr, ...] = Field((), exclude=True)

    @model_validator(mode="after")
    def _every_role_has_a_model(self) -> "ServiceConfig":
        missing = [role for role in ROLES if role not in self.models]
        if missing:
            raise ValueError(f"models: no model configured for role(s) {', '.join(missing)}")
        return self


class _EnvSettings(BaseSettings):
    """Reads `.env` and the process environment; only used to resolve API keys."""

    model_config = SettingsConfigDict(env_file=".env", extra="allow")


def resolve_config_path(args_path: str | None = None) -> Path:
    """The environment variable wins over the app args, which win over the default."""
    chosen = os.environ.get(CONFIG_ENV_VAR) or args_path
    if not chosen:
        return DEFAULT_CONFIG_PATH
    path = Path(chosen)
    if not path.is_absolute() and not path.exists():
        path = PROJECT_ROOT / path
    return path


def load_config(path: str | Path | None = None, env_file: str | Path | None = None) -> ServiceConfig:
    """Read, validate and resolve secrets. Raises ConfigError with the field named."""
    path = Path(path) if path else resolve_config_path()
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    if "service_api_keys" in raw:
        raise ConfigError(f"invalid config {path}: service_api_keys: set {SERVICE_KEYS_ENV_VAR} in the environment")
    try:
        config = ServiceConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"invalid config {path}:\n{_describe(exc)}") from exc
    env = _env_values(env_file)
    return _with_api_keys(config, env, path)


def _env_values(env_file: str | Path | None) -> dict[str, str]:
    files = [env_file] if env_file else [Path.cwd() / ".env", PROJECT_ROOT / ".env"]
    values: dict[str, str] = {}
    for candidate in files:
        if candidate and Path(candidate).is_file():
            extra = _EnvSettings(_env_file=candidate).model_extra or {}
            values.update({k.upper(): str(v) for k, v in extra.items() if v is not None})
    values.update(os.environ)  # the real environment wins over .env
    return values


def _with_api_keys(config: ServiceConfig, env: dict[str, str], path: Path) -> ServiceConfig:
    def resolve(model: ModelConfig, where: str) -> ModelConfig:
        fallbacks = tuple(resolve(f, f"{where}.fallbacks.{i}") for i, f in enumerate(model.fallbacks))
        update: dict = {"fallbacks": fallbacks}
        if model.api_key_env is not None:
            key = env.get(model.api_key_env) or env.get(model.api_key_env.upper())
            if not key:
                raise ConfigError(
                    f"invalid config {path}: {where}.api_key_env names "
                    f"{model.api_key_env}, which is not set in the environment or .env"
                )
            update["api_key"] = SecretStr(key)
        return model.model_copy(update=update)

    models = {role: resolve(model, f"models.{role}") for role, model in config.models.items()}
    keys = [SecretStr(k.strip()) for k in env.get(SERVICE_KEYS_ENV_VAR, "").split(",") if k.strip()]
    return config.model_copy(update={"models": models, "service_api_keys": tuple(keys)})


def _describe(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        location = ".".join(str(part) for part in error["loc"]) or "(top level)"
        lines.append(f"  {location}: {error['msg']}")
    return "\n".join(lines)
