"""What every role replica owns, made once when it starts and released when it stops.

One `aiohttp.ClientSession` (never one per call, never a new event loop), the replica's metrics,
one `ModelClient` per role on that session, and a watch that gives memory back after load.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import resource

import structlog

from actors.config import ServiceConfig
from actors.log_setup import configure_logging
from actors.model_client import ModelClient, open_session, role_clients
from deployments.metrics import ServiceMetrics

log = structlog.get_logger(__name__)

TRIM_EVERY_S = 20.0
# More tasks than this on the replica's loop: it is serving requests, not idle.
BUSY_TASKS = 50


def start_process_care() -> asyncio.Task:
    """What every replica of ours sets up first (the Ingress too): logging, the collector's
    thresholds, and the memory watch, returned as a task to cancel at shutdown.

    A request allocates thousands of short-lived objects and almost no cycles: the youngest
    generation is collected ten times less often than Python's default of every 700 allocations.
    """
    configure_logging()
    gc.set_threshold(7000, 10, 10)
    return asyncio.get_running_loop().create_task(give_memory_back())


class ReplicaResources:
    def __init__(self, config: ServiceConfig) -> None:
        self._care = start_process_care()
        self.session = open_session(config.upstream)
        self.metrics = ServiceMetrics()
        self.clients: dict[str, ModelClient] = role_clients(self.session, config, self.metrics)

    async def close(self) -> None:
        self._care.cancel()
        await self.session.close()


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


async def give_memory_back(every_s: float = TRIM_EVERY_S) -> None:
    """After a burst, a replica's freed memory stays in the allocator's arenas (RSS does not
    fall by itself); once the replica is idle again with RSS grown past its size at start,
    collect and return the free pages."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to trim
        return
    idle_mb = _rss_mb()
    while True:
        await asyncio.sleep(every_s)
        now_mb = _rss_mb()
        if now_mb < idle_mb * 1.2 or len(asyncio.all_tasks()) > BUSY_TASKS:
            continue  # nothing to give back, or busy: a full collection would cost the requests
        gc.collect()
        libc.malloc_trim(0)
        log.info("memory_trimmed", rss_mb_before=round(now_mb), rss_mb_after=round(_rss_mb()))
