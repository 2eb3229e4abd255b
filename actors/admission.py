"""Who gets in, and how many at once: service API keys and the in-flight limit.

Both answer at once with an OpenAI-shaped error rather than queueing: a client told 503 with
`Retry-After` can back off; a request parked in an unbounded queue just times out later.
"""

from __future__ import annotations

import hmac

from pydantic import SecretStr

from actors.protocol import APIError


def check_bearer(authorization: str | None, keys: tuple[SecretStr, ...]) -> None:
    """Raise 401 unless the header carries one of `keys` (no keys configured: open service)."""
    if not keys:
        return
    scheme, _, token = (authorization or "").partition(" ")
    presented = token.strip().encode() if scheme.lower() == "bearer" else b""
    # Compare against every key, always, in constant time: no early exit to time.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(presented, key.get_secret_value().encode())
    if not matched:
        raise APIError(
            401,
            "Missing or invalid API key. Send it as 'Authorization: Bearer <key>'.",
            type="invalid_request_error",
            code="invalid_api_key",
        )


class InFlightLimit:
    """Counts the requests one replica is running; refuses new ones beyond `limit`."""

    def __init__(self, limit: int, retry_after_s: int) -> None:
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.current = 0

    def enter(self) -> Ticket:
        if self.current >= self.limit:
            raise APIError(
                503,
                "The service is at capacity; retry shortly.",
                type="service_unavailable",
                code="overloaded",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        self.current += 1
        return Ticket(self)


class Ticket:
    """One admitted request; `release` may be called any number of times."""

    def __init__(self, limit: InFlightLimit) -> None:
        self._limit: InFlightLimit | None = limit

    def release(self) -> None:
        if self._limit is not None:
            self._limit.current -= 1
            self._limit = None
