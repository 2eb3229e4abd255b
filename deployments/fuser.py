"""Fuser deployment: the answer, streamed (SSE clients) or whole (JSON clients)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from ray import serve

from actors.config import ServiceConfig
from actors.fusion import Fuser as FusionRole
from actors.fusion import merge_delta
from actors.log_setup import bind_request
from actors.prompts import PromptSet
from actors.schemas import FusionDelta, FusionJob
from actors.streams import batches
from deployments.replica import ReplicaResources


@serve.deployment
class Fuser:
    async def __init__(self, config: ServiceConfig, prompts: PromptSet) -> None:
        self.replica = ReplicaResources(config)
        self.fuser = FusionRole(prompts, self.replica.clients["fuser"])

    async def fuse(self, job: FusionJob) -> AsyncIterator[FusionDelta]:
        """The answer as it is written. Every yield is one message through Ray: pieces that
        arrived while the last one was in transit go together (nothing is held back)."""
        bind_request(job.request_id)
        async for batch in batches([self.fuser.fuse(job)]):
            delta = batch[0]
            for more in batch[1:]:
                merge_delta(delta, more)
            yield delta

    async def answer(self, job: FusionJob) -> FusionDelta:
        bind_request(job.request_id)
        return await self.fuser.answer(job)

    async def __del__(self) -> None:
        await self.replica.close()
