"""Chat completions: the request as an `Ask`, the run's reply as a `chat.completion` or as
`chat.completion.chunk` SSE events.

One of the two wire formats over the same run (the other is `actors/serving_responses.py`);
the checks, the run, the reasoning text, the usage and the errors are `actors/serving.py`'s.
The schema is `actors/protocol.py`'s.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from actors.checking import Ask
from actors.pipeline import DeepThinkingRun
from actors.protocol import (
    APIError,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    CompletionTokensDetails,
    Delta,
    PromptTokensDetails,
    ResponseMessage,
    Usage,
    answer_params,
    parse_request,
)
from actors.schemas import UsageLedger
from actors.serving import Prepared, Reply, Said, Serving, reasoning_tokens

if TYPE_CHECKING:
    from actors.admission import Grant


class ChatServing(Serving):
    def prepare(self, raw: bytes, request_id: str, grant: Grant | None = None) -> Prepared:
        """Everything that can fail fast fails here, before any upstream call."""
        chat = parse_request(raw)
        return self.check(chat_ask(chat), request_id, chat, grant)

    async def complete(self, prepared: Prepared) -> ChatCompletion:
        """A JSON reply: the whole run, then one body."""
        reply, run = await self.whole(prepared)
        return self.render(prepared).completion(reply, run, self.extension(prepared, run))

    async def stream(self, prepared: Prepared) -> AsyncIterator[str]:
        """SSE lines, ending in `data: [DONE]` (see `Serving.sse`)."""
        return await self.sse(prepared, self.render(prepared))

    def render(self, prepared: Prepared) -> ChatRender:
        return ChatRender(prepared, self.config.reasoning_fields)

    @staticmethod
    def encode(completion: ChatCompletion) -> str:
        # exclude_unset: the reasoning and tool calls only when there are any (see `completion`).
        return completion.model_dump_json(exclude_unset=True)


def chat_ask(chat: ChatCompletionRequest) -> Ask:
    return Ask(
        model=chat.model,
        messages=chat.messages,
        answer=answer_params(chat),
        stream=chat.stream,
        overrides=chat.token_killer,
        deadline_s=chat.deadline_s,
        include_reasoning=chat.include_reasoning,
        user=chat.user or chat.safety_identifier,
        metadata=chat.metadata,
    )


def usage_of(usage: UsageLedger) -> Usage:
    """Exact sums of what the upstreams reported. Reasoning = every completion but the fuser's."""
    completion = usage.completion_tokens
    return Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=completion,
        total_tokens=usage.prompt_tokens + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=usage.cached_tokens),
        completion_tokens_details=CompletionTokensDetails(reasoning_tokens=reasoning_tokens(usage)),
    )


class ChatRender:
    """One chat reply's wire form: the JSON body, or the chunks of its stream."""

    def __init__(self, prepared: Prepared, reasoning_fields: tuple[str, ...] = ("reasoning_content",)) -> None:
        self.prepared = prepared
        self.chat: ChatCompletionRequest = prepared.request
        self.id = f"chatcmpl-{prepared.request_id}"
        self.reasoning_fields = reasoning_fields  # the names the reasoning goes under

    def _reasoning(self, text: str) -> dict[str, str]:
        return dict.fromkeys(self.reasoning_fields, text)

    # --- JSON --------------------------------------------------------------------------------

    def completion(self, reply: Reply, run: DeepThinkingRun, extension: dict[str, Any]) -> ChatCompletion:
        """Dumped with exclude_unset: fields OpenAI always sends are set (null or not); the
        reasoning and tool calls only when there are any."""
        content = reply.text
        message = ResponseMessage(
            role="assistant", content=content if content or not reply.tool_calls else None, refusal=None
        )
        if reply.show_reasoning:
            for name, text in self._reasoning(reply.reasoning_text).items():
                setattr(message, name, text)
        if reply.tool_calls:
            message.tool_calls = reply.tool_calls
        choice = Choice(
            index=0,
            message=message,
            finish_reason=reply.finish_reason,
            logprobs={"content": reply.logprobs} if reply.logprobs else None,
        )
        return ChatCompletion(
            id=self.id,
            object="chat.completion",
            created=self.prepared.created,
            model=self.prepared.profile,
            choices=[choice],
            usage=usage_of(run.stats.usage),
            token_killer=extension,
        )

    # --- SSE ---------------------------------------------------------------------------------

    def opening(self) -> str:
        return self.chunk(Delta(role="assistant", content=""))

    def said(self, said: Said) -> str:
        """A batch's reasoning and answer as at most two chunks: reasoning first, then the
        answer (never both in one chunk, as reasoning APIs do)."""
        lines = []
        if said.reasoning:
            lines.append(self.chunk(Delta(**self._reasoning(said.reasoning))))
        if said.text or said.tool_calls or said.logprobs:
            delta = Delta(content=said.text) if said.text else Delta()
            if said.tool_calls:
                delta.tool_calls = said.tool_calls
            lines.append(self.chunk(delta, logprobs=said.logprobs))
        return "".join(lines)

    def ending(self, reply: Reply, run: DeepThinkingRun, extension: dict[str, Any]) -> str:
        ending = self.chunk(Delta(), finish_reason=reply.finish_reason)
        if self.chat.include_usage:
            ending += self.usage_chunk(run, extension)
        return ending + "data: [DONE]\n\n"

    def failure(self, error: APIError) -> str:
        return "data: " + error.response().model_dump_json() + "\n\n" + "data: [DONE]\n\n"

    def chunk(self, delta: Delta, *, finish_reason: str | None = None, logprobs: list | None = None) -> str:
        # Dumped with exclude_unset: a delta carries only what it sets ({"content": "x"}), while
        # finish_reason, logprobs and (with include_usage) usage are always there, null or not.
        choice = ChunkChoice(
            index=0, delta=delta, finish_reason=finish_reason, logprobs={"content": logprobs} if logprobs else None
        )
        fields: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.prepared.created,
            "model": self.prepared.profile,
            "choices": [choice],
        }
        if self.chat.include_usage:
            fields["usage"] = None  # only the final usage chunk carries it
        return f"data: {ChatCompletionChunk(**fields).model_dump_json(exclude_unset=True)}\n\n"

    def usage_chunk(self, run: DeepThinkingRun, extension: dict[str, Any]) -> str:
        chunk = ChatCompletionChunk(
            id=self.id,
            created=self.prepared.created,
            model=self.prepared.profile,
            choices=[],
            usage=usage_of(run.stats.usage),
            token_killer=extension,
        )
        return f"data: {chunk.model_dump_json()}\n\n"
