"""What each key spent, per period, as one Ingress replica sees it: the store's totals plus its own.

Requests are counted when they are admitted, tokens and dollars when they finish (the exact usage
the service reports). Nothing waits for the store on a request's path: each replica adds to its
own pending counts, and every `sync_interval_s` one `exchange` with the store writes them and
reads back everyone's totals for the current minute, day and month. A replica's view is therefore
exact for its own requests and at most one interval behind for the other replicas'. A replica that
starts reads the totals first (`start`), so a budget spent before a restart stays spent.

Periods are UTC: `minute:2026-11-29T10:31` (for requests per minute; the store forgets old ones),
`day:2026-11-29`, `month:2026-11`.
"""

from __future__ import annotations

import asyncio
import calendar
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Protocol

import structlog

log = structlog.get_logger(__name__)

MINUTE, DAY, MONTH = "minute", "day", "month"


@dataclass
class Spend:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usd: float = 0.0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, other: Spend) -> None:
        self.requests += other.requests
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.usd += other.usd


Rows = dict[tuple[str, str], Spend]  # (key id, period) -> spend


class SpendStore(Protocol):
    async def exchange(self, add: Rows, periods: list[str], forget_minutes_before: str) -> Rows:
        """Add `add`, forget minute periods before the given one, return every key's totals for
        `periods` (one transaction)."""

    async def close(self) -> None: ...


@dataclass(frozen=True)
class Periods:
    """The periods a moment falls in, and when each ends (epoch seconds)."""

    minute: str
    day: str
    month: str
    minute_ends: float
    day_ends: float
    month_ends: float

    def of(self, kind: str) -> str:
        return getattr(self, kind)

    def ends(self, kind: str) -> float:
        return getattr(self, f"{kind}_ends")


def periods_at(now: float) -> Periods:
    t = time.gmtime(now)
    minute_start = int(now) - t.tm_sec
    day_start = minute_start - 60 * (t.tm_min + 60 * t.tm_hour)
    days_in_month = calendar.monthrange(t.tm_year, t.tm_mon)[1]
    return Periods(
        minute=time.strftime("minute:%Y-%m-%dT%H:%M", t),
        day=time.strftime("day:%Y-%m-%d", t),
        month=time.strftime("month:%Y-%m", t),
        minute_ends=minute_start + 60,
        day_ends=day_start + 86400,
        month_ends=day_start + 86400 * (days_in_month - t.tm_mday + 1),
    )


class SpendLedger:
    def __init__(self, store: SpendStore, clock=time.time) -> None:
        self.store = store
        self.clock = clock
        self._totals: Rows = {}  # the store's, as of the last exchange
        self._sending: Rows = {}  # written by the exchange under way, not yet in _totals
        self._pending: Rows = defaultdict(Spend)  # counted here since
        self._periods = periods_at(clock())

    def periods(self) -> Periods:
        now = self.clock()
        if now >= self._periods.minute_ends or now < self._periods.minute_ends - 60:
            self._periods = periods_at(now)
        return self._periods

    # --- counting (on the request path: memory only) -----------------------------------------

    def count_request(self, key_id: str) -> None:
        p = self.periods()
        for period in (p.minute, p.day, p.month):
            self._pending[key_id, period].requests += 1

    def count_usage(self, key_id: str, prompt_tokens: int, completion_tokens: int, usd: float) -> None:
        p = self.periods()
        for period in (p.day, p.month):
            row = self._pending[key_id, period]
            row.prompt_tokens += prompt_tokens
            row.completion_tokens += completion_tokens
            row.usd += usd

    def spent(self, key_id: str, kind: str) -> Spend:
        """What `key_id` spent in the current period of `kind`, as far as this replica knows."""
        row = (key_id, self.periods().of(kind))
        total = Spend()
        for source in (self._totals, self._sending, self._pending):
            if row in source:
                total.add(source[row])
        return total

    # --- the store -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Read the totals before the first request (raises if the store cannot be reached)."""
        await self.sync()

    async def sync(self) -> None:
        p = self.periods()
        self._sending, self._pending = dict(self._pending), defaultdict(Spend)
        try:
            totals = await self.store.exchange(self._sending, [p.minute, p.day, p.month], p.minute)
        except BaseException:
            for row, spend in self._sending.items():  # counted again at the next exchange
                self._pending[row].add(spend)
            self._sending = {}
            raise
        self._totals, self._sending = totals, {}

    async def run(self, interval_s: float) -> None:
        """Exchange with the store every `interval_s` until cancelled; a failed exchange is
        logged and its counts kept for the next one."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.sync()
            except Exception as exc:  # noqa: BLE001 - the store is down: keep counting, retry
                log.error("spend_store_unreachable", error=type(exc).__name__, detail=str(exc)[:200])

    async def close(self) -> None:
        """The last counts to the store, then its connection closed."""
        try:
            if self._pending:
                await self.sync()
        finally:
            await self.store.close()
