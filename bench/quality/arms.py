"""What is compared: one direct call to the thinker model, and each profile the service serves."""

from __future__ import annotations

import json
import os
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

from bench.service import ROOT

DIRECT, SERVICE = "direct", "service"
DEFAULT_SERVICE_PORT = 8000  # what the shipped configs point their local roles at


@dataclass(frozen=True)
class Arm:
    name: str
    kind: str  # DIRECT or SERVICE
    base_url: str  # ends in /v1
    model: str
    api_key: str
    max_tokens: int | None = None  # direct only: the service sizes each role itself
    temperature: float | None = None
    price: dict[str, float] | None = None  # direct only, USD per million tokens

    def public(self) -> dict[str, Any]:
        """Everything but the key, for the results file."""
        return {k: v for k, v in asdict(self).items() if k != "api_key"}


def load_app_config(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


def api_root(base_url: str) -> str:
    """ "http://h:1/", "http://h:1/v1" -> "http://h:1" (the service's root, /v1 left off)."""
    return base_url.rstrip("/").removesuffix("/v1")


def with_service_port(url: str, service_port: int | None) -> str:
    """A local role URL written for the default port 8000 points at the service actually run."""
    parts = urlsplit(url)
    if service_port is None or parts.hostname not in ("127.0.0.1", "localhost") or parts.port != DEFAULT_SERVICE_PORT:
        return url
    return urlunsplit(parts._replace(netloc=f"{parts.hostname}:{service_port}"))


def direct_arm(
    app_config: dict[str, Any],
    service_port: int | None,
    *,
    base_url: str | None = None,
    model: str | None = None,
    max_tokens: int | None = None,
) -> Arm:
    """One call to `models.thinker`, the model every thread thinks with.

    Its answer budget (unless `max_tokens` is given) is what one thread may write: the thinker's
    `max_tokens` per step × `thinking.max_steps`; one step's budget would cut a direct answer short.
    """
    thinker = (app_config.get("models") or {}).get("thinker") or {}
    if not (base_url or thinker.get("base_url")) or not (model or thinker.get("model")):
        raise ValueError("the config has no models.thinker; give --direct-base-url and --direct-model")
    steps = (app_config.get("thinking") or {}).get("max_steps", 3)
    budget = max_tokens or thinker.get("max_tokens", 256) * steps
    name = model or thinker["model"]
    return Arm(
        name=f"direct: {name}",
        kind=DIRECT,
        base_url=with_service_port(base_url or thinker["base_url"], service_port),
        model=name,
        # With another base URL the thinker's key may not apply: use it if set, require it only if not.
        api_key=upstream_key(thinker.get("api_key_env"), required=not base_url),
        max_tokens=budget,
        temperature=thinker.get("temperature", 0.7),
        price=thinker.get("price"),
    )


def upstream_key(env_name: str | None, required: bool = True) -> str:
    """The key named by `api_key_env`, from the environment or a `.env` file (as the service reads it)."""
    if not env_name:
        return "unused"
    value = (
        os.environ.get(env_name) or _dotenv(Path.cwd() / ".env").get(env_name) or _dotenv(ROOT / ".env").get(env_name)
    )
    if not value and not required:
        return "unused"
    if not value:
        raise ValueError(f"models.thinker.api_key_env names {env_name}, which is not set (environment or .env)")
    return value


def _dotenv(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    pairs = (
        line.split("=", 1)
        for line in path.read_text().splitlines()
        if "=" in line and not line.lstrip().startswith("#")
    )
    return {k.strip().removeprefix("export ").strip(): v.strip().strip("'\"") for k, v in pairs}


def service_key() -> str:
    """The service's own client key when it requires one (TOKEN_KILLER_API_KEYS), else anything."""
    keys = [k.strip() for k in os.environ.get("TOKEN_KILLER_API_KEYS", "").split(",") if k.strip()]
    return keys[0] if keys else "unused"


def listed_models(root: str, api_key: str) -> list[str]:
    """The ids `GET /v1/models` lists: one per profile."""
    request = urllib.request.Request(f"{root}/v1/models", headers={"Authorization": f"Bearer {api_key}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return [m["id"] for m in json.load(response)["data"]]


def requested_models(values: list[str] | None) -> list[str]:
    """--model a --model b,c -> [a, b, c] (order kept, duplicates dropped)."""
    names = [n.strip() for value in values or [] for n in value.split(",") if n.strip()]
    return list(dict.fromkeys(names))


def service_arms(root: str, models: list[str], api_key: str) -> list[Arm]:
    return [Arm(name=model, kind=SERVICE, base_url=f"{root}/v1", model=model, api_key=api_key) for model in models]
