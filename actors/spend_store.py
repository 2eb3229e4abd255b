"""Where spend per key is kept: SQLite (embedded, the default) or PostgreSQL (a server).

Both are one table and the same statements through Python's DB-API, run in a worker thread
once per sync interval (never on a request's path). SQLite is shared by the Ingress replicas of
one machine (WAL mode; each write is one short transaction). PostgreSQL is shared by the replicas
of every machine, and keeps what it acknowledged through a crash (its WAL is fsynced on commit).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from actors.config import PROJECT_ROOT, KeysConfig, PostgresStoreConfig
from actors.spend import Rows, Spend

TABLE = "tk_spend"
_CREATE = f"""CREATE TABLE IF NOT EXISTS {TABLE} (
    key_id TEXT NOT NULL,
    period TEXT NOT NULL,
    requests BIGINT NOT NULL DEFAULT 0,
    prompt_tokens BIGINT NOT NULL DEFAULT 0,
    completion_tokens BIGINT NOT NULL DEFAULT 0,
    usd DOUBLE PRECISION NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, period))"""
_ADD = f"""INSERT INTO {TABLE} (key_id, period, requests, prompt_tokens, completion_tokens, usd)
    VALUES (?, ?, ?, ?, ?, ?)
    ON CONFLICT (key_id, period) DO UPDATE SET
        requests = {TABLE}.requests + excluded.requests,
        prompt_tokens = {TABLE}.prompt_tokens + excluded.prompt_tokens,
        completion_tokens = {TABLE}.completion_tokens + excluded.completion_tokens,
        usd = {TABLE}.usd + excluded.usd"""
_FORGET = f"DELETE FROM {TABLE} WHERE period LIKE ? AND period < ?"  # ('minute:%', the current one)
_READ = f"SELECT key_id, period, requests, prompt_tokens, completion_tokens, usd FROM {TABLE} WHERE period IN ({{}})"


class StoreError(Exception):
    """The store cannot be opened as configured; the message says why."""


class SqlSpendStore:
    """One connection, used by one worker thread at a time; reopened after a failure."""

    def __init__(self, connect: Callable[[], Any], placeholder: str, describe: str) -> None:
        self._connect = connect
        self._placeholder = placeholder
        self.describe = describe  # for logs and the CLI: never a password
        self._connection: Any = None
        self._lock = asyncio.Lock()

    def _sql(self, statement: str) -> str:
        return statement.replace("?", self._placeholder)

    def _open(self) -> Any:
        if self._connection is None:
            connection = self._connect()
            cursor = connection.cursor()
            cursor.execute(_CREATE)
            connection.commit()
            self._connection = connection
        return self._connection

    def _exchange(self, add: Rows, periods: list[str], forget_before: str | None) -> Rows:
        try:
            connection = self._open()
            cursor = connection.cursor()
            if add:
                rows = [(k, p, s.requests, s.prompt_tokens, s.completion_tokens, s.usd) for (k, p), s in add.items()]
                cursor.executemany(self._sql(_ADD), rows)
            if forget_before is not None:
                cursor.execute(self._sql(_FORGET), ("minute:%", forget_before))
            cursor.execute(self._sql(_READ.format(", ".join("?" * len(periods)))), tuple(periods))
            result = {(k, p): Spend(int(r), int(pt), int(ct), float(u)) for k, p, r, pt, ct, u in cursor.fetchall()}
            connection.commit()
            return result
        except BaseException:
            self._close()  # a broken connection is reopened at the next exchange
            raise

    def _close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.close()
            except Exception:  # noqa: BLE001 - it is being thrown away
                pass

    async def exchange(self, add: Rows, periods: list[str], forget_minutes_before: str | None = None) -> Rows:
        async with self._lock:
            return await asyncio.to_thread(self._exchange, add, periods, forget_minutes_before)

    async def read(self, periods: list[str]) -> Rows:
        return await self.exchange({}, periods)

    async def close(self) -> None:
        async with self._lock:
            await asyncio.to_thread(self._close)


def sqlite_store(path: str | Path) -> SqlSpendStore:
    path = Path(path)
    if not path.is_absolute():
        path = PROJECT_ROOT / path

    def connect() -> sqlite3.Connection:
        path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(path, timeout=10, check_same_thread=False)
        connection.execute("PRAGMA journal_mode=WAL")  # readers (the CLI, other replicas) never block it
        connection.execute("PRAGMA synchronous=NORMAL")
        return connection

    return SqlSpendStore(connect, "?", f"sqlite:{path}")


def postgres_store(dsn: str) -> SqlSpendStore:
    import psycopg  # only where this store is chosen

    def connect():
        return psycopg.connect(dsn, connect_timeout=10)

    info = psycopg.conninfo.conninfo_to_dict(dsn)
    where = f"postgres:{info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '')}"
    return SqlSpendStore(connect, "%s", where)


def open_store(config: KeysConfig, env: Mapping[str, str]) -> SqlSpendStore:
    """The store `config` names; the PostgreSQL connection string comes from the environment."""
    store = config.store
    if isinstance(store, PostgresStoreConfig):
        dsn = env.get(store.dsn_env)
        if not dsn:
            raise StoreError(f"keys.store is postgres, but {store.dsn_env} (its connection string) is not set")
        return postgres_store(dsn)
    return sqlite_store(store.path)
