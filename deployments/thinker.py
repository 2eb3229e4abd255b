"""Thinker deployment: one streaming handle call runs one whole thread and yields its steps.

It holds a handle to the Validator so a thread can validate step k while it speculates on k+1
(see actors/thinking.py); one validation handle call per step, one thread call per thread.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from ray import serve
from ray.serve.handle import DeploymentHandle

from actors.config import ServiceConfig
from actors.log_setup import bind_request, configure_logging
from actors.model_client import open_session, role_clients
from actors.prompts import load_prompts
from actors.schemas import StepEvent, ThreadJob, ValidationJob, Verdict
from actors.thinking import ThreadRunner
from deployments.metrics import ServiceMetrics


# Two replicas by default, so losing one never takes every thread of a request with it.
@serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=500)
class Thinker:
    async def __init__(self, config: ServiceConfig, validator: DeploymentHandle) -> None:
        configure_logging()
        self.session = open_session(config.upstream)
        self.metrics = ServiceMetrics()
        self.validator = validator
        clients = role_clients(self.session, config, self.metrics)
        self.runner = ThreadRunner(
            config, load_prompts(config.prompts), clients["thinker"], clients["summarizer"], self._validate
        )

    async def run_thread(self, job: ThreadJob) -> AsyncIterator[StepEvent]:
        bind_request(job.request_id)
        async for event in self.runner.run(job):
            yield event

    async def _validate(self, job: ValidationJob) -> Verdict:
        return await self.validator.validate.remote(job)

    async def __del__(self) -> None:
        await self.session.close()
