"""What a thread sees of its own earlier steps before it writes the next one.

- `full`: every earlier step;
- `minimal`: only the previous step;
- `smart`: the first step in full (it frames the problem), a summary of the middle steps made by
  the summarizer model, and the last `preserve_recent_steps` in full. A failed summary falls back to
  the full text of the middle steps: a longer prompt is better than a lost step.
"""

from __future__ import annotations

import structlog

from actors.config import ContextConfig
from actors.model_client import ModelClient
from actors.prompts import PromptSet
from actors.schemas import Step, UsageLedger

log = structlog.get_logger(__name__)


class ContextBuilder:
    """One per thread: it caches the summary of the middle steps it made last."""

    def __init__(self, config: ContextConfig, prompts: PromptSet, summarizer: ModelClient) -> None:
        self.config = config
        self.prompts = prompts
        self.summarizer = summarizer
        self._summary_for: tuple[tuple[int, str], ...] = ()
        self._summary = ""

    async def build(self, steps: list[Step], usage: UsageLedger, tag: str = "") -> str:
        if not steps:
            return ""
        if self.config.strategy == "minimal":
            return self._render(steps[-1:], summary=None)
        recent = self.config.preserve_recent_steps
        if self.config.strategy == "full" or len(steps) <= recent + 1:
            return self._render(steps, summary=None)
        first, middle, last = steps[:1], steps[1:-recent], steps[-recent:]
        summary = await self._summarize(middle, usage, tag)
        if summary is None:
            return self._render(steps, summary=None)
        return self._render(first, summary=summary) + "\n" + self._render_steps(last)

    def _render(self, steps: list[Step], summary: str | None) -> str:
        text = self.prompts.context_header + "\n" + self._render_steps(steps)
        if summary is not None:
            text += "\n" + self.prompts.context_summary.format(summary=summary)
        return text

    def _render_steps(self, steps: list[Step]) -> str:
        return "\n".join(
            self.prompts.context_step.format(step_number=s.index + 1, text=s.text) for s in steps
        )

    async def _summarize(self, middle: list[Step], usage: UsageLedger, tag: str) -> str | None:
        key = tuple((s.index, s.text) for s in middle)
        if key == self._summary_for:
            return self._summary
        messages = [
            {"role": "system", "content": self.prompts.summarizer_system},
            {"role": "user", "content": self.prompts.summarizer_user.format(steps=self._render_steps(middle))},
        ]
        try:
            summary = await self.summarizer.complete(messages, usage, tag=tag)
        except Exception as exc:  # noqa: BLE001 - any summary failure degrades to full context
            log.warning("summary_failed_using_full_context", error=str(exc))
            return None
        self._summary_for, self._summary = key, summary.strip()
        return self._summary
