"""Who gets in, and how many at once: each key's limits, and the replica's slots shared fairly.

A request is refused at once with an OpenAI-shaped error rather than parked in a queue it would
time out in: 429 when its key is over a limit (`rate_limit_exceeded`; `insufficient_quota` for a
spent budget, with `Retry-After` at the period's end), 503 when the replica is full. The slots of
a replica (`limits.max_in_flight`) are shared between the keys that use them (`FairSlots`): while
other keys are active, a key holding its share is refused (429); a key below its share that finds
the replica full waits (at most `keys.admission_wait_s`) for the next slot that frees. So one key
cannot take every slot, and a single key (or an open service) sees exactly the old behaviour:
503 when full.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections import defaultdict, deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from actors.config import PROJECT_ROOT, KeysConfig, LimitsConfig, RunSettings
from actors.keys import Key, KeyRing
from actors.protocol import APIError
from actors.spend import DAY, MINUTE, MONTH, SpendLedger
from actors.spend_store import open_store

OPEN = ""  # the key id of requests to a service without keys


def _retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def overloaded(retry_after_s: float) -> APIError:
    return APIError(
        503,
        "The service is at capacity; retry shortly.",
        type="service_unavailable",
        code="overloaded",
        headers=_retry_after(retry_after_s),
    )


def rate_limited(message: str, retry_after_s: float) -> APIError:
    return APIError(429, message, type="requests", code="rate_limit_exceeded", headers=_retry_after(retry_after_s))


class FairSlots:
    """The requests one replica runs at once, per key.

    A key alone may take every slot. While other keys are active (running, waiting, or done less
    than `ACTIVE_FOR_S` ago), a key holds at most its share: the slots divided by the active keys.
    A key below its share that finds the replica full waits for the next slot that frees, which
    goes to the waiting key with the fewest in flight (first come within a key)."""

    # A key between two requests still counts as active for this long, so that the moment one of
    # its requests ends, another key does not take the slot its next request needs.
    ACTIVE_FOR_S = 1.0

    def __init__(self, limit: int, retry_after_s: float, wait_s: float, clock=time.monotonic) -> None:
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.wait_s = wait_s
        self.clock = clock
        self.current = 0
        self.in_flight: dict[str, int] = defaultdict(int)
        self._waiting: dict[str, deque[asyncio.Future]] = {}
        self._last_ended: dict[str, float] = {}

    def share(self, key_id: str) -> int:
        """Slots per key among the active keys (this one counted)."""
        return math.ceil(self.limit / len(self._active() | {key_id}))

    def _active(self) -> set[str]:
        since = self.clock() - self.ACTIVE_FOR_S
        for key_id in [k for k, ended in self._last_ended.items() if ended < since]:
            del self._last_ended[key_id]
        return set(self._waiting) | set(self.in_flight) | set(self._last_ended)  # in_flight holds no zero

    async def enter(self, key_id: str) -> Slot:
        others = self._active() - {key_id}
        if others:
            held = self.in_flight.get(key_id, 0) + len(self._waiting.get(key_id, ()))
            share = self.share(key_id)
            if held >= share:
                raise rate_limited(
                    f"This API key holds its share of the service ({held} of {self.limit} requests at once, "
                    f"shared by {len(others) + 1} keys); retry shortly.",
                    self.retry_after_s,
                )
        if self.current < self.limit:  # no one waits while a slot is free
            return self._take(key_id)
        if not others:  # the only key: the service is full
            raise overloaded(self.retry_after_s)
        granted: asyncio.Future[Slot] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key_id, deque()).append(granted)
        try:
            async with asyncio.timeout(self.wait_s):
                return await granted
        except BaseException as exc:
            if granted.done() and not granted.cancelled():
                granted.result().release()  # granted just as the wait ended: give it back
            else:
                granted.cancel()
                self._forget(key_id, granted)
            if isinstance(exc, TimeoutError):
                raise overloaded(self.retry_after_s) from None
            raise

    def _take(self, key_id: str) -> Slot:
        self.current += 1
        self.in_flight[key_id] += 1
        return Slot(self, key_id)

    def _forget(self, key_id: str, future: asyncio.Future) -> None:
        queue = self._waiting.get(key_id)
        if queue is not None and future in queue:
            queue.remove(future)
            if not queue:
                del self._waiting[key_id]

    def _release(self, key_id: str) -> None:
        self.current -= 1
        self.in_flight[key_id] -= 1
        if not self.in_flight[key_id]:
            del self.in_flight[key_id]
            self._last_ended[key_id] = self.clock()
        while self._waiting and self.current < self.limit:
            fewest = min(self._waiting, key=lambda k: self.in_flight.get(k, 0))
            queue = self._waiting[fewest]
            future = queue.popleft()
            if not queue:
                del self._waiting[fewest]
            if not future.done():
                future.set_result(self._take(fewest))


class Slot:
    """One admitted request's slot; `release` may be called any number of times."""

    def __init__(self, slots: FairSlots, key_id: str) -> None:
        self._slots: FairSlots | None = slots
        self.key_id = key_id

    def release(self) -> None:
        if self._slots is not None:
            self._slots._release(self.key_id)
            self._slots = None


def out_of_quota(message: str, retry_after_s: float) -> APIError:
    # Retrying within seconds cannot help: the SDKs are told not to.
    headers = _retry_after(retry_after_s) | {"x-should-retry": "false"}
    return APIError(429, message, type="insufficient_quota", code="insufficient_quota", headers=headers)


_BUDGETS = (  # (limit, period, what is counted)
    ("tokens_per_day", DAY, "tokens"),
    ("tokens_per_month", MONTH, "tokens"),
    ("usd_per_day", DAY, "usd"),
    ("usd_per_month", MONTH, "usd"),
)
_PERIOD_NAMES = {DAY: "today (UTC)", MONTH: "this month (UTC)"}


@dataclass(frozen=True)
class Grant:
    """An admitted request's key, as far as its reply is concerned."""

    key: Key | None
    # Tokens the key has left in its tightest token budget, and when that budget resets.
    remaining_tokens: int | None = None
    resets_in_s: float = 0.0
    period: str = DAY

    @property
    def key_id(self) -> str | None:
        return self.key.id if self.key else None

    def settings(self, profile: str, settings: RunSettings) -> RunSettings:
        """The profile checked against the key's; the budget at most what the key has left."""
        if self.key is not None:
            self.key.check_profile(profile)
        left = self.remaining_tokens
        if left is not None and (settings.budget_tokens is None or settings.budget_tokens > left):
            return settings.model_copy(update={"budget_tokens": left})
        return settings

    def budget_error(self, error: APIError, settings: RunSettings) -> APIError:
        """A budget too small for the request that is what the key has left: a spent quota."""
        if error.code != "budget_too_small" or settings.budget_tokens != self.remaining_tokens:
            return error
        return out_of_quota(
            f"This API key has {self.remaining_tokens} tokens left {_PERIOD_NAMES[self.period]}, too few for "
            f"this request ({error.message})",
            self.resets_in_s,
        )


class Gate:
    """What the Ingress asks about each request: whose key, may it come in, what it spent."""

    def __init__(self, ring: KeyRing, ledger: SpendLedger | None, slots: FairSlots) -> None:
        self.ring = ring
        self.ledger = ledger
        self.slots = slots
        self.syncing: asyncio.Task | None = None  # the ledger's exchanges with the store

    async def close(self) -> None:
        """Stop syncing; the last counts go to the store."""
        if self.syncing is not None:
            self.syncing.cancel()
        if self.ledger is not None:
            await self.ledger.close()

    def authenticate(self, authorization: str | None) -> Key | None:
        """The request's key (401 without a valid one), or None when the service is open."""
        return None if self.ring.open else self.ring.authenticate(authorization)

    async def admit(self, key: Key | None) -> tuple[Grant, Slot]:
        """Refused (429, 503) or admitted, with the key's remaining budget and a slot."""
        if key is None or self.ledger is None:
            return Grant(key), await self.slots.enter(key.id if key else OPEN)
        grant = self._check(key)
        slot = await self.slots.enter(key.id)
        self.ledger.count_request(key.id)
        return grant, slot

    def _check(self, key: Key) -> Grant:
        limits, ledger = key.limits, self.ledger
        now = ledger.clock()
        periods = ledger.periods()
        remaining, resets_in, binding = None, 0.0, DAY
        for name, period, what in _BUDGETS:
            limit = getattr(limits, name)
            if limit is None:
                continue
            spent = ledger.spent(key.id, period)
            used = spent.tokens if what == "tokens" else spent.usd
            ends_in = periods.ends(period) - now
            if used >= limit:
                amount = f"{limit} tokens" if what == "tokens" else f"${limit:g}"
                raise out_of_quota(
                    f"This API key has spent its {amount} {_PERIOD_NAMES[period]}; "
                    f"it resets in {math.ceil(ends_in)} s.",
                    ends_in,
                )
            if what == "tokens" and (remaining is None or limit - used < remaining):
                remaining, resets_in, binding = limit - used, ends_in, period
        if limits.requests_per_minute is not None:
            if ledger.spent(key.id, MINUTE).requests >= limits.requests_per_minute:
                ends_in = periods.minute_ends - now
                raise rate_limited(
                    f"This API key is limited to {limits.requests_per_minute} requests per minute; "
                    f"retry in {math.ceil(ends_in)} s.",
                    ends_in,
                )
        if limits.max_in_flight is not None and self.slots.in_flight.get(key.id, 0) >= limits.max_in_flight:
            raise rate_limited(
                f"This API key is limited to {limits.max_in_flight} requests at once; retry when one ends.",
                self.slots.retry_after_s,
            )
        return Grant(key, remaining, resets_in, binding)

    def record(self, key_id: str | None, prompt_tokens: int, completion_tokens: int, usd: float) -> None:
        """A finished request's exact usage, counted against its key."""
        if key_id is not None and self.ledger is not None:
            self.ledger.count_usage(key_id, prompt_tokens, completion_tokens, usd)


async def open_gate(
    keys: KeysConfig, limits: LimitsConfig, env_keys: list[str], env: Mapping[str, str] = os.environ
) -> Gate:
    """The keys file and the environment's keys; with any key, the spend store, its totals read."""
    file = None
    if keys.file is not None:
        file = Path(keys.file) if os.path.isabs(keys.file) else PROJECT_ROOT / keys.file
    ring = KeyRing.load(file, env_keys)
    slots = FairSlots(limits.max_in_flight, limits.retry_after_s, keys.admission_wait_s)
    if ring.open:
        return Gate(ring, None, slots)
    ledger = SpendLedger(open_store(keys, env))
    await ledger.start()
    gate = Gate(ring, ledger, slots)
    gate.syncing = asyncio.get_running_loop().create_task(ledger.run(keys.sync_interval_s))
    return gate
