"""Fuser deployment: one streaming handle call merges the threads and yields answer tokens."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from ray import serve

from actors.config import ServiceConfig
from actors.fusion import Fuser as FusionRole
from actors.log_setup import bind_request, configure_logging
from actors.model_client import open_session, role_clients
from actors.prompts import load_prompts
from actors.schemas import FusionDelta, FusionJob
from deployments.metrics import ServiceMetrics


async def coalesced(deltas: AsyncIterator[FusionDelta]) -> AsyncIterator[FusionDelta]:
    """Relay text as it arrives, merging the pieces that arrived while the last one was sent.

    Every yield is one message through Ray, so one per token is costly for long answers; this
    adds no delay (the first piece goes at once), it only merges what is already waiting.
    """
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump() -> None:
        try:
            async for delta in deltas:
                queue.put_nowait(delta)
            queue.put_nowait(done)
        except Exception as exc:  # noqa: BLE001 - re-raised on the consumer side
            queue.put_nowait(exc)

    task = asyncio.ensure_future(pump())
    try:
        while True:
            items = [await queue.get()]
            while not queue.empty():
                items.append(queue.get_nowait())
            text = "".join(i.text for i in items if isinstance(i, FusionDelta) and i.usage is None)
            if text:
                yield FusionDelta(text=text)
            for item in items:
                if item is done:
                    return
                if isinstance(item, Exception):
                    raise item
                if item.usage is not None:  # the closing delta (usage, fallback) stays whole
                    yield item
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=500)
class Fuser:
    async def __init__(self, config: ServiceConfig) -> None:
        configure_logging()
        self.session = open_session(config.upstream)
        self.metrics = ServiceMetrics()
        client = role_clients(self.session, config, self.metrics)["fuser"]
        self.fuser = FusionRole(config.fusion, load_prompts(config.prompts), client)

    async def fuse(self, job: FusionJob) -> AsyncIterator[FusionDelta]:
        bind_request(job.request_id)
        async for delta in coalesced(self.fuser.fuse(job)):
            yield delta

    async def __del__(self) -> None:
        await self.session.close()
