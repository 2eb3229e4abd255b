"""Service configuration: one YAML file (structure) plus the environment (secrets).

Loaded and validated once at start-up; every later component receives the validated
`ServiceConfig` and never reads files or the environment again.

The thinking / validation / context / fusion / economy sections at the top level are the base
settings; each entry of `profiles` is a model name clients can ask for, with its own overrides of
those sections. A request may override them again (`token_killer` in the body, see
`request_settings`), within the ceilings in `limits`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_PATH = PROJECT_ROOT / "configs" / "default.yaml"
CONFIG_ENV_VAR = "TOKEN_KILLER_CONFIG"
# Comma-separated keys clients must send as `Authorization: Bearer ...`; unset = open service.
SERVICE_KEYS_ENV_VAR = "TOKEN_KILLER_API_KEYS"
DEFAULT_PROFILE = "token-killer"

Role = Literal["thinker", "counterexample", "voter", "summarizer", "fuser"]
ROLES: tuple[Role, ...] = ("thinker", "counterexample", "voter", "summarizer", "fuser")
SETTINGS_SECTIONS = ("thinking", "validation", "context", "fusion", "economy")


class ConfigError(Exception):
    """The configuration cannot be used; the message names the offending field."""


class _Strict(BaseModel):
    # A typo in the YAML must stop start-up, not be silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelPrice(_Strict):
    """USD per million tokens, as the provider bills them."""

    input: float = Field(ge=0)
    output: float = Field(ge=0)
    # Prompt tokens the provider served from its prefix cache; billed as `input` when unset.
    cached_input: float | None = Field(None, ge=0)


class ModelConfig(_Strict):
    """One upstream model used for one role."""

    base_url: str
    model: str
    api_key_env: str | None = None
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    max_tokens: int = Field(256, gt=0)
    timeout_s: float = Field(60.0, gt=0)
    price: ModelPrice | None = None
    # Resolved from `api_key_env` at load time; never serialised into logs (SecretStr).
    api_key: SecretStr | None = None
    # Tried in order when this model keeps failing (after its retries).
    fallbacks: tuple[ModelConfig, ...] = ()


class ThinkingConfig(_Strict):
    num_threads: int = Field(3, ge=1, le=32)
    max_steps: int = Field(3, ge=1, le=50)
    # Stream the thinkers' tokens as they arrive (as well as each finished step).
    live_tokens: bool = False


class ValidationConfig(_Strict):
    enabled: bool = True
    num_counterexamples: int = Field(3, ge=1, le=16)
    num_voters: int = Field(3, ge=1, le=16)
    pass_threshold: int = Field(2, ge=1)
    on_fail: Literal["revise", "flag"] = "revise"

    @model_validator(mode="after")
    def _threshold_reachable(self) -> ValidationConfig:
        if self.pass_threshold > self.num_voters:
            raise ValueError(f"pass_threshold ({self.pass_threshold}) exceeds num_voters ({self.num_voters})")
        return self


class ContextConfig(_Strict):
    strategy: Literal["smart", "full", "minimal"] = "smart"
    preserve_recent_steps: int = Field(2, ge=1)


class FusionConfig(_Strict):
    # intelligent: the fuser model merges the threads; concat: conclusions joined, no call;
    # majority: the conclusion most threads reached (ties: the best thread), no call.
    strategy: Literal["intelligent", "concat", "majority"] = "intelligent"


class EconomyConfig(_Strict):
    """Mechanisms that spend fewer tokens; README "Spend control" says what each can change."""

    # Ask a step's counterexamples (and its voters) in one upstream call with `n`.
    n_sampling: bool = True
    # Ask `pass_threshold` voters first, more only while the verdict is still open.
    staged_voting: bool = True
    # Every critic found nothing: the step passes without a vote (can change a decision).
    skip_vote_without_counterexample: bool = True
    # Every thread reached the same answer: `brief` fuses from the conclusions only,
    # `no_call` answers with the agreed conclusion itself, `off` fuses as usual.
    agreement_shortcut: Literal["off", "brief", "no_call"] = "brief"
    # Update the middle-steps summary from the last one plus the newly evicted step.
    incremental_summary: bool = True
    # Stable prompt parts (the conversation, the question) first, role text last.
    cache_friendly_prompts: bool = True

    @field_validator("agreement_shortcut", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        return "off" if value is False else value  # YAML reads a bare `off` as false


ECONOMY_OFF = {name: False for name in EconomyConfig.model_fields} | {"agreement_shortcut": "off"}


class RunSettings(_Strict):
    """How one request thinks: a profile's settings, with the request's overrides applied."""

    thinking: ThinkingConfig = ThinkingConfig()
    validation: ValidationConfig = ValidationConfig()
    context: ContextConfig = ContextConfig()
    fusion: FusionConfig = FusionConfig()
    economy: EconomyConfig = EconomyConfig()
    # Tokens (prompt + completion, as the upstreams report them) the request may spend.
    budget_tokens: int | None = Field(None, gt=0)

    @field_validator("economy", mode="before")
    @classmethod
    def _economy_off(cls, value: Any) -> Any:
        return ECONOMY_OFF if value is False else value  # `economy: off` switches every one off


class UpstreamConfig(_Strict):
    max_attempts: int = Field(3, ge=1, le=10)
    backoff_initial_s: float = Field(0.2, ge=0)
    # No wait between attempts is longer, `Retry-After` included: a longer one ends the retries.
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
    # Ceilings on what a request's `token_killer` overrides may ask for.
    max_threads: int = Field(8, ge=1, le=32)
    max_steps: int = Field(12, ge=1, le=50)
    # The token budget of a request that sets none (null: unbounded), and the most it may set.
    budget_tokens: int | None = Field(None, gt=0)
    max_budget_tokens: int = Field(2_000_000, gt=0)


class SqliteStoreConfig(_Strict):
    """The embedded spend store: one file, shared by the Ingress replicas of one machine."""

    kind: Literal["sqlite"] = "sqlite"
    # Relative paths are taken from the repository's root.
    path: str = ".data/spend.sqlite3"


class PostgresStoreConfig(_Strict):
    """The server spend store, for Ingress replicas on more than one machine."""

    kind: Literal["postgres"]
    # The environment variable holding the libpq connection string (it may carry a password).
    dsn_env: str = "TOKEN_KILLER_SPEND_DSN"


class KeysConfig(_Strict):
    """Client keys with identities and limits (actors/keys.py), and where their spend is kept."""

    # The keys file (hashes only; README "Keys and spend"); null: only TOKEN_KILLER_API_KEYS.
    file: str | None = None
    store: SqliteStoreConfig | PostgresStoreConfig = Field(SqliteStoreConfig(), discriminator="kind")
    # How often each Ingress replica writes its spend to the store and reads everyone's back.
    sync_interval_s: float = Field(1.0, gt=0, le=60)
    # How long a request of a key under its fair share waits for a slot of a full replica.
    admission_wait_s: float = Field(5.0, ge=0)


class ServiceConfig(_Strict):
    prompts: str = "en"
    show_reasoning: bool = True
    # The names chat completions give the reasoning (message and delta): DeepSeek's and vLLM's
    # `reasoning_content`, and vLLM's and OpenRouter's `reasoning`.
    reasoning_fields: tuple[Literal["reasoning_content", "reasoning"], ...] = Field(
        ("reasoning_content", "reasoning"), min_length=1
    )
    # SSE comment lines during silent phases, so proxies and clients don't drop the stream.
    stream_keepalive_s: float = Field(10.0, gt=0)
    models: dict[Role, ModelConfig]
    thinking: ThinkingConfig = ThinkingConfig()
    validation: ValidationConfig = ValidationConfig()
    context: ContextConfig = ContextConfig()
    fusion: FusionConfig = FusionConfig()
    economy: EconomyConfig = EconomyConfig()
    # Model name -> overrides of the sections above (raw here; resolved into `profile_settings`).
    profiles: dict[str, dict[str, Any]] = Field(default_factory=lambda: {DEFAULT_PROFILE: {}})
    upstream: UpstreamConfig = UpstreamConfig()
    limits: LimitsConfig = LimitsConfig()
    keys: KeysConfig = KeysConfig()
    # From the environment only (TOKEN_KILLER_API_KEYS), never from the YAML file.
    service_api_keys: tuple[SecretStr, ...] = Field((), exclude=True)
    # Filled in by the validator below: each profile's complete settings.
    profile_settings: dict[str, RunSettings] = Field(default_factory=dict, exclude=True)

    @field_validator("economy", mode="before")
    @classmethod
    def _economy_off(cls, value: Any) -> Any:
        return ECONOMY_OFF if value is False else value

    @model_validator(mode="after")
    def _every_role_has_a_model(self) -> ServiceConfig:
        missing = [role for role in ROLES if role not in self.models]
        if missing:
            raise ValueError(f"models: no model configured for role(s) {', '.join(missing)}")
        return self

    @model_validator(mode="after")
    def _resolve_profiles(self) -> ServiceConfig:
        if not self.profiles:
            raise ValueError("profiles: define at least one profile")
        base = self.model_dump(include=set(SETTINGS_SECTIONS))
        resolved = {}
        for name, overrides in self.profiles.items():
            if not isinstance(overrides, dict):
                raise ValueError(f"profiles.{name}: must be a mapping of settings sections")
            try:
                resolved[name] = RunSettings.model_validate(merge_settings(base, overrides or {}))
            except ValidationError as exc:
                raise ValueError(f"profiles.{name}:\n{describe_errors(exc, prefix=f'profiles.{name}')}") from None
        object.__setattr__(self, "profile_settings", resolved)
        return self

    @property
    def default_profile(self) -> str:
        return next(iter(self.profiles))


class SettingsError(ValueError):
    """A request's overrides cannot be used; `param` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def merge_settings(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` applied section by section (one level of nesting)."""
    merged = {key: dict(value) if isinstance(value, dict) else value for key, value in base.items()}
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def request_settings(profile: RunSettings, overrides: dict[str, Any] | None, limits: LimitsConfig) -> RunSettings:
    """A profile with a request's `token_killer` overrides, checked against the ceilings.

    JSON types are strict ("3" is not a number); an unknown key, a wrong type or a value over a
    ceiling raises SettingsError naming the field as `token_killer.<path>`.
    """
    if overrides is None:
        settings = profile
    else:
        try:
            settings = RunSettings.model_validate(merge_settings(profile.model_dump(), overrides), strict=True)
        except ValidationError as exc:
            error = exc.errors()[0]
            path = "token_killer." + ".".join(str(p) for p in error["loc"])
            raise SettingsError(f"Invalid value for '{path}': {error['msg']}.", path) from None
    if settings.budget_tokens is None and limits.budget_tokens is not None:
        settings = settings.model_copy(update={"budget_tokens": limits.budget_tokens})
    ceilings = (
        ("thinking", "num_threads", limits.max_threads),
        ("thinking", "max_steps", limits.max_steps),
        (None, "budget_tokens", limits.max_budget_tokens),
    )
    for section, name, ceiling in ceilings:  # what the request asked for; the profile's own stand
        asked = (overrides or {}).get(section, {}) if section else overrides or {}
        value = asked.get(name) if isinstance(asked, dict) else None
        if value is not None and value > ceiling:
            path = f"token_killer.{section + '.' if section else ''}{name}"
            raise SettingsError(f"'{path}' is {value}; this service allows at most {ceiling}.", path)
    return settings


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
    for forbidden in ("service_api_keys", "profile_settings"):
        if forbidden in raw:
            raise ConfigError(f"invalid config {path}: {forbidden}: not a config key")
    try:
        config = ServiceConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"invalid config {path}:\n{describe_errors(exc)}") from exc
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


def describe_errors(exc: ValidationError, prefix: str = "") -> str:
    lines = []
    for error in exc.errors():
        location = ".".join(str(part) for part in (prefix, *error["loc"]) if part != "") or "(top level)"
        lines.append(f"  {location}: {error['msg']}")
    return "\n".join(lines)
