"""Fusion: many threads in, one answer out, streamed token by token.

`intelligent` asks the fuser model to merge any number of threads (challenged steps marked);
`concat` joins the threads' conclusions without a call. If the fuser fails before it has said
anything, the best surviving thread's conclusion is the answer instead of an error.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import structlog

from actors.config import FusionConfig
from actors.model_client import ModelClient
from actors.prompts import PromptSet
from actors.schemas import FusionDelta, FusionJob, ThreadResult, UsageLedger

log = structlog.get_logger(__name__)


class Fuser:
    def __init__(self, config: FusionConfig, prompts: PromptSet, client: ModelClient) -> None:
        self.config = config
        self.prompts = prompts
        self.client = client

    async def fuse(self, job: FusionJob) -> AsyncIterator[FusionDelta]:
        if not job.threads:
            raise ValueError("fusion needs at least one thread")
        if self.config.strategy == "concat":
            yield FusionDelta(text=concat_conclusions(job.threads), usage=UsageLedger())
            return

        usage = UsageLedger()
        messages = job.conversation.messages(
            self.prompts.fuser_system,
            self.prompts.fuser_user.format(
                question=job.conversation.question, threads=self.render_threads(job.threads)
            ),
        )
        said_anything = False
        try:
            async for text in self.client.stream(messages, usage, tag=job.request_id):
                said_anything = True
                yield FusionDelta(text=text)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if said_anything:
                raise  # part of the answer is out: a silent switch would garble it
            best = max(job.threads, key=ThreadResult.quality)
            log.warning(
                "fusion_failed_using_best_thread",
                thread=best.thread_index,
                error=str(exc) or type(exc).__name__,
            )
            yield FusionDelta(text=best.conclusion, usage=usage, fallback_from_thread=best.thread_index)
            return
        yield FusionDelta(usage=usage)

    def render_threads(self, threads: tuple[ThreadResult, ...]) -> str:
        p = self.prompts
        blocks = []
        for number, thread in enumerate(threads, start=1):
            steps = "\n".join(
                p.fuser_step.format(
                    step_number=s.index + 1,
                    challenged=p.challenged_label if s.flagged else "",
                    text=s.text,
                )
                for s in thread.steps
            )
            blocks.append(p.fuser_thread.format(thread_number=number, steps=steps))
        return "\n\n".join(blocks)


def concat_conclusions(threads: tuple[ThreadResult, ...]) -> str:
    if len(threads) == 1:
        return threads[0].conclusion
    return "\n\n".join(f"[{n}] {t.conclusion}" for n, t in enumerate(threads, start=1))
