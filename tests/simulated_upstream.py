"""A simulated OpenAI-compatible upstream LLM server.

It is the project's only stand-in for real upstream providers, used by tests and
by the benchmark. Answers are scripted (``Rule``), faults can be scripted or
injected at random, and every call is recorded (``CallRecord``) so tests can check
exact token accounting and cancellation.

Tokens are whitespace-separated words, so expected usage is easy to compute by hand.

CLI (for the benchmark):
    python -m tests.simulated_upstream --port 9100 --latency 0.2 [--token-interval 0.0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from aiohttp import web

FAULTS = ("500", "502", "503", "429", "400", "401", "hang", "malformed", "drop")

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


def default_reply(request_json: dict) -> str:
    return "Simulated answer."


def count_words(text: str) -> int:
    return len(text.split())


def message_text(content: Any) -> str:
    """Text of one message content: a string or a list of {"type": "text"} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return ""


def prompt_text(messages: list) -> str:
    return "\n".join(message_text(m.get("content")) for m in messages if isinstance(m, dict))


def split_reply(reply: str, max_tokens: int | None) -> tuple[list[str], str]:
    """Word pieces actually served, and the finish_reason."""
    pieces = _PIECE.findall(reply.strip())
    if max_tokens is not None and len(pieces) > max_tokens:
        return pieces[: max(max_tokens, 0)], "length"
    return pieces, "stop"


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
    status: int | str | None = None  # HTTP status, or "drop" / "hang"
    fault: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # words actually sent (0 for faults)
    finish_reason: str | None = None
    usage_reported: bool = False  # the usage block reached the client
    completed: bool = False  # a successful response was fully sent
    cancelled: bool = False  # client went away (or server stopped) before completion


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
    ) -> None:
        self.latency = latency
        self.token_interval = token_interval
        self.default_reply = default_reply
        self.fault_rates: dict[str, float] = dict(fault_rates or {})
        self.retry_after_s = retry_after_s
        self.models = models
        self._rng = random.Random(seed)
        # Tests mutate rules / read records from other threads than the server's loop.
        self._lock = threading.Lock()
        self._rules: list[list] = []  # [rule, remaining uses or None]
        # Bounded for long benchmark runs; None keeps every record (tests).
        self._records: deque[CallRecord] = deque(maxlen=max_records)
        self._in_flight = 0
        self._tasks: set[asyncio.Task] = set()
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._host = "127.0.0.1"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle -------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> "SimulatedUpstream":
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        # handler_cancellation: a client disconnect cancels the handler, so latency,
        # hangs and streams notice it. access_log=None: no per-request logging cost.
        self._runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0
        )
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
    def start_in_thread(
        cls, host: str = "127.0.0.1", port: int = 0, **kwargs: Any
    ) -> "SimulatedUpstream":
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
        """Forget records and rules (fault_rates are kept)."""
        with self._lock:
            self._rules.clear()
            self._records.clear()

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

    def _pick(self, model: str | None, text: str) -> tuple[Rule | None, str | None]:
        """The matching rule (consuming one use) and a fault, random faults first."""
        with self._lock:
            draw = self._rng.random()
            for fault, rate in self.fault_rates.items():
                if draw < rate:
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

    # ---- handlers ----------------------------------------------------------------

    async def _models(self, request: web.Request) -> web.Response:
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "simulated"} for m in self.models]
        return _json({"object": "list", "data": data})

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
            prompt_tokens=count_words(text),
        )
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
        if fault is not None:
            return await self._fault(request, record, rule, fault)
        reply = rule.reply if rule and rule.reply is not None else self.default_reply
        reply_text = reply(req) if callable(reply) else reply
        caps = [req.get("max_completion_tokens"), req.get("max_tokens")]
        cap = next((c for c in caps if c is not None), None)
        pieces, finish = split_reply(reply_text, cap)
        record.finish_reason = finish
        if record.stream:
            return await self._stream(request, record, pieces, finish)
        return self._complete(record, pieces, finish)

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

    def _complete(self, record: CallRecord, pieces: list[str], finish: str) -> web.Response:
        record.status = 200
        record.completion_tokens = len(pieces)
        payload = {
            **_envelope(record, "chat.completion"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(pieces)},
                    "finish_reason": finish,
                }
            ],
            "usage": _usage(record),
        }
        # The body is handed to aiohttp here; a later client disconnect is not observed.
        record.completed = record.usage_reported = True
        return _json(payload)

    async def _stream(
        self, request: web.Request, record: CallRecord, pieces: list[str], finish: str
    ) -> web.StreamResponse:
        record.status = 200
        resp = _sse_response()
        envelope = _envelope(record, "chat.completion.chunk")

        def chunk(delta: dict, finish_reason: str | None = None) -> bytes:
            event = {**envelope, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
            return _sse(event)

        include_usage = bool((record.request.get("stream_options") or {}).get("include_usage"))
        try:
            await resp.prepare(request)
            await resp.write(chunk({"role": "assistant", "content": ""}))
            for i, piece in enumerate(pieces):
                if i and self.token_interval > 0:
                    await asyncio.sleep(self.token_interval)
                await resp.write(chunk({"content": piece}))
                record.completion_tokens = i + 1
            await resp.write(chunk({}, finish))
            if include_usage:
                await resp.write(_sse({**envelope, "choices": [], "usage": _usage(record)}))
            await resp.write(b"data: [DONE]\n\n")
            record.completed = True
            record.usage_reported = include_usage
        except ConnectionResetError:
            record.cancelled = True  # client went away mid-stream (write failed)
        return resp


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


def _usage(record: CallRecord) -> dict:
    return {
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "total_tokens": record.prompt_tokens + record.completion_tokens,
    }


async def _serve_forever(args: argparse.Namespace) -> None:
    upstream = SimulatedUpstream(
        latency=args.latency, token_interval=args.token_interval, seed=args.seed, max_records=args.max_records
    )
    await upstream.start(args.host, args.port)
    print(f"simulated upstream at {upstream.base_url}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await upstream.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description="Simulated OpenAI-compatible upstream")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--token-interval", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-records", type=int, default=1000, help="call records kept in memory")
    args = parser.parse_args()
    try:
        asyncio.run(_serve_forever(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
