"""A simulated OpenAI-compatible upstream LLM server.

It is the project's only stand-in for real upstream providers, used by tests and
by the benchmark. Answers are scripted (``Rule``), faults can be scripted or
injected at random, and every call is recorded (``CallRecord``) so tests can check
exact token accounting and cancellation.

Tokens are whitespace-separated words, so expected usage is easy to compute by hand.

Beyond plain text it speaks the request fields real providers honour, so callers can be
tested on them: ``n`` choices (or ignores it, like some providers: ``supports_n=False``),
``logprobs`` / ``top_logprobs``, ``tools`` / ``tool_choice`` (and ``Rule.tool_call``),
``response_format`` (``json_object`` and ``json_schema``), ``stop``, and a prefix cache
reported as ``usage.prompt_tokens_details.cached_tokens`` (``prefix_cache=True``).
A feature the request does not use costs a dict lookup at most.

CLI (for the benchmark):
    python -m tests.simulated_upstream --port 9100 --latency 0.2 [--token-interval 0.0]
        [--scenario pass] [--complete-at 2] [--no-n] [--prefix-cache]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import signal
import threading
import time
import uuid
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

FAULTS = ("500", "502", "503", "429", "400", "401", "hang", "malformed", "drop", "reset")

# OpenAI-shaped error bodies: (type, code) per status.
_ERRORS = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("authentication_error", "invalid_api_key"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    500: ("server_error", "internal_error"),
    502: ("server_error", "bad_gateway"),
    503: ("server_error", "service_unavailable"),
}

# A word plus the whitespace before it: joining pieces gives back the original text
# (newlines included), while the piece count is exactly the word count.
_PIECE = re.compile(r"\s*\S+")

# Values of generated JSON: tool-call arguments (only `required` properties) and
# response_format json_schema instances (every property).
_TOOL_ARG_VALUES = {"string": "x", "integer": 1, "number": 1.5, "boolean": True}
_SCHEMA_VALUES = {"string": "text", "integer": 42, "number": 4.2, "boolean": True}


def default_reply(request_json: dict) -> str:
    return "Simulated answer."


def count_words(text: str) -> int:
    return len(text.split())


def message_text(content: Any) -> str:
    """Text of one message content: a string or a list of {"type": "text"} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def prompt_text(messages: list) -> str:
    return "\n".join(message_text(m.get("content")) for m in messages if isinstance(m, dict))


def split_reply(reply: str, max_tokens: int | None) -> tuple[list[str], str]:
    """Word pieces actually served, and the finish_reason."""
    pieces = _PIECE.findall(reply.strip())
    if max_tokens is not None and len(pieces) > max_tokens:
        return pieces[: max(max_tokens, 0)], "length"
    return pieces, "stop"


def cut_at_stop(text: str, stop: Any) -> str:
    """`text` up to (not including) the first occurrence of any stop string."""
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    found = [i for s in stops if isinstance(s, str) and s and (i := text.find(s)) >= 0]
    return text[: min(found)] if found else text


def schema_instance(schema: Any, root: Any = None, depth: int = 0) -> Any:
    """A JSON instance of a JSON schema: every object property, one array item, the first
    enum value / anyOf branch / non-null type; `$ref`s into `$defs` resolved."""
    root = schema if root is None else root
    if not isinstance(schema, dict) or depth > 32:  # depth: recursive models end in null
        return None
    if isinstance(schema.get("$ref"), str):
        return schema_instance(_resolve_ref(root, schema["$ref"]), root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            return schema_instance(schema[key][0], root, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):  # ["string", "null"]: the first real type
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and "properties" in schema):
        props = schema.get("properties") or {}
        return {name: schema_instance(sub, root, depth + 1) for name, sub in props.items()}
    if kind == "array":
        return [schema_instance(schema.get("items") or {}, root, depth + 1)]
    return _SCHEMA_VALUES.get(kind) if isinstance(kind, str) else None


def _resolve_ref(root: Any, ref: str) -> Any:
    """A local JSON pointer ("#/$defs/Item"); anything else resolves to nothing."""
    if not ref.startswith("#"):
        return None
    node = root
    for part in ref[1:].split("/"):
        if part:
            part = part.replace("~1", "/").replace("~0", "~")
            node = node.get(part) if isinstance(node, dict) else None
    return node


def format_reply(text: str, response_format: Any) -> str:
    """The reply as the requested response_format would shape it (text otherwise)."""
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "json_object":
        return json.dumps({"answer": text})
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        return json.dumps(schema_instance(schema))
    return text


def forced_tool_call(req: dict) -> dict | None:
    """The call `tool_choice` forces ("required": the first tool; a named function: that one),
    as {"name", "arguments"}, arguments built from the schema's required properties."""
    tools, choice = req.get("tools"), req.get("tool_choice")
    if not tools or not isinstance(tools, list):
        return None
    functions = [t.get("function") or {} for t in tools if isinstance(t, dict)]
    if choice == "required":
        function = functions[0] if functions else {}
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        function = next((f for f in functions if f.get("name") == name), {"name": name})
    else:
        return None
    params = function.get("parameters") or {}
    props = params.get("properties") or {}
    arguments = {}
    for name in params.get("required") or []:
        kind = (props.get(name) or {}).get("type")
        arguments[name] = _TOOL_ARG_VALUES.get(kind) if isinstance(kind, str) else None
    return {"name": function.get("name") or "", "arguments": arguments}


def logprob_entry(piece: str, top: int) -> dict:
    """Deterministic logprobs of one piece (from its length); top_logprobs lead with the piece."""
    logprob = round(-0.01 * (1 + len(piece) % 10), 2)
    alternatives = [{"token": piece, "logprob": logprob, "bytes": list(piece.encode())}]
    for j in range(1, top):
        alt = f" alt{j}"
        alternatives.append({"token": alt, "logprob": logprob - j, "bytes": list(alt.encode())})
    return {"token": piece, "logprob": logprob, "bytes": list(piece.encode()), "top_logprobs": alternatives[:top]}


@dataclass
class Rule:
    """A scripted answer: first live rule matching model and prompt text wins."""

    model: str | None = None  # exact match on request "model"; None = any
    contains: str | None = None  # case-insensitive substring of all message text; None = any
    reply: str | Callable[[dict], str] | None = None  # None = default_reply
    fault: str | None = None  # one of FAULTS
    retry_after: float | None = None  # Retry-After for a "429" fault (default: retry_after_s)
    times: int | None = None  # matches this many times then expires; None = forever
    latency: float | None = None  # overrides the server latency
    # Answer with this tool call instead of text: {"name": ..., "arguments": {...} or a JSON string}.
    tool_call: dict | None = None

    def __post_init__(self) -> None:
        if self.fault is not None and self.fault not in FAULTS:
            raise ValueError(f"unknown fault {self.fault!r}; expected one of {FAULTS}")

    def matches(self, model: str | None, text_lower: str) -> bool:
        if self.model is not None and self.model != model:
            return False
        return self.contains is None or self.contains.lower() in text_lower


@dataclass
class CallRecord:
    """What the upstream saw and actually served for one request."""

    model: str | None
    messages: list
    request: dict
    role: str | None  # `contains` of the matched rule; None for default reply / random fault
    stream: bool
    tag: str | None  # X-Request-Tag request header
    call_id: str | None  # X-Call-Id request header: the same on every attempt of one call
    authorization: str | None  # Authorization request header (to check keys are sent)
    started: float  # time.monotonic()
    finished: float | None = None
    status: int | str | None = None  # HTTP status, or "drop" / "hang" / "reset"
    fault: str | None = None
    prompt_tokens: int = 0
    # Words actually sent, summed over choices (0 for faults; for a "reset" stream, those sent
    # before the cut; for a "reset" JSON body, 0: nothing usable reached the client).
    completion_tokens: int = 0
    finish_reason: str | None = None  # of choice 0
    usage_reported: bool = False  # the usage block reached the client
    completed: bool = False  # a successful response was fully sent
    cancelled: bool = False  # client went away (or server stopped) before completion
    n: int = 1  # choices asked for (request "n"); served only with supports_n
    cached_tokens: int = 0  # prompt words served from the prefix cache (prefix_cache only)


@dataclass
class _Choice:
    """One choice's pieces as served: words of the text, or a tool call's pieces (the name
    piece first, then argument fragments): each piece is one completion token."""

    pieces: list[str]
    finish: str
    tool_call_id: str | None = None  # set when the choice is a tool call
    logprobs: list[dict] | None = None  # one entry per piece, when asked for


class SimulatedUpstream:
    """aiohttp server speaking the OpenAI chat completions API."""

    def __init__(
        self,
        *,
        latency: float = 0.0,
        token_interval: float = 0.0,
        seed: int | None = 0,
        default_reply: Callable[[dict], str] = default_reply,
        fault_rates: dict[str, float] | None = None,
        retry_after_s: float = 1.0,
        models: tuple[str, ...] = ("simulated",),
        max_records: int | None = None,
        supports_n: bool = True,
        prefix_cache: bool = False,
        cache_block: int = 16,
        cache_entries: int = 4096,
    ) -> None:
        self.latency = latency
        self.token_interval = token_interval
        self.default_reply = default_reply
        self.fault_rates: dict[str, float] = dict(fault_rates or {})
        self.retry_after_s = retry_after_s
        self.models = models
        # False: "n" is ignored and one choice comes back, as from providers without it.
        self.supports_n = supports_n
        # Prefix cache: a call's cached_tokens is the longest prefix of its prompt words, in
        # whole cache_blocks, that an earlier call's prompt started with. Off: usage carries
        # no prompt_tokens_details at all (like providers without caching).
        self.prefix_cache = prefix_cache
        self.cache_block = cache_block
        self.cache_entries = cache_entries  # block-prefix hashes kept (LRU)
        self._prefixes: OrderedDict[int, None] = OrderedDict()
        self._rng = random.Random(seed)
        # Tests mutate rules / read records from other threads than the server's loop.
        self._lock = threading.Lock()
        self._rules: list[list] = []  # [rule, remaining uses or None]
        # Bounded for long benchmark runs; None keeps every record (tests).
        self._records: deque[CallRecord] = deque(maxlen=max_records)
        self._in_flight = 0
        # Totals over the whole run (records are bounded): GET /stats, for the benchmark.
        self.calls_total = 0
        self.faults_total: Counter[str] = Counter()
        self._tasks: set[asyncio.Task] = set()
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._host = "127.0.0.1"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle -------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> SimulatedUpstream:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/stats", self._stats)
        # handler_cancellation: a client disconnect cancels the handler, so latency,
        # hangs and streams notice it. access_log=None: no per-request logging cost.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self._host = host
        self._port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        # Hanging handlers would otherwise hold the shutdown for its whole timeout.
        for task in list(self._tasks):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @classmethod
    def start_in_thread(cls, host: str = "127.0.0.1", port: int = 0, **kwargs: Any) -> SimulatedUpstream:
        """Start serving from a private event loop in a daemon thread (for sync tests)."""
        upstream = cls(**kwargs)
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="simulated-upstream", daemon=True)
        thread.start()
        asyncio.run_coroutine_threadsafe(upstream.start(host, port), loop).result(timeout=10)
        upstream._loop, upstream._thread = loop, thread
        return upstream

    def stop_in_thread(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(self.stop(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
        self._loop = self._thread = None

    @property
    def port(self) -> int:
        assert self._port is not None, "server not started"
        return self._port

    @property
    def base_url(self) -> str:
        # A wildcard bind address is not something a client can connect to.
        host = "127.0.0.1" if self._host in ("0.0.0.0", "", "::") else self._host
        return f"http://{host}:{self.port}/v1"

    # ---- scripting and inspection (thread-safe) ----------------------------------

    def add_rule(self, rule: Rule) -> Rule:
        with self._lock:
            self._rules.append([rule, rule.times])
        return rule

    def clear_rules(self) -> None:
        with self._lock:
            self._rules.clear()

    def reset(self) -> None:
        """Forget records, rules and cached prefixes (fault_rates and settings are kept)."""
        with self._lock:
            self._rules.clear()
            self._records.clear()
            # Rebound, not cleared: the server loop may be using the old one right now.
            self._prefixes = OrderedDict()

    @property
    def records(self) -> list[CallRecord]:
        with self._lock:
            return list(self._records)

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def served_usage(self) -> tuple[int, int]:
        """(prompt_tokens, completion_tokens) over calls whose usage reached the client."""
        with self._lock:
            done = [r for r in self._records if r.usage_reported]
        return sum(r.prompt_tokens for r in done), sum(r.completion_tokens for r in done)

    def served_cached_tokens(self) -> int:
        """cached_tokens over calls whose usage reached the client."""
        with self._lock:
            return sum(r.cached_tokens for r in self._records if r.usage_reported)

    def _pick(self, model: str | None, text: str) -> tuple[Rule | None, str | None]:
        """The matching rule (consuming one use) and a fault, random faults first."""
        with self._lock:
            self.calls_total += 1
            draw = self._rng.random()
            for fault, rate in self.fault_rates.items():
                if draw < rate:
                    self.faults_total[fault] += 1
                    return None, fault
                draw -= rate
            lower = text.lower()
            for entry in self._rules:
                rule, remaining = entry
                if remaining == 0 or not rule.matches(model, lower):
                    continue
                if remaining is not None:
                    entry[1] = remaining - 1
                return rule, rule.fault
        return None, None

    def _cached_prefix(self, words: list[str]) -> int:
        """Words of the longest whole-block prefix an earlier prompt shared; remembers this one.

        Each block-prefix is one chained hash (hash of the previous prefix's hash and the
        block's words), so a lookup is one dict probe per block, never a comparison of
        prompts; the LRU bounds memory. Runs on the server loop only.
        """
        prefixes, block = self._prefixes, self.cache_block
        cached, h = 0, block  # the block size seeds the chain: sizes never mix
        for end in range(block, len(words) + 1, block):
            h = hash((h, *words[end - block : end]))
            if h in prefixes:
                prefixes.move_to_end(h)
                cached = end
            else:
                prefixes[h] = None
        while len(prefixes) > self.cache_entries:
            prefixes.popitem(last=False)
        return cached

    # ---- handlers ----------------------------------------------------------------

    async def _models(self, request: web.Request) -> web.Response:
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "simulated"} for m in self.models]
        return _json({"object": "list", "data": data})

    async def _stats(self, request: web.Request) -> web.Response:
        with self._lock:
            return _json({"calls": self.calls_total, "faults": dict(self.faults_total)})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = json.loads(await request.read())
        except ValueError:
            body = None
        valid = isinstance(body, dict) and isinstance(body.get("messages"), list)
        req: dict = body if valid else {}
        messages: list = req.get("messages", [])
        text = prompt_text(messages)
        rule, fault = self._pick(req.get("model"), text) if valid else (None, "400")
        n = req.get("n")
        words = text.split()
        record = CallRecord(
            model=req.get("model"),
            messages=messages,
            request=req,
            role=rule.contains if rule else None,
            stream=bool(req.get("stream")),
            tag=request.headers.get("X-Request-Tag"),
            call_id=request.headers.get("X-Call-Id"),
            authorization=request.headers.get("Authorization"),
            started=time.monotonic(),
            fault=fault,
            prompt_tokens=len(words),
            n=n if isinstance(n, int) and n > 1 else 1,
        )
        # Only a prompt the provider goes on to process (no error status, no hang) is cached.
        if self.prefix_cache and fault in (None, "reset"):
            record.cached_tokens = self._cached_prefix(words)
        task = asyncio.current_task()
        with self._lock:
            self._records.append(record)
            self._in_flight += 1
        if task is not None:
            self._tasks.add(task)
        returned = False
        try:
            resp = await self._respond(request, record, req, rule, fault)
            returned = True
            return resp
        finally:
            # Not returned => cancelled: the client disconnected (aiohttp cancels the
            # handler) or stop() cancelled it, during latency, a hang or a stream.
            record.finished = time.monotonic()
            if not returned:
                record.cancelled = True
            with self._lock:
                self._in_flight -= 1
            self._tasks.discard(task)  # type: ignore[arg-type]

    async def _respond(
        self, request: web.Request, record: CallRecord, req: dict, rule: Rule | None, fault: str | None
    ) -> web.StreamResponse:
        if fault == "hang":
            record.status = "hang"
            await asyncio.Event().wait()  # until the client leaves or stop() cancels us
        latency = rule.latency if rule and rule.latency is not None else self.latency
        if latency > 0:
            await asyncio.sleep(latency)
        if fault is not None and fault != "reset":  # a reset answers, then breaks off
            return await self._fault(request, record, rule, fault)
        reply = rule.reply if rule and rule.reply is not None else self.default_reply
        tool_call = rule.tool_call if rule and rule.tool_call is not None else forced_tool_call(req)
        caps = [req.get("max_completion_tokens"), req.get("max_tokens")]
        cap = next((c for c in caps if c is not None), None)
        # One reply per choice, so a scripted reply function is asked once per choice.
        n = record.n if self.supports_n else 1
        choices = [self._choice(req, reply, tool_call, cap) for _ in range(n)]
        record.finish_reason = choices[0].finish
        reset = fault == "reset"
        if record.stream:
            return await self._stream(request, record, choices, reset)
        if reset:
            return await self._reset_body(request, record, choices)
        return self._complete(record, choices)

    def _choice(
        self, req: dict, reply: str | Callable[[dict], str], tool_call: dict | None, cap: int | None
    ) -> _Choice:
        if tool_call is not None:
            arguments = tool_call.get("arguments", {})
            if not isinstance(arguments, str):
                arguments = json.dumps(arguments)
            pieces = [str(tool_call.get("name", "")), *_PIECE.findall(arguments)]
            finish = "tool_calls"
            if cap is not None and len(pieces) > cap:
                pieces, finish = pieces[: max(cap, 0)], "length"
            logprobs = [] if req.get("logprobs") else None  # no content, no content logprobs
            return _Choice(pieces, finish, f"call_{uuid.uuid4().hex[:24]}", logprobs)
        text = reply(req) if callable(reply) else reply
        # Each transformation only when the request asks for it: no cost otherwise.
        if req.get("response_format") is not None:
            text = format_reply(text, req["response_format"])
        if req.get("stop"):
            text = cut_at_stop(text, req["stop"])
        pieces, finish = split_reply(text, cap)
        choice = _Choice(pieces, finish)
        if req.get("logprobs"):
            top = req.get("top_logprobs") or 0
            choice.logprobs = [logprob_entry(p, top) for p in pieces]
        return choice

    async def _fault(
        self, request: web.Request, record: CallRecord, rule: Rule | None, fault: str
    ) -> web.StreamResponse:
        if fault == "drop":
            record.status = "drop"
            # No response at all: the client sees the server disconnect. aiohttp then
            # fails to write our placeholder response and ignores that quietly.
            if request.transport is not None:
                request.transport.close()
            return web.Response()
        if fault == "malformed":
            record.status = 200
            if record.stream:
                resp = _sse_response()
                await resp.prepare(request)
                await resp.write(b"data: {this is not json\n\n")
                return resp
            return web.Response(text='{"id": "broken", "choices": [', content_type="application/json")
        status = int(fault)
        record.status = status
        err_type, code = _ERRORS[status]
        message = f"Simulated {status} error"
        if status == 401:  # like some real providers: the error repeats the key it was sent
            message = f"Incorrect API key provided: {request.headers.get('Authorization', '')}"
        payload = {"error": {"message": message, "type": err_type, "param": None, "code": code}}
        headers = {}
        if status == 429:
            retry_after = rule.retry_after if rule and rule.retry_after is not None else self.retry_after_s
            headers["Retry-After"] = f"{retry_after:g}"
        return _json(payload, status=status, headers=headers)

    def _payload(self, record: CallRecord, choices: list[_Choice]) -> dict:
        """The whole chat.completion body (sets the record's completion_tokens)."""
        record.completion_tokens = sum(len(c.pieces) for c in choices)
        out = []
        for index, c in enumerate(choices):
            if c.tool_call_id is not None and c.pieces:
                function = {"name": c.pieces[0], "arguments": "".join(c.pieces[1:])}
                call = {"id": c.tool_call_id, "type": "function", "function": function}
                message = {"role": "assistant", "content": None, "tool_calls": [call]}
            else:
                message = {"role": "assistant", "content": "".join(c.pieces)}
            choice = {"index": index, "message": message, "finish_reason": c.finish}
            if c.logprobs is not None:
                choice["logprobs"] = {"content": c.logprobs}
            out.append(choice)
        return {**_envelope(record, "chat.completion"), "choices": out, "usage": self._usage(record)}

    def _complete(self, record: CallRecord, choices: list[_Choice]) -> web.Response:
        record.status = 200
        payload = self._payload(record, choices)
        # The body is handed to aiohttp here; a later client disconnect is not observed.
        record.completed = record.usage_reported = True
        return _json(payload)

    async def _reset_body(self, request: web.Request, record: CallRecord, choices: list[_Choice]) -> web.StreamResponse:
        """Headers promising the whole body (Content-Length), about half of it, then the cut."""
        body = json.dumps(self._payload(record, choices)).encode()
        record.completion_tokens = 0  # nothing usable reached the client
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        resp.content_length = len(body)
        await resp.prepare(request)
        await resp.write(body[: len(body) // 2])
        _cut(request, record)
        return resp

    async def _stream(
        self, request: web.Request, record: CallRecord, choices: list[_Choice], reset: bool = False
    ) -> web.StreamResponse:
        """Role chunks, then the pieces of all choices in turn (one token time per round, as
        choices are generated side by side), each choice's finish chunk right after its last
        piece, then usage and [DONE]. `reset`: cut the connection after half the pieces."""
        record.status = 200
        resp = _sse_response()
        envelope = _envelope(record, "chat.completion.chunk")

        def chunk(index: int, delta: dict, finish_reason: str | None = None, logprobs: Any = None) -> bytes:
            choice = {"index": index, "delta": delta, "finish_reason": finish_reason}
            if logprobs is not None:
                choice["logprobs"] = logprobs
            return _sse({**envelope, "choices": [choice]})

        def piece_chunk(index: int, c: _Choice, i: int) -> bytes:
            if c.tool_call_id is None:
                logprobs = {"content": [c.logprobs[i]]} if c.logprobs is not None else None
                return chunk(index, {"content": c.pieces[i]}, logprobs=logprobs)
            if i == 0:  # as OpenAI: id, type and name first, then argument fragments
                function = {"name": c.pieces[0], "arguments": ""}
                call = {"index": 0, "id": c.tool_call_id, "type": "function", "function": function}
            else:
                call = {"index": 0, "function": {"arguments": c.pieces[i]}}
            return chunk(index, {"tool_calls": [call]})

        include_usage = bool((record.request.get("stream_options") or {}).get("include_usage"))
        cut_at = sum(len(c.pieces) for c in choices) // 2 if reset else -1
        sent = 0
        try:
            await resp.prepare(request)
            for index, c in enumerate(choices):
                content = None if c.tool_call_id is not None else ""
                await resp.write(chunk(index, {"role": "assistant", "content": content}))
            rounds = max(len(c.pieces) for c in choices)
            for r in range(rounds + 1):
                if 0 < r < rounds and self.token_interval > 0:
                    await asyncio.sleep(self.token_interval)
                for index, c in enumerate(choices):
                    if r > len(c.pieces):
                        continue
                    if sent == cut_at:
                        _cut(request, record)
                        return resp
                    if r == len(c.pieces):
                        await resp.write(chunk(index, {}, c.finish))
                        continue
                    await resp.write(piece_chunk(index, c, r))
                    sent += 1
                    record.completion_tokens = sent
            if include_usage:
                await resp.write(_sse({**envelope, "choices": [], "usage": self._usage(record)}))
            await resp.write(b"data: [DONE]\n\n")
            record.completed = True
            record.usage_reported = include_usage
        except ConnectionResetError:
            record.cancelled = True  # client went away mid-stream (write failed)
        return resp

    def _usage(self, record: CallRecord) -> dict:
        usage: dict[str, Any] = {
            "prompt_tokens": record.prompt_tokens,
            "completion_tokens": record.completion_tokens,
            "total_tokens": record.prompt_tokens + record.completion_tokens,
        }
        if self.prefix_cache:
            usage["prompt_tokens_details"] = {"cached_tokens": record.cached_tokens}
        return usage


def _cut(request: web.Request, record: CallRecord) -> None:
    """Break the connection mid-body ("reset" fault). close(), not abort(): what was written
    still reaches the client (abort drops the unsent buffer), then the connection ends without
    the rest of the body, which the client sees as a broken payload."""
    record.status = "reset"
    if request.transport is not None:
        request.transport.close()


def _json(payload: dict, status: int = 200, headers: dict | None = None) -> web.Response:
    return web.Response(
        body=json.dumps(payload).encode(), status=status, headers=headers, content_type="application/json"
    )


def _sse_response() -> web.StreamResponse:
    return web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})


def _sse(event: dict) -> bytes:
    return b"data: " + json.dumps(event).encode() + b"\n\n"


def _envelope(record: CallRecord, obj: str) -> dict:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": obj,
        "created": int(time.time()),
        "model": record.model or "simulated",
    }


async def _serve_forever(args: argparse.Namespace) -> None:
    reply: Callable[[dict], str] = default_reply
    if args.scenario is not None:
        from tests.scenarios import scenario_reply  # not at import time: it imports this module

        reply = scenario_reply(args.scenario, args.complete_at)
    upstream = SimulatedUpstream(
        latency=args.latency,
        token_interval=args.token_interval,
        seed=args.seed,
        max_records=args.max_records,
        default_reply=reply,
        supports_n=not args.no_n,
        prefix_cache=args.prefix_cache,
        fault_rates={kind: float(rate) for kind, _, rate in (f.partition("=") for f in args.fault)},
        retry_after_s=args.retry_after,
    )
    await upstream.start(args.host, args.port)
    print(f"simulated upstream at {upstream.base_url}", flush=True)
    # Handlers of our own: a process started in the background inherits SIGINT ignored.
    stopped = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(signum, stopped.set)
    try:
        await stopped.wait()
    finally:
        await upstream.stop()


def main() -> None:
    from tests.scenarios import SCENARIOS

    parser = argparse.ArgumentParser(description="Simulated OpenAI-compatible upstream")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--token-interval", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-records", type=int, default=1000, help="call records kept in memory")
    parser.add_argument(
        "--scenario",
        choices=SCENARIOS,
        default=None,
        help='role-aware replies (tests/scenarios.py); default: "Simulated answer." to everything',
    )
    parser.add_argument("--complete-at", type=int, default=None, help="step at which thinkers answer")
    parser.add_argument("--no-n", action="store_true", help='ignore "n": always one choice')
    parser.add_argument("--prefix-cache", action="store_true", help="report cached prompt tokens")
    parser.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="KIND=RATE",
        help=f"random fault, e.g. 500=0.1 (repeatable; kinds {', '.join(FAULTS)})",
    )
    parser.add_argument("--retry-after", type=float, default=1.0, help="Retry-After of a 429 fault, seconds")
    args = parser.parse_args()
    for fault in args.fault:
        if fault.partition("=")[0] not in FAULTS:
            parser.error(f"--fault {fault}: the kind must be one of {', '.join(FAULTS)}")
    # The benchmark runs this beside the service on the same cores: the cheaper loop helps.
    try:
        import uvloop
    except ImportError:
        run = asyncio.run
    else:
        run = uvloop.run
    try:
        run(_serve_forever(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
