"""What a thread sees of its own earlier steps before it writes the next one.

- `full`: every earlier step;
- `minimal`: only the previous step;
- `smart`: the first step in full (it frames the problem), a summary of the middle steps made by
  the summarizer model, and the last `preserve_recent_steps` in full. With
  `economy.incremental_summary` the summary is updated from the previous one plus the steps newly
  evicted from the recent window, instead of summarizing every middle step again. A failed (or
  unaffordable) summary falls back to the full text of the middle steps: a longer prompt is
  better than a lost step.
"""

from __future__ import annotations

import structlog

from actors.budget import TokenBudget
from actors.config import ContextConfig
from actors.model_client import ModelClient
from actors.prompts import PromptSet, summarizer_messages
from actors.schemas import Step, UsageLedger

log = structlog.get_logger(__name__)


class ContextBuilder:
    """One per thread: it remembers the summaries it made, keyed by the steps they cover."""

    def __init__(
        self, config: ContextConfig, prompts: PromptSet, summarizer: ModelClient, *, incremental: bool
    ) -> None:
        self.config = config
        self.prompts = prompts
        self.summarizer = summarizer
        self.incremental = incremental
        self._summaries: dict[tuple[tuple[int, str], ...], str] = {}

    async def build(
        self,
        steps: list[Step],
        usage: UsageLedger,
        tag: str = "",
        *,
        budget: TokenBudget | None = None,
        deadline: float | None = None,
    ) -> str:
        """The context text for the step after `steps` ("" for the first step)."""
        if not steps:
            return ""
        if self.config.strategy == "minimal":
            return self._render(steps[-1:])
        recent = self.config.preserve_recent_steps
        if self.config.strategy == "full" or len(steps) <= recent + 1:
            return self._render(steps)
        first, middle, last = steps[:1], steps[1:-recent], steps[-recent:]
        summary = await self._summary(middle, usage, tag, budget, deadline)
        if summary is None:
            return self._render(steps)
        return (
            self._render(first) + self.prompts.context_summary.format(summary=summary) + "\n" + self._steps(last) + "\n"
        )

    def _render(self, steps: list[Step]) -> str:
        return self.prompts.context_header + "\n" + self._steps(steps) + "\n"

    def _steps(self, steps: list[Step]) -> str:
        return "\n".join(self.prompts.context_step.format(step_number=s.index + 1, text=s.text) for s in steps)

    async def _summary(
        self, middle: list[Step], usage: UsageLedger, tag: str, budget: TokenBudget | None, deadline: float | None
    ) -> str | None:
        key = tuple((s.index, s.text) for s in middle)
        if key in self._summaries:
            return self._summaries[key]
        previous, new = None, middle
        if self.incremental:
            # The longest middle already summarized that this one extends: fold in only the rest.
            for cut in range(len(middle) - 1, 0, -1):
                if key[:cut] in self._summaries:
                    previous, new = self._summaries[key[:cut]], middle[cut:]
                    break
        messages = summarizer_messages(self.prompts, self._steps(new), previous)
        reservation = None
        if budget is not None and budget.bounded:
            reservation = await budget.acquire(
                self.summarizer.estimate_prompt(messages) + self.summarizer.model.max_tokens
            )
            if reservation is None:
                return None
        spent = UsageLedger()
        try:
            summary = (await self.summarizer.complete(messages, spent, tag=tag, deadline=deadline)).strip()
        except Exception as exc:  # noqa: BLE001 - any summary failure degrades to full context
            log.warning("summary_failed_using_full_context", error=type(exc).__name__)
            return None
        finally:
            usage.merge(spent)
            if reservation is not None:
                budget.settle(reservation, spent.total_tokens)
        self._summaries[key] = summary
        return summary
