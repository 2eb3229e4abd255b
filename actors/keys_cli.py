"""`token-killer-keys`: make client keys, and read what each key spent.

    token-killer-keys new alice --tokens-per-day 2000000 --profiles token-killer
    token-killer-keys spend                      # today and this month, every key
    token-killer-keys spend --day 2026-11-28 --json
    token-killer-keys hash < key.txt             # the keys-file hash of a key you already have
    token-killer-keys import-env                 # TOKEN_KILLER_API_KEYS into the keys file
    token-killer-keys store-up                   # what `make run` calls: a local PostgreSQL if chosen

It reads the `keys` section of the service's config (`--config`, else TOKEN_KILLER_CONFIG, else
configs/default.yaml): the keys file and the spend store, the same ones the service uses. Spend
reaches the store within `keys.sync_interval_s` of a request's end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from actors.config import (
    PROJECT_ROOT,
    SERVICE_KEYS_ENV_VAR,
    KeysConfig,
    PostgresStoreConfig,
    resolve_config_path,
)
from actors.keys import Key, KeyLimits, env_key_id, hash_key, new_key, read_keys_file
from actors.spend import Spend, periods_at
from actors.spend_store import open_store

LIMIT_FLAGS = {  # flag -> KeyLimits field
    "rpm": "requests_per_minute",
    "max_in_flight": "max_in_flight",
    "tokens_per_day": "tokens_per_day",
    "tokens_per_month": "tokens_per_month",
    "usd_per_day": "usd_per_day",
    "usd_per_month": "usd_per_month",
}
LOCAL_POSTGRES_DIR = PROJECT_ROOT / ".data" / "postgres"
LOCAL_POSTGRES_PORT = 5433


def keys_config(path: str | None) -> KeysConfig:
    config_path = resolve_config_path(path)
    raw = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    return KeysConfig.model_validate(raw.get("keys") or {})


def keys_file(config: KeysConfig, given: str | None) -> Path:
    chosen = given or config.file
    if chosen is None:
        sys.exit("No keys file: set keys.file in the config (e.g. configs/keys.yaml), or pass --file.")
    path = Path(chosen)
    return path if path.is_absolute() else PROJECT_ROOT / path


def append_keys(path: Path, keys: list[Key]) -> None:
    """Add entries at the end of the file (its comments stay), after checking the result loads."""
    existing = read_keys_file(path) if path.exists() else []
    taken = {k.id for k in existing} | {k.hash for k in existing}
    for key in keys:
        if key.id in taken or key.hash in taken:
            sys.exit(f"{path} already has a key '{key.id}' (or this key under another id).")
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if existing or text.strip() and yaml.safe_load(text) is not None:
        prefix = text if text.endswith("\n") else text + "\n"
    else:
        prefix = "# Client keys of Token Killer (README, Keys and spend): hashes only, never a key.\n"
    entries = [key.model_dump(exclude_defaults=True, exclude_none=True, mode="json") for key in keys]
    new_text = prefix + yaml.safe_dump(entries, sort_keys=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_suffix(path.suffix + ".tmp")
    scratch.write_text(new_text, encoding="utf-8")
    read_keys_file(scratch)  # never leave a file the service would refuse
    scratch.replace(path)


def cmd_new(args: argparse.Namespace) -> None:
    path = keys_file(keys_config(args.config), args.file)
    limits = KeyLimits(**{field: getattr(args, flag) for flag, field in LIMIT_FLAGS.items()})
    profiles = tuple(p.strip() for p in args.profiles.split(",")) if args.profiles else None
    plain = new_key()
    append_keys(path, [Key(id=args.id, hash=hash_key(plain), limits=limits, profiles=profiles)])
    print(plain)
    print(f"Key '{args.id}' added to {path}. The key above is shown once: only its hash is kept.", file=sys.stderr)


def cmd_hash(args: argparse.Namespace) -> None:
    plain = sys.stdin.readline().strip()
    if not plain:
        sys.exit("Give the key on standard input.")
    print(hash_key(plain))


def cmd_import_env(args: argparse.Namespace) -> None:
    path = keys_file(keys_config(args.config), args.file)
    plain = [k.strip() for k in os.environ.get(SERVICE_KEYS_ENV_VAR, "").split(",") if k.strip()]
    if not plain:
        sys.exit(f"{SERVICE_KEYS_ENV_VAR} is not set: nothing to import.")
    append_keys(path, [Key(id=env_key_id(k), hash=hash_key(k)) for k in plain])
    print(
        f"{len(plain)} key(s) added to {path} under the ids they had ({', '.join(env_key_id(k) for k in plain)}); "
        f"rename them there (their spend so far stays under the old id), add limits, then unset {SERVICE_KEYS_ENV_VAR}."
    )


def spend_report(config: KeysConfig, day: str, month: str, file: Path | None) -> list[dict[str, Any]]:
    """Every key of the file and every key with spend: what it spent on `day` and in `month`."""
    keys = {key.id: key for key in read_keys_file(file)} if file is not None and file.exists() else {}

    async def read() -> dict:
        store = open_store(config, os.environ)
        try:
            return await store.read([f"day:{day}", f"month:{month}"])
        finally:
            await store.close()

    rows = asyncio.run(read())
    report = []
    for key_id in sorted(set(keys) | {k for k, _ in rows}):
        key = keys.get(key_id)
        entry: dict[str, Any] = {"id": key_id, "in_keys_file": key is not None}
        for kind, period in (("day", f"day:{day}"), ("month", f"month:{month}")):
            spent = rows.get((key_id, period), Spend())
            entry[kind] = {
                "period": period.split(":", 1)[1],
                "requests": spent.requests,
                "prompt_tokens": spent.prompt_tokens,
                "completion_tokens": spent.completion_tokens,
                "tokens": spent.tokens,
                "usd": round(spent.usd, 6),
            }
        entry["limits"] = key.limits.model_dump(exclude_none=True) if key else {}
        report.append(entry)
    return report


def _with_limit(value: float, limit: float | None, money: bool = False) -> str:
    text = f"${value:,.4f}" if money else f"{value:,}"
    return text + (f" / {f'${limit:,.2f}' if money else f'{limit:,}'}" if limit is not None else "")


def cmd_spend(args: argparse.Namespace) -> None:
    config = keys_config(args.config)
    now = periods_at(time.time())
    day = args.day or now.day.split(":", 1)[1]
    month = args.month or day[:7]
    file = keys_file(config, args.file) if (args.file or config.file) else None
    report = spend_report(config, day, month, file)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    header = ("key", f"requests {day}", "tokens", "usd", f"requests {month}", "tokens", "usd")
    lines = [header]
    for entry in report:
        d, m, limits = entry["day"], entry["month"], entry["limits"]
        lines.append(
            (
                entry["id"] + ("" if entry["in_keys_file"] else " (not in the keys file)"),
                f"{d['requests']:,}",
                _with_limit(d["tokens"], limits.get("tokens_per_day")),
                _with_limit(d["usd"], limits.get("usd_per_day"), money=True),
                f"{m['requests']:,}",
                _with_limit(m["tokens"], limits.get("tokens_per_month")),
                _with_limit(m["usd"], limits.get("usd_per_month"), money=True),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        cells = [cell.rjust(width) for cell, width in zip(line, widths, strict=True)]
        print("  ".join([line[0].ljust(widths[0]), *cells[1:]]))
    if not report:
        print("(no keys, no spend yet)")


def cmd_store_up(args: argparse.Namespace) -> None:
    """For `make run`: with `keys.store.kind: postgres` and no connection string in the
    environment, start (or reuse) a local PostgreSQL in .data/postgres and print the export that
    points the service at it; otherwise print nothing."""
    store = keys_config(args.config).store
    if not isinstance(store, PostgresStoreConfig) or os.environ.get(store.dsn_env):
        return
    from actors.local_postgres import LocalPostgres

    server = LocalPostgres(LOCAL_POSTGRES_DIR, LOCAL_POSTGRES_PORT)
    if not server.running():
        server.start()
        print(f"PostgreSQL for spend started in {LOCAL_POSTGRES_DIR} on port {server.port}", file=sys.stderr)
    print(f"export {store.dsn_env}={server.dsn}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="token-killer-keys", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="the service's config (default: TOKEN_KILLER_CONFIG or configs/default.yaml)")
    parser.add_argument("--file", help="the keys file (default: keys.file of the config)")
    commands = parser.add_subparsers(dest="command", required=True)

    new = commands.add_parser("new", help="make a key, add its hash to the keys file, print the key once")
    new.add_argument("id", help="the key's id: letters, digits, _ . @ -")
    new.add_argument("--rpm", type=int, help="requests per minute")
    new.add_argument("--max-in-flight", type=int, help="requests at once (per Ingress replica)")
    new.add_argument("--tokens-per-day", type=int)
    new.add_argument("--tokens-per-month", type=int)
    new.add_argument("--usd-per-day", type=float)
    new.add_argument("--usd-per-month", type=float)
    new.add_argument("--profiles", help="comma-separated profiles it may use (default: every profile)")
    new.set_defaults(run=cmd_new)

    commands.add_parser("hash", help="print the keys-file hash of a key read from standard input").set_defaults(
        run=cmd_hash
    )
    commands.add_parser(
        "import-env", help=f"add the keys of {SERVICE_KEYS_ENV_VAR} to the keys file, under the ids they had"
    ).set_defaults(run=cmd_import_env)

    spend = commands.add_parser("spend", help="what each key spent today and this month (UTC)")
    spend.add_argument("--day", help="YYYY-MM-DD (default: today, UTC)")
    spend.add_argument("--month", help="YYYY-MM (default: the day's month)")
    spend.add_argument("--json", action="store_true")
    spend.set_defaults(run=cmd_spend)

    commands.add_parser("store-up", help="start a local PostgreSQL when the config chooses it").set_defaults(
        run=cmd_store_up
    )
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
