"""Fuser deployment: one streaming handle call merges the threads and yields answer tokens."""

from __future__ import annotations

from collections.abc import AsyncIterator

from ray import serve

from actors.config import ServiceConfig
from actors.fusion import Fuser as FusionRole
from actors.log_setup import bind_request, configure_logging
from actors.model_client import open_session, role_clients
from actors.prompts import load_prompts
from actors.schemas import FusionDelta, FusionJob
from deployments.metrics import ServiceMetrics


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
        async for delta in self.fuser.fuse(job):
            yield delta

    async def __del__(self) -> None:
        await self.session.close()
