"""What every role replica owns, made once when it starts and released when it stops.

One `aiohttp.ClientSession` (never one per call, never a new event loop), the replica's metrics,
and one `ModelClient` per role on that session.
"""

from __future__ import annotations

from actors.config import ServiceConfig
from actors.log_setup import configure_logging
from actors.model_client import ModelClient, open_session, role_clients
from deployments.metrics import ServiceMetrics


class ReplicaResources:
    def __init__(self, config: ServiceConfig) -> None:
        configure_logging()
        self.session = open_session(config.upstream)
        self.metrics = ServiceMetrics()
        self.clients: dict[str, ModelClient] = role_clients(self.session, config, self.metrics)

    async def close(self) -> None:
        await self.session.close()
