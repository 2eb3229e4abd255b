"""The OpenAI chat-completions wire format: request parsing, response and chunk shapes, errors.

Kept apart from the serving logic (as vLLM does): the ingress parses with these models and
builds replies with these functions; nothing else knows the wire format.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from actors.schemas import ChatTurn, Conversation, UsageLedger

FUSER_ROLE = "fuser"


# --- errors ----------------------------------------------------------------------------------


class APIError(Exception):
    """An error the client sees, in the OpenAI shape, with its HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        }


# --- request ---------------------------------------------------------------------------------


# strict: JSON types as OpenAI checks them ("yes" is not a boolean, "0.5" not a number);
# extra="allow": unknown fields are ignored, as OpenAI clients expect.
_WIRE = ConfigDict(extra="allow", strict=True)


class TextPart(BaseModel):
    model_config = _WIRE
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = _WIRE
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = _WIRE
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = _WIRE

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    n: int | None = Field(None, ge=1, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    # Extension: hide or show the live reasoning for this request (overrides the config).
    include_reasoning: bool | None = None
    # Extension: a tighter deadline for this request, in seconds (the config's is the ceiling).
    deadline_s: float | None = Field(None, gt=0)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def parse_request(raw: bytes) -> ChatCompletionRequest:
    """Bytes from the wire to a validated request, or an APIError saying what is wrong."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(400, f"Request body is not valid UTF-8: {exc.reason}.") from exc
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise APIError(400, f"We could not parse the JSON body of your request: {exc.msg}.") from exc
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.")
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        # Of a union's alternatives, the deepest error is the one that says what is wrong
        # ("messages[0].content[0].type: Input should be 'text'", not "should be a string").
        errors = exc.errors()
        error = max(errors, key=lambda e: len(e["loc"]))
        param = _param_name(error["loc"])
        raise APIError(400, f"Invalid value for '{param}': {error['msg']}.", param=param) from exc


def enforce_limits(chat: ChatCompletionRequest, max_messages: int, max_total_chars: int) -> None:
    """Refuse requests larger than the service takes, before any upstream call is made."""
    if len(chat.messages) > max_messages:
        raise APIError(
            400,
            f"Too many messages: {len(chat.messages)}; this service takes at most {max_messages}.",
            param="messages",
            code="too_many_messages",
        )
    total = sum(len(m.text()) for m in chat.messages)
    if total > max_total_chars:
        raise APIError(
            400,
            f"The messages hold {total} characters; this service takes at most {max_total_chars}.",
            param="messages",
            code="context_length_exceeded",
        )


def _param_name(loc: tuple) -> str:
    # Drop pydantic's union-branch labels ("str", "list[TextPart]") so the name is the field path.
    parts = [p for p in loc if isinstance(p, int) or p in _FIELD_NAMES]
    name = ""
    for part in parts:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else part)
    return name or "body"


_FIELD_NAMES = set(ChatCompletionRequest.model_fields) | set(ChatMessage.model_fields) | {
    "include_usage",
    "type",
    "text",
}


def to_conversation(request: ChatCompletionRequest) -> Conversation:
    """Every message counts: system/developer text, earlier turns, and the question."""
    system = [m.text() for m in request.messages if m.role in ("system", "developer")]
    turns = [m for m in request.messages if m.role not in ("system", "developer")]
    question_at = max((i for i, m in enumerate(turns) if m.role == "user"), default=None)
    if question_at is None:
        raise APIError(400, "messages must contain at least one 'user' message.", param="messages")
    history = tuple(
        ChatTurn(
            "assistant" if m.role == "assistant" else "user",
            m.text() if m.role in ("user", "assistant") else f"[{m.role} result] {m.text()}",
        )
        for i, m in enumerate(turns)
        if i != question_at
    )
    return Conversation(
        question=turns[question_at].text(), system="\n\n".join(s for s in system if s), history=history
    )


# --- responses -------------------------------------------------------------------------------


def usage_body(usage: UsageLedger) -> dict[str, Any]:
    """Exact sums of what the upstreams reported. Reasoning = every completion but the fuser's."""
    completion = usage.completion_tokens
    fuser = usage.roles.get(FUSER_ROLE)
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": usage.prompt_tokens + completion,
        "completion_tokens_details": {
            "reasoning_tokens": completion - (fuser.completion_tokens if fuser else 0)
        },
    }


def usage_by_role(usage: UsageLedger) -> dict[str, dict[str, Any]]:
    return {
        role: {
            "calls": u.calls,
            "failed_calls": u.failed_calls,
            "prompt_tokens": u.prompt_tokens,
            "completion_tokens": u.completion_tokens,
            "seconds": round(u.seconds, 3),
        }
        for role, u in sorted(usage.roles.items())
    }


def completion_body(
    *,
    id: str,
    created: int,
    model: str,
    content: str,
    reasoning: str | None,
    usage: UsageLedger,
    extension: dict[str, Any],
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    return {
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}],
        "usage": usage_body(usage),
        "token_killer": extension,
    }


def chunk_body(
    *,
    id: str,
    created: int,
    model: str,
    delta: dict[str, Any] | None,
    finish_reason: str | None = None,
    include_usage: bool = False,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish_reason, "logprobs": None}],
    }
    if include_usage:
        body["usage"] = None  # only the final usage chunk carries it
    return body


def sse(data: dict[str, Any] | str) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n"
