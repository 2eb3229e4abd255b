"""Thinker deployment: one handle call runs every thread of a request (streamed for SSE clients).

The threads of a request share one replica, so its token budget and its deadline are one
object, and their step validations go to the Validator pool batched (see
`actors.validation.ValidationBatches`): a few handle calls per request instead of one per step.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from ray import serve
from ray.serve.handle import DeploymentHandle

from actors.config import ServiceConfig
from actors.log_setup import bind_request
from actors.prompts import PromptSet
from actors.schemas import ThinkJob, ThinkUpdate, UsageLedger, ValidationJob, Verdict
from actors.thinking import RequestThinking
from actors.validation import ValidationBatches
from deployments.handles import call_with_retries
from deployments.replica import ReplicaResources

# Each streamed update is one message through Ray: events less than this apart travel together
# (the first of a quiet spell goes at once, so a step still shows the moment it is written).
UPDATE_SPACING_S = 0.02


@serve.deployment
class Thinker:
    async def __init__(self, config: ServiceConfig, prompts: PromptSet, validator: DeploymentHandle) -> None:
        self.replica = ReplicaResources(config)
        self.prompts = prompts
        self.validator = validator

    async def think(self, job: ThinkJob) -> AsyncIterator[ThinkUpdate]:
        """Every thread's events as they happen (for clients that stream)."""
        bind_request(job.request_id)
        async for update in self._thinking(job).updates(spacing_s=UPDATE_SPACING_S):
            yield update

    async def think_whole(self, job: ThinkJob) -> ThinkUpdate:
        """Every thread's events in one reply (for JSON clients: one message instead of many)."""
        bind_request(job.request_id)
        whole = ThinkUpdate([], UsageLedger(), final=True)
        async for update in self._thinking(job).updates():
            whole.events += update.events
            whole.usage.merge(update.usage)
        return whole

    def _thinking(self, job: ThinkJob) -> RequestThinking:
        thinking = RequestThinking(job, self.prompts, self.replica.clients, None)
        if job.settings.validation.enabled:
            thinking.validate = ValidationBatches(self._validate, lambda: thinking.live).validate
        return thinking

    async def _validate(self, jobs: list[ValidationJob]) -> list[Verdict]:
        # A lost or saturated Validator replica: the batch is asked again of another one; if the
        # pool stays unreachable the steps are left unvalidated (the thread goes on).
        return await call_with_retries(lambda: self.validator.validate.remote(jobs))

    async def __del__(self) -> None:
        await self.replica.close()
