"""The Responses API (`POST /v1/responses`): the request as an `Ask`, the run's reply as a
`response` object or as the Responses stream of events.

One of the two wire formats over the same run (the other is `actors/serving_chat.py`); the
checks, the run, the reasoning text, the usage and the errors are `actors/serving.py`'s. The
schema is `actors/protocol_responses.py`'s.

Output: a `reasoning` item whose summary is the threads' steps and verdicts (as chat's
`reasoning_content`), then a `message` item with the answer's `output_text`, or `function_call`
items. The stream: `response.created`, `response.in_progress`, the reasoning summary's deltas as
steps are written, `response.output_text.delta` per answer piece, `function_call_arguments`
deltas, each item's `.done` events, then `response.completed` (or `response.incomplete` when
the answer was cut) carrying the usage; a failure after the stream began is `response.failed`.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from actors.checking import Ask
from actors.pipeline import DeepThinkingRun
from actors.protocol import APIError, ChatMessage, FunctionCall, ToolCall
from actors.protocol_responses import (
    FunctionTool,
    InputFunctionCall,
    InputFunctionCallOutput,
    InputMessage,
    InputTokensDetails,
    OutputFunctionCall,
    OutputItem,
    OutputMessage,
    OutputReasoning,
    OutputTextContent,
    OutputTokensDetails,
    Response,
    ResponseError,
    ResponsesCall,
    ResponsesRequest,
    ResponseUsage,
    SummaryText,
    parse_responses_request,
)
from actors.schemas import UsageLedger
from actors.serving import Prepared, Reply, Said, Serving, reasoning_tokens

if TYPE_CHECKING:
    from actors.admission import Grant

# The client's names for what errors may name, where chat's differ.
NAMES = {"messages": "input", "response_format": "text.format"}
LOGPROBS = "message.output_text.logprobs"


class ResponsesServing(Serving):
    def prepare(self, raw: bytes, request_id: str, grant: Grant | None = None) -> Prepared:
        """Everything that can fail fast fails here, before any upstream call."""
        call = parse_responses_request(raw)
        return self.check(responses_ask(call), request_id, call, grant)

    async def complete(self, prepared: Prepared) -> Response:
        """A JSON reply: the whole run, then one `response` object."""
        reply, run = await self.whole(prepared)
        render = ResponsesRender(prepared)
        return render.response(render.output(reply), reply, run, self.extension(prepared, run))

    async def stream(self, prepared: Prepared) -> AsyncIterator[str]:
        """The Responses stream of events (see `Serving.sse`)."""
        return await self.sse(prepared, ResponsesRender(prepared))

    @staticmethod
    def encode(response: Response) -> str:
        return response.model_dump_json()


# --- the request as an Ask ---------------------------------------------------------------------


def responses_ask(call: ResponsesCall) -> Ask:
    request = call.request
    show = request.include_reasoning if request.include_reasoning is not None else request.summary_asked
    return Ask(
        model=request.model,
        messages=_messages(request, call.items),
        answer=_answer(request, call.functions),
        stream=request.stream,
        overrides=request.token_killer,
        deadline_s=request.deadline_s,
        include_reasoning=show,
        user=request.user or request.safety_identifier,
        metadata=request.metadata,
        effort=request.reasoning.effort if request.reasoning else None,
        truncate=request.truncation == "auto",
        names=NAMES,
    )


def _messages(request: ResponsesRequest, items: list) -> list[ChatMessage]:
    """The input items as chat messages: `instructions` first as a system message; calls join
    the assistant turn before them; reasoning sent back is not sent upstream again."""
    messages: list[ChatMessage] = []
    if request.instructions:
        messages.append(ChatMessage(role="system", content=request.instructions))
    calls: set[str] = set()
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if isinstance(item, InputMessage):
            text, refusal = _text(item.content)
            if item.role == "assistant":
                if text or refusal is not None:
                    messages.append(ChatMessage(role="assistant", content=text, refusal=refusal))
            elif not text:
                raise APIError(
                    400, f"'{where}.content': a {item.role} message needs content.", param=f"{where}.content"
                )
            else:
                messages.append(ChatMessage(role=item.role, content=text))
        elif isinstance(item, InputFunctionCall):
            calls.add(item.call_id)
            call = ToolCall(id=item.call_id, function=FunctionCall(name=item.name, arguments=item.arguments))
            last = messages[-1] if messages else None
            if last is not None and last.role == "assistant":
                last.tool_calls = [*(last.tool_calls or ()), call]
            else:
                messages.append(ChatMessage(role="assistant", content=None, tool_calls=[call]))
        elif isinstance(item, InputFunctionCallOutput):
            if item.call_id not in calls:
                raise APIError(
                    400,
                    f"'{where}.call_id': no function_call before it in 'input' has call_id '{item.call_id}'.",
                    param=f"{where}.call_id",
                )
            output = item.output if isinstance(item.output, str) else "\n".join(p["text"] for p in item.output)
            messages.append(ChatMessage(role="tool", tool_call_id=item.call_id, content=output))
    if not any(m.role == "user" for m in messages):
        raise APIError(400, "'input' must contain at least one user message.", param="input")
    return messages


def _text(content: str | list[dict[str, Any]]) -> tuple[str, str | None]:
    """A message's text (its text parts, one a line) and its refusal, if any."""
    if isinstance(content, str):
        return content, None
    text = "\n".join(p["text"] for p in content if p["type"] != "refusal")
    refusals = [p["refusal"] for p in content if p["type"] == "refusal"]
    return text, ("\n".join(refusals) if refusals else None)


def _answer(request: ResponsesRequest, functions: list[FunctionTool]) -> dict[str, Any]:
    """The client's answer-shaping fields, in the fuser's chat-completions wire form."""
    params: dict[str, Any] = {}
    if request.max_output_tokens is not None:
        params["max_tokens"] = request.max_output_tokens
    for field in ("temperature", "top_p"):
        value = getattr(request, field)
        if value is not None:
            params[field] = value
    if LOGPROBS in (request.include or ()) or request.top_logprobs:
        params["logprobs"] = True
        if request.top_logprobs is not None:
            params["top_logprobs"] = request.top_logprobs
    fmt = request.text.format if request.text else None
    if fmt is not None and fmt.type == "json_object":
        params["response_format"] = {"type": "json_object"}
    elif fmt is not None and fmt.type == "json_schema":
        schema = fmt.model_dump(include={"name", "description", "schema_", "strict"}, by_alias=True, exclude_none=True)
        params["response_format"] = {"type": "json_schema", "json_schema": schema}
    offered, choice = _tool_choice(request, functions)
    if offered:
        params["tools"] = [tool.chat() for tool in offered]
        if choice is not None:
            params["tool_choice"] = choice
        if request.parallel_tool_calls is not None:
            params["parallel_tool_calls"] = request.parallel_tool_calls
    return params


def _tool_choice(request: ResponsesRequest, functions: list[FunctionTool]) -> tuple[list[FunctionTool], Any]:
    """The functions offered to the model and the chat `tool_choice` for them."""
    choice = request.tool_choice
    if choice is None or choice in ("auto", "none"):
        return functions, choice if functions else None
    no_function = "none of 'tools' is a function this service can offer the model (it runs no built-in tools)"
    if choice == "required":
        if not functions:
            raise APIError(400, f"'tool_choice' is 'required', but {no_function}.", param="tool_choice")
        return functions, "required"
    kind = choice.get("type")
    if kind == "function":
        name = choice.get("name")
        if not any(f.name == name for f in functions):
            raise APIError(
                400, f"'tool_choice' names '{name}', which is not a function in 'tools'.", param="tool_choice"
            )
        return functions, {"type": "function", "function": {"name": name}}
    if kind == "allowed_tools":
        mode, listed = choice.get("mode"), choice.get("tools")
        if mode not in ("auto", "required") or not isinstance(listed, list):
            raise APIError(
                400, "'tool_choice': allowed_tools needs 'mode' (auto or required) and 'tools'.", param="tool_choice"
            )
        names = {t.get("name") for t in listed if isinstance(t, dict) and t.get("type") == "function"}
        allowed = [f for f in functions if f.name in names]
        if mode == "required" and not allowed:
            raise APIError(400, f"'tool_choice' requires a tool, but {no_function}.", param="tool_choice")
        return allowed, mode if allowed else None
    raise APIError(
        400,
        f"'tool_choice' forces a tool of type '{kind}', which this service does not run.",
        param="tool_choice",
        code="unsupported_parameter",
    )


# --- the reply ---------------------------------------------------------------------------------


def usage_of(usage: UsageLedger) -> ResponseUsage:
    """Exact sums of what the upstreams reported. Reasoning = every completion but the fuser's."""
    return ResponseUsage(
        input_tokens=usage.prompt_tokens,
        input_tokens_details=InputTokensDetails(cached_tokens=usage.cached_tokens),
        output_tokens=usage.completion_tokens,
        output_tokens_details=OutputTokensDetails(reasoning_tokens=reasoning_tokens(usage)),
        total_tokens=usage.total_tokens,
    )


class ResponsesRender:
    """One response's wire form: the `response` object, or the events of its stream.

    A stream opens each output item when its first piece arrives and closes it (its `.done`
    events) when the next item begins or the answer ends; every event is numbered."""

    def __init__(self, prepared: Prepared) -> None:
        self.prepared = prepared
        self.call: ResponsesCall = prepared.request
        rid = prepared.request_id
        self.id, self.reasoning_id, self.message_id = f"resp_{rid}", f"rs_{rid}", f"msg_{rid}"
        self.sequence = 0
        self.done: list[OutputItem] = []  # the stream's items written so far
        self.open: OutputItem | None = None  # and the one being written
        self.summary: list[str] = []  # the open reasoning item's summary, in pieces
        self.calls: dict[int, OutputFunctionCall] = {}  # by their index in the fuser's answer

    # --- the response object -----------------------------------------------------------------

    def output(self, reply: Reply) -> list[OutputItem]:
        """A whole reply's output items."""
        items: list[OutputItem] = []
        if reply.show_reasoning:
            summary = [SummaryText(text=reply.reasoning_text)] if reply.reasoning_text else []
            items.append(OutputReasoning(id=self.reasoning_id, summary=summary))
        if reply.text or not reply.tool_calls:
            content = [OutputTextContent(text=reply.text, logprobs=reply.logprobs)]
            items.append(OutputMessage(id=self.message_id, content=content, status=_status(reply)))
        for call in reply.tool_calls:
            function = call.get("function") or {}
            items.append(self._function_call(call, function.get("name"), function.get("arguments")))
        return items

    def response(
        self, output: list[OutputItem], reply: Reply | None, run: DeepThinkingRun | None, extension: dict | None
    ) -> Response:
        """The response object; without a `reply`, as a stream begins (in progress)."""
        request = self.call.request
        fields: dict[str, Any] = {"status": "in_progress" if reply is None else _status(reply)}
        if fields["status"] == "incomplete":
            cut = extension is not None and extension["fusion"]["reason"] == "deadline"
            fields["incomplete_details"] = {"reason": "deadline" if cut else "max_output_tokens"}
        if reply is not None:
            fields["completed_at"] = int(time.time())
        if run is not None:
            fields["usage"] = usage_of(run.stats.usage)
        if extension is not None:
            fields["token_killer"] = {**extension, "tools_not_shown": self.call.not_shown}
        return Response(
            id=self.id,
            created_at=self.prepared.created,
            model=self.prepared.profile,
            output=output,
            instructions=request.instructions,
            max_output_tokens=request.max_output_tokens,
            parallel_tool_calls=request.parallel_tool_calls is not False,
            reasoning=request.reasoning.model_dump(exclude_none=True) if request.reasoning else {},
            temperature=request.temperature,
            top_p=request.top_p,
            text=(request.text.model_dump(by_alias=True, exclude_none=True) if request.text else None)
            or {"format": {"type": "text"}},
            tool_choice=request.tool_choice or "auto",
            tools=request.tools or [],
            truncation=request.truncation or "disabled",
            metadata=request.metadata or {},
            user=request.user,
            safety_identifier=request.safety_identifier,
            prompt_cache_key=request.prompt_cache_key,
            **fields,
        )

    def _function_call(self, piece: dict[str, Any], name: str | None, arguments: str | None) -> OutputFunctionCall:
        index = len(self.calls) if piece.get("index") is None else piece["index"]
        rid = self.prepared.request_id
        return OutputFunctionCall(
            id=f"fc_{rid}_{index}",
            call_id=piece.get("id") or f"call_{rid}_{index}",
            name=name or "",
            arguments=arguments or "",
        )

    # --- the stream --------------------------------------------------------------------------

    def event(self, kind: str, **fields: Any) -> str:
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"

    def _lifecycle(self, kind: str, response: Response) -> str:
        return self.event(kind, response=response.model_dump(mode="json"))

    def opening(self) -> str:
        started = self.response([], None, None, None)
        return self._lifecycle("response.created", started) + self._lifecycle("response.in_progress", started)

    def said(self, said: Said) -> str:
        out: list[str] = []
        # Reasoning comes before the answer (thinking ends before fusion begins).
        if said.reasoning and (isinstance(self.open, OutputReasoning) or (self.open is None and not self.done)):
            if self.open is None:
                out.append(self._open(OutputReasoning(id=self.reasoning_id, summary=[], status="in_progress")))
                out.append(self._item_event("response.reasoning_summary_part.added", part=_summary("")))
            self.summary.append(said.reasoning)
            out.append(self._item_event("response.reasoning_summary_text.delta", delta=said.reasoning))
        if said.text or said.logprobs:
            if not isinstance(self.open, OutputMessage):
                out += self._close()
                out += self._open_message()
            content = self.open.content[0]
            content.text += said.text
            content.logprobs += said.logprobs
            out.append(self._item_event("response.output_text.delta", delta=said.text, logprobs=said.logprobs))
        for piece in said.tool_calls:
            function = piece.get("function") or {}
            item = self.calls.get(piece.get("index", 0))
            if item is None:
                out += self._close()
                item = self._function_call(piece, function.get("name"), "")
                item.status = "in_progress"
                self.calls[piece.get("index", 0)] = item
                out.append(self._open(item))
            elif function.get("name") and not item.name:  # as merge_tool_calls: the first name given
                item.name = function["name"]
            if function.get("arguments"):
                item.arguments += function["arguments"]
                out.append(self._item_event("response.function_call_arguments.delta", delta=function["arguments"]))
        return "".join(out)

    def ending(self, reply: Reply, run: DeepThinkingRun, extension: dict[str, Any]) -> str:
        status = _status(reply)
        out = self._close(status)
        if not any(isinstance(item, (OutputMessage, OutputFunctionCall)) for item in self.done):
            # An empty answer: its message item still comes, empty.
            out += self._open_message()
            out += self._close(status)
        final = self.response(self.done, reply, run, extension)
        kind = "response.completed" if status == "completed" else "response.incomplete"
        return "".join(out) + self._lifecycle(kind, final)

    def failure(self, error: APIError) -> str:
        if self.open is not None:  # cut short: kept as far as it got
            self.open.status = "incomplete"
            self._finish_summary()
            self.done.append(self.open)
            self.open = None
        failed = self.response(self.done, None, None, None)
        failed.status = "failed"
        failed.error = ResponseError(code=error.code or error.type, message=error.message)
        return self._lifecycle("response.failed", failed)

    def _open(self, item: OutputItem) -> str:
        self.open = item
        return self.event("response.output_item.added", output_index=len(self.done), item=_dump(item))

    def _open_message(self) -> list[str]:
        added = self._open(OutputMessage(id=self.message_id, content=[], status="in_progress"))
        self.open.content.append(OutputTextContent(text=""))
        return [added, self._item_event("response.content_part.added", part=_dump(self.open.content[0]))]

    def _close(self, status: str = "completed") -> list[str]:
        """The `.done` events of the item being written, if any."""
        item = self.open
        if item is None:
            return []
        out = []
        if isinstance(item, OutputReasoning):
            text = self._finish_summary()
            out.append(self._item_event("response.reasoning_summary_text.done", text=text))
            out.append(self._item_event("response.reasoning_summary_part.done", part=_summary(text)))
        elif isinstance(item, OutputMessage):
            content = item.content[0]
            out.append(self._item_event("response.output_text.done", text=content.text, logprobs=content.logprobs))
            out.append(self._item_event("response.content_part.done", part=_dump(content)))
        else:
            out.append(
                self._item_event("response.function_call_arguments.done", name=item.name, arguments=item.arguments)
            )
        item.status = status if isinstance(item, OutputMessage) else "completed"
        out.append(self.event("response.output_item.done", output_index=len(self.done), item=_dump(item)))
        self.done.append(item)
        self.open = None
        return out

    def _finish_summary(self) -> str:
        text = "".join(self.summary)
        if isinstance(self.open, OutputReasoning):
            self.open.summary = [SummaryText(text=text)] if text else []
        return text

    def _item_event(self, kind: str, **fields: Any) -> str:
        """An event about the item being written: its id and place, and where in it."""
        where: dict[str, Any] = {"item_id": self.open.id, "output_index": len(self.done)}
        if isinstance(self.open, OutputReasoning):
            where["summary_index"] = 0
        elif isinstance(self.open, OutputMessage):
            where["content_index"] = 0
        return self.event(kind, **where, **fields)


def _status(reply: Reply) -> str:
    return "incomplete" if reply.finish_reason == "length" else "completed"


def _dump(model) -> dict[str, Any]:
    return model.model_dump(mode="json")


def _summary(text: str) -> dict[str, str]:
    return {"type": "summary_text", "text": text}
