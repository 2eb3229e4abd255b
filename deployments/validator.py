"""Validator deployment: one handle call validates one step (counterexamples, then voters)."""

from __future__ import annotations

from ray import serve

from actors.config import ServiceConfig
from actors.log_setup import bind_request, configure_logging
from actors.model_client import open_session, role_clients
from actors.prompts import load_prompts
from actors.schemas import ValidationJob, Verdict
from actors.validation import StepValidator
from deployments.metrics import ServiceMetrics


# Two replicas by default, so losing one never takes every thread of a request with it.
@serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=500)
class Validator:
    async def __init__(self, config: ServiceConfig) -> None:
        configure_logging()
        self.session = open_session(config.upstream)
        self.metrics = ServiceMetrics()
        clients = role_clients(self.session, config, self.metrics)
        self.validator = StepValidator(
            config.validation, load_prompts(config.prompts), clients["counterexample"], clients["voter"]
        )

    async def validate(self, job: ValidationJob) -> Verdict:
        bind_request(job.request_id)
        verdict = await self.validator.validate(job)
        self.metrics.verdict(verdict)
        return verdict

    async def __del__(self) -> None:
        await self.session.close()
