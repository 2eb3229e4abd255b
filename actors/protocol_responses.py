"""The Responses API wire format (`POST /v1/responses`): the request schema, the response and
its output items, and the names of the stream's events. Kept apart from the serving logic
(`actors/serving_responses.py`), as `actors/protocol.py` is for chat completions.

Every request field of the API is named here. A field is honoured, refused with a 400 naming it,
or (tools this service cannot run) accepted and not shown to the model; the README's table says
which. An unknown field is refused, as OpenAI does. The service is stateless: the request
carries the whole conversation, and nothing is stored to be fetched later.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from actors.protocol import APIError, json_object, unsupported

# strict: JSON types as OpenAI checks them; extra="forbid": a field we would otherwise drop
# silently is refused, naming it.
_WIRE = ConfigDict(extra="forbid", strict=True)

Status = Literal["in_progress", "completed", "incomplete"]
Effort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]

# --- request: the input items ------------------------------------------------------------------


class InputText(BaseModel):
    model_config = _WIRE
    type: Literal["input_text"]
    text: str
    prompt_cache_breakpoint: dict[str, Any] | None = None  # the service manages its own prefixes


class OutputText(BaseModel):
    """An assistant turn's text, as a client sends an earlier answer back."""

    model_config = _WIRE
    type: Literal["output_text"]
    text: str
    annotations: list[dict[str, Any]] = Field(default_factory=list)
    logprobs: list[dict[str, Any]] | None = None


class Refusal(BaseModel):
    model_config = _WIRE
    type: Literal["refusal"]
    refusal: str


class InputMessage(BaseModel):
    model_config = _WIRE
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[dict[str, Any]]  # parts are checked one by one (see `PARTS`)
    id: str | None = None
    status: Status | None = None
    phase: Literal["commentary", "final_answer"] | None = None


class InputFunctionCall(BaseModel):
    model_config = _WIRE
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: Status | None = None
    namespace: str | None = None
    caller: dict[str, Any] | None = None


class InputFunctionCallOutput(BaseModel):
    model_config = _WIRE
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[dict[str, Any]]  # text, or input_text parts
    id: str | None = None
    status: Status | None = None
    name: str | None = None
    namespace: str | None = None
    caller: dict[str, Any] | None = None


class InputReasoning(BaseModel):
    """Reasoning a client sends back: accepted, not sent upstream again (as chat's
    `reasoning_content`)."""

    model_config = _WIRE
    type: Literal["reasoning"]
    id: str | None = None
    summary: list[dict[str, Any]] = Field(default_factory=list)
    content: list[dict[str, Any]] | None = None
    encrypted_content: str | None = None
    status: Status | None = None


InputItem = InputMessage | InputFunctionCall | InputFunctionCallOutput | InputReasoning
ITEMS: dict[str, type[BaseModel]] = {
    "message": InputMessage,
    "function_call": InputFunctionCall,
    "function_call_output": InputFunctionCallOutput,
    "reasoning": InputReasoning,
}
PARTS: dict[str, type[BaseModel]] = {"input_text": InputText, "output_text": OutputText, "refusal": Refusal}

# --- request: tools and the answer's shape -----------------------------------------------------


class FunctionTool(BaseModel):
    model_config = _WIRE
    type: Literal["function"]
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None
    # Accepted, no effect: who may call it, tool search, the shape of its result.
    allowed_callers: list[str] | None = None
    defer_loading: bool | None = None
    output_schema: dict[str, Any] | None = None

    def chat(self) -> dict[str, Any]:
        """As the fuser's chat-completions call takes it."""
        function = self.model_dump(include={"name", "description", "parameters", "strict"}, exclude_none=True)
        return {"type": "function", "function": function}


class TextFormat(BaseModel):
    model_config = _WIRE
    type: Literal["text", "json_object", "json_schema"]
    # json_schema only
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(BaseModel):
    model_config = _WIRE
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningConfig(BaseModel):
    model_config = _WIRE
    effort: Effort | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None  # the older name of `summary`


class StreamOptions(BaseModel):
    model_config = _WIRE
    include_obfuscation: bool | None = None  # no padding is added, whatever this asks


INCLUDABLE = {
    "message.output_text.logprobs",  # honoured: the answer's logprobs
    "reasoning.encrypted_content",  # nothing is hidden: the summary is the whole reasoning
    # Outputs of tools the service never runs, and of input images it refuses: nothing to add.
    "web_search_call.action.sources",
    "web_search_call.results",
    "code_interpreter_call.outputs",
    "computer_call_output.output.image_url",
    "file_search_call.results",
    "message.input_image.image_url",
}


class ResponsesRequest(BaseModel):
    model_config = _WIRE

    model: str
    input: str | list[dict[str, Any]]  # items are checked one by one (see `ITEMS`)
    instructions: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Answer-shaping fields: sent to the fuser, the call that writes what the client reads.
    tools: list[dict[str, Any]] | None = None  # function tools are shown; other types are listed, not shown
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    top_logprobs: int | None = Field(None, ge=0, le=20)
    include: list[str] | None = None
    # How much to think (effort) and whether to show it (summary).
    reasoning: ReasoningConfig | None = None
    # Honoured: "disabled" refuses an input over the limits, "auto" drops its oldest items.
    truncation: Literal["auto", "disabled"] | None = None
    # Accepted, not sent upstream: identifiers and tags for the client's own bookkeeping.
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    client_metadata: dict[str, Any] | None = None  # Codex's
    service_tier: str | None = None
    store: bool | None = None
    max_tool_calls: int | None = Field(None, ge=0)  # built-in tool calls: this service makes none
    image: dict[str, Any] | None = None  # options for input images, which are refused
    # Refused when set: state kept by the server, and features of OpenAI's own.
    previous_response_id: str | None = None
    background: bool | None = None
    background_options: dict[str, Any] | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None
    context_management: list[dict[str, Any]] | None = None
    moderation: dict[str, Any] | None = None
    access_programs: dict[str, Any] | None = None
    # Extensions, as in chat completions.
    include_reasoning: bool | None = None
    deadline_s: float | None = Field(None, gt=0)
    token_killer: dict[str, Any] | None = None

    @property
    def summary_asked(self) -> bool | None:
        """Whether the client asked for the reasoning summary: None when it did not say."""
        reasoning = self.reasoning
        if reasoning is None or not ({"summary", "generate_summary"} & reasoning.model_fields_set):
            return None
        return (reasoning.summary or reasoning.generate_summary) is not None


@dataclass(frozen=True)
class ResponsesCall:
    """A parsed request: the body, its input items, the function tools shown to the model and
    the tools that are not (built-in and grouping types: the service cannot run them)."""

    request: ResponsesRequest
    items: list[InputItem]
    functions: list[FunctionTool]
    not_shown: list[dict[str, str]]


def parse_responses_request(raw: bytes) -> ResponsesCall:
    """Bytes from the wire to a validated request, or an APIError saying what is wrong (naming
    the field, e.g. `input[2].content[0].type`)."""
    request = _validated(ResponsesRequest, json_object(raw), "")
    _refuse_unsupported(request)
    if isinstance(request.input, str):
        items: list[InputItem] = [InputMessage(role="user", content=request.input)]
    else:
        items = [_item(item, f"input[{i}]") for i, item in enumerate(request.input)]
    if not items:
        raise APIError(400, "'input' must hold at least one item.", param="input")
    functions, not_shown = [], []
    for i, tool in enumerate(request.tools or ()):
        kind = tool.get("type")
        if not isinstance(kind, str):
            raise APIError(400, f"'tools[{i}].type': a tool needs a type.", param=f"tools[{i}].type")
        if kind == "function":
            functions.append(_validated(FunctionTool, tool, f"tools[{i}]"))
        else:
            name = tool.get("name")
            not_shown.append({"type": kind, **({"name": name} if isinstance(name, str) else {})})
    return ResponsesCall(request, items, functions, not_shown)


def _item(item: Any, where: str) -> InputItem:
    if not isinstance(item, dict):
        raise APIError(400, f"Invalid value for '{where}': an input item must be an object.", param=where)
    kind = item.get("type", "message")
    model = ITEMS.get(kind)
    if model is None:
        raise APIError(
            400,
            f"'{where}.type': items of type '{kind}' are not supported here; this service takes message, "
            f"function_call, function_call_output and reasoning items (it stores nothing to refer to).",
            param=f"{where}.type",
            code="unsupported_parameter",
        )
    parsed = _validated(model, item, where)
    if isinstance(parsed, InputMessage) and isinstance(parsed.content, list):
        for j, part in enumerate(parsed.content):
            _part(part, f"{where}.content[{j}]")
    if isinstance(parsed, InputFunctionCallOutput) and isinstance(parsed.output, list):
        for j, part in enumerate(parsed.output):
            _part(part, f"{where}.output[{j}]", allowed=("input_text",))
    return parsed


def _part(part: Any, where: str, allowed: tuple[str, ...] = tuple(PARTS)) -> BaseModel:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind not in allowed:
        what = f"'{kind}' parts are" if isinstance(kind, str) else "this part is"
        raise APIError(
            400,
            f"'{where}.type': {what} not supported; this service reads text only.",
            param=f"{where}.type",
            code="unsupported_parameter",
        )
    return _validated(PARTS[kind], part, where)


def _validated(model: type[BaseModel], body: dict, where: str):
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        error = max(exc.errors(), key=lambda e: len(e["loc"]))  # the deepest says what is wrong
        param = _path(where, error["loc"])
        if error["type"] == "extra_forbidden":
            raise APIError(400, f"Unrecognized request argument supplied: {param}", param=param) from None
        raise APIError(400, f"Invalid value for '{param}': {error['msg']}.", param=param) from None


def _path(where: str, loc: tuple) -> str:
    # Drop pydantic's union-branch labels ("str", "list[...]", "function-after[...]").
    path = where
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif "[" not in part and part not in ("str", "int", "bool", "float", "dict", "list"):
            path += f".{part}" if path else part
    return path or "body"


def _refuse_unsupported(request: ResponsesRequest) -> None:
    """Fields we cannot honour: a 400 naming the field, never a silent drop."""
    stored = "this service is stateless and stores no responses; send the whole conversation in 'input'."
    refused = {
        "previous_response_id": stored,
        "conversation": stored,
        "prompt": "stored prompt templates are not supported; send the text in 'instructions' or 'input'.",
        "background_options": "background responses are not supported.",
        "context_management": "server-side compaction is not supported; the request carries its own context.",
        "moderation": "moderation is not supported.",
        "access_programs": "not supported.",
    }
    for field, why in refused.items():
        if getattr(request, field) is not None:
            raise unsupported(field, why)
    if request.store:
        raise unsupported("store", stored)
    if request.background:
        raise unsupported("background", "background responses are not supported; use 'stream' instead.")
    if request.service_tier not in (None, "auto", "default"):
        raise unsupported("service_tier", "only 'auto' and 'default' are supported.")
    if request.text is not None and request.text.verbosity is not None:
        raise unsupported("text.verbosity", "not supported; ask for length in the input or use max_output_tokens.")
    for i, name in enumerate(request.include or ()):
        if name not in INCLUDABLE:
            raise APIError(
                400,
                f"Invalid value for 'include[{i}]': '{name}' is not something a response can include.",
                param=f"include[{i}]",
            )
    fmt = request.text.format if request.text else None
    if fmt is not None and fmt.type == "json_schema" and (fmt.name is None or fmt.schema_ is None):
        raise APIError(400, "'text.format': a json_schema format needs 'name' and 'schema'.", param="text.format")


# --- the response ------------------------------------------------------------------------------


class SummaryText(BaseModel):
    type: Literal["summary_text"] = "summary_text"
    text: str


class OutputReasoning(BaseModel):
    id: str
    type: Literal["reasoning"] = "reasoning"
    summary: list[SummaryText]
    encrypted_content: str | None = None
    status: Status = "completed"


class OutputTextContent(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[dict[str, Any]] = Field(default_factory=list)
    logprobs: list[dict[str, Any]] = Field(default_factory=list)


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: Status = "completed"
    content: list[OutputTextContent]


class OutputFunctionCall(BaseModel):
    id: str
    type: Literal["function_call"] = "function_call"
    call_id: str
    name: str
    arguments: str
    status: Status = "completed"


OutputItem = OutputReasoning | OutputMessage | OutputFunctionCall


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class ResponseError(BaseModel):
    code: str
    message: str


class Response(BaseModel):
    """The response object: the JSON reply, and the `response` of the stream's lifecycle events."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    completed_at: int | None = None
    error: ResponseError | None = None
    incomplete_details: dict[str, str] | None = None
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    instructions: str | None = None
    max_output_tokens: int | None = None
    parallel_tool_calls: bool = True
    previous_response_id: None = None
    reasoning: dict[str, Any] = Field(default_factory=dict)
    store: bool = False
    temperature: float | None = None
    top_p: float | None = None
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    tool_choice: str | dict[str, Any] = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    truncation: str = "disabled"
    metadata: dict[str, str] = Field(default_factory=dict)
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    usage: ResponseUsage | None = None
    token_killer: dict[str, Any] | None = None
