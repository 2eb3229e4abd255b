"""A request's token budget: work is started only if its worst case fits.

Before a call starts, its worst case is reserved: the estimated prompt (see
`ModelClient.estimate_prompt`, calibrated on what the upstream reported) plus every completion
token it may write (`max_tokens`). When it ends, the reservation is replaced by what the upstream
reported. The reported total therefore stays within the budget, up to the prompt estimate's error.

Work that does not fit waits while other reservations are outstanding (they usually settle for
less than they held); it is given up only when nothing is left to settle.
"""

from __future__ import annotations

import asyncio


class Reservation:
    __slots__ = ("tokens",)

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens


class TokenBudget:
    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.spent = 0
        self.reserved = 0
        self._settled: asyncio.Event | None = None

    @property
    def bounded(self) -> bool:
        return self.limit is not None

    @property
    def left(self) -> int | None:
        return None if self.limit is None else self.limit - self.spent - self.reserved

    def reserve(self, tokens: int) -> Reservation | None:
        """Hold `tokens` for a piece of work now, or None if they do not fit now."""
        if self.limit is None:
            return Reservation(0)
        if self.spent + self.reserved + tokens > self.limit:
            return None
        self.reserved += tokens
        return Reservation(tokens)

    async def acquire(self, tokens: int) -> Reservation | None:
        """Hold `tokens`, waiting for outstanding reservations to settle; None if they cannot fit
        even once nothing else is held."""
        while True:
            reservation = self.reserve(tokens)
            if reservation is not None or self.reserved == 0:
                return reservation
            if self._settled is None:
                self._settled = asyncio.Event()
            await self._settled.wait()

    def settle(self, reservation: Reservation, spent: int) -> None:
        self.reserved -= reservation.tokens
        reservation.tokens = 0
        self.spent += spent
        if self._settled is not None:  # wake the waiters: some room may have come back
            self._settled.set()
            self._settled = None
