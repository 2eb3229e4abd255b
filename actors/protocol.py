"""The OpenAI chat-completions wire format: the request schema, the response and chunk models,
and errors. Kept apart from the serving logic (as vLLM keeps `protocol.py` apart from
`serving_chat.py`): `actors/serving.py` parses with these models and replies with them.

Every request field of the API is named here. A field is honoured (the README's table says how)
or refused with a 400 naming it; an unknown field is refused as OpenAI does.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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

    def response(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code))

    def body(self) -> dict[str, Any]:
        return self.response().model_dump()


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def unsupported(param: str, what: str) -> APIError:
    return APIError(400, f"'{param}': {what}", param=param, code="unsupported_parameter")


# --- request ---------------------------------------------------------------------------------

# strict: JSON types as OpenAI checks them ("yes" is not a boolean, "0.5" not a number);
# extra="forbid": a field we would otherwise drop silently is refused, naming it.
_WIRE = ConfigDict(extra="forbid", strict=True)


class TextPart(BaseModel):
    model_config = _WIRE
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    model_config = _WIRE
    name: str
    arguments: str


class ToolCall(BaseModel):
    model_config = _WIRE
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = _WIRE
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant
    tool_call_id: str | None = None  # tool
    refusal: str | None = None  # assistant
    # An assistant turn as reasoning APIs return it; earlier reasoning is not sent upstream again.
    reasoning_content: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def wire(self) -> dict[str, Any]:
        """The message as the fuser's upstream gets it: text content, tool calls kept."""
        message: dict[str, Any] = {"role": self.role, "content": self.text() if self.content is not None else None}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class FunctionDefinition(BaseModel):
    model_config = _WIRE
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = _WIRE
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = _WIRE
    name: str


class NamedToolChoice(BaseModel):
    model_config = _WIRE
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(BaseModel):
    model_config = _WIRE
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = _WIRE
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("'json_schema' is required when type is 'json_schema'")
        return self


class StreamOptions(BaseModel):
    model_config = _WIRE
    include_usage: bool = False
    # We add no obfuscation padding to chunks, whatever this asks.
    include_obfuscation: bool | None = None


class ChatCompletionRequest(BaseModel):
    model_config = _WIRE

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Answer-shaping fields: sent to the fuser, the call that writes what the client reads.
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, int] | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # One answer per request.
    n: int | None = Field(None, ge=1, le=1)
    # Accepted, not sent upstream: identifiers and tags for the client's own bookkeeping (logged).
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    # Refused when set (see `refuse_unsupported`).
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    # Extensions: show or hide the live reasoning; a tighter deadline in seconds; the profile's
    # settings overridden for this request (same keys as a profile, plus budget_tokens).
    include_reasoning: bool | None = None
    deadline_s: float | None = Field(None, gt=0)
    token_killer: dict[str, Any] | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def answer_limit(self) -> int | None:
        """`max_completion_tokens` supersedes the older `max_tokens`."""
        return self.max_completion_tokens or self.max_tokens


def json_object(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object (of either wire format), or an APIError saying why not."""
    try:
        body = json.loads(raw)
    except UnicodeDecodeError as exc:
        raise APIError(400, f"Request body is not valid UTF-8: {exc.reason}.") from exc
    except json.JSONDecodeError as exc:
        raise APIError(400, f"We could not parse the JSON body of your request: {exc.msg}.") from exc
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.")
    return body


def parse_request(raw: bytes) -> ChatCompletionRequest:
    """Bytes from the wire to a validated request, or an APIError saying what is wrong."""
    body = json_object(raw)
    try:
        chat = ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        raise _invalid(exc) from exc
    refuse_unsupported(chat)
    check_messages(chat.messages)
    check_tools(chat)
    return chat


def _invalid(exc: ValidationError) -> APIError:
    # Of a union's alternatives, the deepest error is the one that says what is wrong
    # ("messages[0].content[0].type: Input should be 'text'", not "should be a string").
    error = max(exc.errors(), key=lambda e: len(e["loc"]))
    if error["type"] == "extra_forbidden":
        param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"]).lstrip(".")
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param)
    param = _param_name(error["loc"])
    return APIError(400, f"Invalid value for '{param}': {error['msg']}.", param=param)


def refuse_unsupported(chat: ChatCompletionRequest) -> None:
    """Fields we cannot honour: a 400 naming the field, never a silent drop."""
    if chat.modalities is not None and any(m != "text" for m in chat.modalities):
        raise unsupported("modalities", "only text output is supported.")
    refused = {
        "audio": "audio output is not supported.",
        "prediction": "predicted outputs are not supported.",
        "reasoning_effort": "choose how much to think with a profile (the model) or 'token_killer' overrides.",
        "verbosity": "not supported; ask for length in the messages or use max_completion_tokens.",
        "web_search_options": "web search is not supported.",
        "functions": "deprecated; use 'tools'.",
        "function_call": "deprecated; use 'tool_choice'.",
    }
    for field, why in refused.items():
        if getattr(chat, field) is not None:
            raise unsupported(field, why)
    if chat.store:
        raise unsupported("store", "stored completions are not supported.")
    if chat.service_tier not in (None, "auto", "default"):
        raise unsupported("service_tier", "only 'auto' and 'default' are supported.")
    if chat.top_logprobs is not None and not chat.logprobs:
        raise APIError(400, "'top_logprobs' requires 'logprobs' to be true.", param="top_logprobs")
    if isinstance(chat.stop, list) and len(chat.stop) > 4:
        raise APIError(400, "'stop' takes at most 4 sequences.", param="stop")


def check_messages(messages: list[ChatMessage]) -> None:
    """The message rules OpenAI applies."""
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        empty = message.content is None or (isinstance(message.content, list) and not message.content)
        if message.role in ("system", "developer", "user", "tool") and empty:
            raise APIError(400, f"'{where}.content': a {message.role} message needs content.", param=f"{where}.content")
        if message.role == "assistant" and empty and not message.tool_calls and message.refusal is None:
            raise APIError(
                400, f"'{where}': an assistant message needs content or tool_calls.", param=f"{where}.content"
            )
        if message.role == "tool" and not message.tool_call_id:
            raise APIError(
                400,
                f"'{where}.tool_call_id': a tool message needs the id of the call it answers.",
                param=f"{where}.tool_call_id",
            )
        if message.tool_calls is not None and message.role != "assistant":
            raise APIError(
                400, f"'{where}.tool_calls': only assistant messages carry tool calls.", param=f"{where}.tool_calls"
            )
    if not any(m.role == "user" for m in messages):
        raise APIError(400, "messages must contain at least one 'user' message.", param="messages")


def check_tools(chat: ChatCompletionRequest) -> None:
    if chat.tool_choice is not None and not chat.tools:
        raise APIError(400, "'tool_choice' is only allowed when 'tools' are specified.", param="tool_choice")
    if chat.parallel_tool_calls is not None and not chat.tools:
        raise APIError(
            400, "'parallel_tool_calls' is only allowed when 'tools' are specified.", param="parallel_tool_calls"
        )
    if isinstance(chat.tool_choice, NamedToolChoice):
        names = {tool.function.name for tool in chat.tools or ()}
        if chat.tool_choice.function.name not in names:
            raise APIError(
                400,
                f"'tool_choice' names '{chat.tool_choice.function.name}', which is not in 'tools'.",
                param="tool_choice",
            )


def _param_name(loc: tuple) -> str:
    # Drop pydantic's union-branch labels ("str", "list[TextPart]") so the name is the field path.
    parts = [p for p in loc if isinstance(p, int) or p in _FIELD_NAMES]
    name = ""
    for part in parts:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else part)
    return name or "body"


_FIELD_NAMES = set().union(
    *(
        model.model_fields
        for model in (
            ChatCompletionRequest,
            ChatMessage,
            TextPart,
            ToolCall,
            FunctionCall,
            Tool,
            FunctionDefinition,
            NamedToolChoice,
            NamedFunction,
            ResponseFormat,
            JSONSchemaFormat,
            StreamOptions,
        )
    ),
    {"schema"},
)


def answer_params(chat: ChatCompletionRequest) -> dict[str, Any]:
    """The client's answer-shaping fields, in wire form, for the fuser's upstream call."""
    params: dict[str, Any] = {}
    if chat.answer_limit is not None:
        params["max_tokens"] = chat.answer_limit
    for field in (
        "temperature",
        "top_p",
        "seed",
        "stop",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "parallel_tool_calls",
    ):
        value = getattr(chat, field)
        if value is not None:
            params[field] = value
    if chat.response_format is not None and chat.response_format.type != "text":
        params["response_format"] = chat.response_format.model_dump(by_alias=True, exclude_none=True)
    if chat.tools:
        params["tools"] = [tool.model_dump(exclude_none=True) for tool in chat.tools]
        if chat.tool_choice is not None:
            choice = chat.tool_choice
            params["tool_choice"] = choice if isinstance(choice, str) else choice.model_dump()
    return params


# --- responses -------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: CompletionTokensDetails


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    refusal: str | None = None


class Choice(BaseModel):
    index: int = 0
    message: ResponseMessage
    finish_reason: str
    logprobs: dict[str, Any] | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    token_killer: dict[str, Any]


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    token_killer: dict[str, Any] | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "token-killer"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
