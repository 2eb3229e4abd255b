"""Calling another deployment through its handle, as the roles expect to call it.

A call that fails because our own replica was lost or pushed back (not because of its work) is
made again — Serve routes it to another replica, or to the replacement it starts — unless part
of a streamed answer already arrived (a restart would repeat it). What a replica raised itself
comes out as its own exception, without Ray's wrapper.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import structlog
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from actors.pipeline import StageLost

log = structlog.get_logger(__name__)

T = TypeVar("T")

ATTEMPTS = 3
# Our replicas died, are restarting, or refused work: retrying elsewhere can help.
CAPACITY_ERRORS = (RayActorError, BackPressureError, DeploymentUnavailableError)


def unwrapped(exc: RayTaskError) -> BaseException:
    """The exception a replica raised, without Ray's wrapper and its remote traceback."""
    return exc.cause if isinstance(exc.cause, BaseException) else exc


async def call_with_retries(call: Callable[[], Awaitable[T]]) -> T:
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return await call()
        except RayTaskError as exc:
            raise unwrapped(exc) from None
        except CAPACITY_ERRORS as exc:
            if attempt == ATTEMPTS:
                raise StageLost(exc) from None
            log.warning("replica_lost_retrying", attempt=attempt, error=type(exc).__name__)
            await asyncio.sleep(0.1 * attempt)
    raise AssertionError("unreachable")


async def stream_with_retries(call: Callable[[], AsyncIterator[T]]) -> AsyncIterator[T]:
    for attempt in range(1, ATTEMPTS + 1):
        started = False
        try:
            async for item in call():
                started = True
                yield item
            return
        except RayTaskError as exc:
            raise unwrapped(exc) from None
        except CAPACITY_ERRORS as exc:
            if started or attempt == ATTEMPTS:
                raise StageLost(exc) from None
            log.warning("replica_lost_retrying", attempt=attempt, error=type(exc).__name__)
            await asyncio.sleep(0.1 * attempt)
