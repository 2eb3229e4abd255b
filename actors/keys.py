"""Client keys with an identity and limits: the keys file, and who a bearer token is.

The keys file holds, per key, an id, the SHA-256 of the key (never the key), optional limits and
the profiles the key may use. Keys are long random tokens (`token-killer-keys new` makes them),
not passwords: one SHA-256 is enough to make a leaked file useless, and it costs a microsecond
per request where a password hash would cost milliseconds.

Keys from `TOKEN_KILLER_API_KEYS` (plain, from the environment) keep working as keys without
limits; their id is `env-` and the start of their hash, so it stays the same when the list is
reordered, and `token-killer-keys import-env` moves them into the file under that same id (their
spend goes on being counted under it).
"""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, ValidationError

from actors.protocol import APIError

HASH_PREFIX = "sha256:"
KEY_PREFIX = "tk-"

KeyId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")]
KeyHash = Annotated[str, StringConstraints(pattern=r"^sha256:[0-9a-f]{64}$")]


class KeyLimits(BaseModel):
    """Every limit is optional; none set: the key is only counted."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Admitted requests per calendar minute (UTC), counted across every Ingress replica.
    requests_per_minute: int | None = Field(None, gt=0)
    # Requests running at once, per Ingress replica (as `limits.max_in_flight` is).
    max_in_flight: int | None = Field(None, gt=0)
    # Prompt + completion tokens as the upstreams reported them, per UTC day and calendar month.
    tokens_per_day: int | None = Field(None, gt=0)
    tokens_per_month: int | None = Field(None, gt=0)
    # USD at the configured prices, per UTC day and calendar month.
    usd_per_day: float | None = Field(None, gt=0)
    usd_per_month: float | None = Field(None, gt=0)


class Key(BaseModel):
    """One entry of the keys file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: KeyId
    hash: KeyHash
    limits: KeyLimits = KeyLimits()
    # Profiles (the `model` a request names) this key may use; null: every profile.
    profiles: tuple[str, ...] | None = None

    def check_profile(self, profile: str) -> None:
        if self.profiles is not None and profile not in self.profiles:
            allowed = ", ".join(f"'{p}'" for p in self.profiles)
            raise APIError(
                403,
                f"This API key may not use the model '{profile}'. It may use: {allowed}.",
                type="permission_error",
                param="model",
                code="model_not_allowed",
            )


_KEYS_FILE = TypeAdapter(list[Key])


class KeysFileError(ValueError):
    """The keys file cannot be used; the message names the entry and field."""


def hash_key(key: str) -> str:
    return HASH_PREFIX + hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh client key: 256 random bits."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def env_key_id(key: str) -> str:
    return "env-" + hash_key(key)[len(HASH_PREFIX) : len(HASH_PREFIX) + 8]


def env_key(key: str) -> Key:
    """A key from TOKEN_KILLER_API_KEYS: no limits, every profile."""
    return Key(id=env_key_id(key), hash=hash_key(key))


def read_keys_file(path: Path) -> list[Key]:
    """The entries of a keys file (a YAML list; an empty file has none)."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise KeysFileError(f"keys file not found: {path}") from exc
    except yaml.YAMLError as exc:
        raise KeysFileError(f"keys file {path} is not valid YAML: {exc}") from exc
    if raw is None:
        return []
    try:
        return _KEYS_FILE.validate_python(raw)
    except ValidationError as exc:
        where = "\n".join(
            f"  entry {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors(include_url=False)
        )
        raise KeysFileError(f"invalid keys file {path} (a YAML list of keys):\n{where}") from None


class KeyRing:
    """Every key the service accepts, looked up by the hash of what a client presents."""

    def __init__(self, keys: list[Key]) -> None:
        self.by_hash: dict[str, Key] = {}
        self.by_id: dict[str, Key] = {}
        for key in keys:
            if key.id in self.by_id and self.by_id[key.id].hash != key.hash:
                raise KeysFileError(f"two keys have the id '{key.id}'")
            if key.hash in self.by_hash and self.by_hash[key.hash].id != key.id:
                raise KeysFileError(f"one key is listed as '{self.by_hash[key.hash].id}' and '{key.id}'")
            self.by_hash.setdefault(key.hash, key)
            self.by_id.setdefault(key.id, key)

    @classmethod
    def load(cls, file: Path | None, env_keys: list[str]) -> KeyRing:
        """The keys file's keys, then the environment's (a key in both keeps the file's entry)."""
        keys = read_keys_file(file) if file is not None else []
        listed = {key.hash for key in keys}
        return cls(keys + [env_key(k) for k in env_keys if hash_key(k) not in listed])

    @property
    def open(self) -> bool:
        """No keys at all: the service is open, and nothing is counted per key."""
        return not self.by_hash

    def authenticate(self, authorization: str | None) -> Key:
        """The key an `Authorization: Bearer ...` header carries, or 401. (A dict lookup by hash
        times nothing about the key itself: an attacker would have to invert SHA-256.)"""
        scheme, _, token = (authorization or "").partition(" ")
        key = self.by_hash.get(hash_key(token.strip())) if scheme.lower() == "bearer" and token.strip() else None
        if key is None:
            raise APIError(
                401,
                "Missing or invalid API key. Send it as 'Authorization: Bearer <key>'.",
                type="invalid_request_error",
                code="invalid_api_key",
            )
        return key
