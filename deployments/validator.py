"""Validator deployment: one handle call validates the steps a request's threads wrote together."""

from __future__ import annotations

import asyncio

from ray import serve

from actors.config import ServiceConfig
from actors.log_setup import bind_request
from actors.prompts import PromptSet
from actors.schemas import ValidationJob, Verdict
from actors.validation import StepValidator
from deployments.replica import ReplicaResources


@serve.deployment
class Validator:
    async def __init__(self, config: ServiceConfig, prompts: PromptSet) -> None:
        self.replica = ReplicaResources(config)
        clients = self.replica.clients
        self.validator = StepValidator(prompts, clients["counterexample"], clients["voter"])

    async def validate(self, jobs: list[ValidationJob]) -> list[Verdict]:
        bind_request(jobs[0].request_id)
        verdicts = await asyncio.gather(*(self.validator.validate(job) for job in jobs))
        for verdict in verdicts:
            self.replica.metrics.verdict(verdict)
        return verdicts

    async def __del__(self) -> None:
        await self.replica.close()
