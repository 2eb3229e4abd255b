"""The one upstream client every role uses: an OpenAI-compatible chat call with honest usage.

It runs on the replica's persistent `aiohttp.ClientSession` (never one per call). An attempt that
succeeds does no retry bookkeeping: the body is serialised once per call, the headers are built
once per model. Only what retrying can fix is retried — connection errors, timeouts, 429, 5xx,
malformed bodies — with exponential backoff; a `Retry-After` is waited out in full when it fits
within `backoff_max_s`, and a retry that cannot finish before the caller's deadline is not made.
Each call's `usage`, as the upstream reported it, goes into the caller's `UsageLedger`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

import aiohttp
import structlog
from yarl import URL

from actors.config import ModelConfig, ServiceConfig, UpstreamConfig
from actors.schemas import UsageLedger

log = structlog.get_logger(__name__)

REQUEST_TAG_HEADER = "X-Request-Tag"
CALL_ID_HEADER = "X-Call-Id"
# Tokens per character of prompt text until an upstream has told us better: on the high side
# (English runs near 0.25), so a budget is not overrun before the first answer calibrates it.
DEFAULT_TOKENS_PER_CHAR = 0.4

Messages = list[dict[str, Any]]
_call_ids = itertools.count()
_CALL_PREFIX = f"{os.getpid():x}-{int(time.time()) & 0xFFFFFF:x}-"


class CallObserver(Protocol):
    """Told about every upstream attempt (the deployments count them as metrics)."""

    def upstream_attempt(self, role: str, outcome: str, seconds: float) -> None: ...


class UpstreamError(Exception):
    """An upstream call failed. The message is a summary: never the raw body, a host or a key."""

    def __init__(
        self,
        role: str,
        message: str,
        *,
        status: int | None = None,
        retryable: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{role} upstream: {message}")
        self.role = role
        self.message = message
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after

    def __reduce__(self):  # picklable across replicas despite the keyword arguments
        return (self.__class__, (self.role, self.message), self.__dict__)


class DeadlineReached(Exception):
    """The caller's deadline came: before the call was sent (`sent` False) or while it ran."""

    def __init__(self, message: str, *, sent: bool = False) -> None:
        super().__init__(message)
        self.sent = sent

    def __reduce__(self):
        return (self.__class__, (str(self),), {"sent": self.sent})


@dataclass(slots=True)
class StreamPiece:
    """One event of a streamed answer that carries something for the client."""

    text: str = ""
    tool_calls: list[dict[str, Any]] | None = None
    logprobs: list[dict[str, Any]] | None = None
    finish_reason: str | None = None


def describe_error(exc: BaseException | None) -> str:
    """A summary safe to show a client: ours for UpstreamError, else only the exception type
    (a connection error's text names the upstream's host and port)."""
    if exc is None:
        return ""
    if isinstance(exc, UpstreamError):
        return str(exc)
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "timed out"
    return type(exc).__name__


def attempt_outcome(exc: BaseException | None) -> str:
    """A short label for how one attempt ended: ok, http_429, http_5xx, timeout, ..."""
    if exc is None:
        return "ok"
    if isinstance(exc, UpstreamError):
        if exc.status is None:
            return "malformed"
        return "http_429" if exc.status == 429 else f"http_{exc.status // 100}xx"
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "timeout"
    return "connection"


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, UpstreamError):
        return exc.retryable
    return isinstance(exc, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError))


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait, from either form of the header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def open_session(upstream: UpstreamConfig) -> aiohttp.ClientSession:
    """The replica's one session, made at replica start and closed at its stop.

    The pool size comes from config (0 = unlimited): a fixed hidden cap of 100 connections is
    what capped the original at about 10 req/s.
    """
    connector = aiohttp.TCPConnector(limit=upstream.max_connections, limit_per_host=0)
    # No cookies, no compression, no default headers to compute: upstream APIs need none, and
    # each is work on every call.
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
    )


def role_clients(
    session: aiohttp.ClientSession, config: ServiceConfig, observer: CallObserver | None = None
) -> dict[str, ModelClient]:
    return {role: ModelClient(session, role, model, config.upstream, observer) for role, model in config.models.items()}


def prompt_chars(messages: Messages) -> int:
    return sum(len(m["content"]) for m in messages if isinstance(m.get("content"), str))


class _Endpoint:
    """One model of a role (the configured one or a fallback), with what every call reuses."""

    __slots__ = ("model", "url", "headers", "payload", "timeout", "stream_timeout", "supports_n", "latency_s")

    def __init__(self, model: ModelConfig) -> None:
        self.model = model
        # Parsed once (aiohttp would parse a str URL on every call): yarl is aiohttp's own URL type.
        self.url = URL(model.base_url.rstrip("/") + "/chat/completions")
        self.headers = {"Content-Type": "application/json"}
        if model.api_key is not None:
            self.headers["Authorization"] = f"Bearer {model.api_key.get_secret_value()}"
        self.payload = {"model": model.model, "temperature": model.temperature, "max_tokens": model.max_tokens}
        self.timeout = aiohttp.ClientTimeout(total=model.timeout_s)
        # A long answer may stream for longer than one call's budget: bound the gaps instead.
        self.stream_timeout = aiohttp.ClientTimeout(sock_connect=model.timeout_s, sock_read=model.timeout_s)
        self.supports_n: bool | None = None  # unknown until an answer tells
        self.latency_s = 0.0  # recent successful call time, to judge whether a retry can finish

    def __repr__(self) -> str:  # never the headers: they hold the key
        return f"_Endpoint({self.model.model!r})"

    def cost(self, prompt: int, completion: int, cached: int) -> float:
        price = self.model.price
        if price is None:
            return 0.0
        cached_price = price.input if price.cached_input is None else price.cached_input
        return ((prompt - cached) * price.input + cached * cached_price + completion * price.output) / 1e6


class ModelClient:
    """Calls one configured model for one role, then its fallbacks in order if it keeps failing."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        role: str,
        model: ModelConfig,
        upstream: UpstreamConfig,
        observer: CallObserver | None = None,
    ) -> None:
        self.session = session
        self.role = role
        self.model = model
        self.upstream = upstream
        self.observer = observer
        self.endpoints = [_Endpoint(m) for m in (model, *model.fallbacks)]
        self.tokens_per_char = DEFAULT_TOKENS_PER_CHAR
        self._calibrated = False

    # --- what roles call ------------------------------------------------------------------

    async def complete(
        self,
        messages: Messages,
        usage: UsageLedger,
        *,
        tag: str = "",
        deadline: float | None = None,
        max_tokens: int | None = None,
    ) -> str:
        """One chat completion; returns its text and records the reported usage."""
        return (await self._complete(messages, usage, tag, deadline, max_tokens, 1))[0]

    async def sample(
        self,
        messages: Messages,
        usage: UsageLedger,
        n: int,
        *,
        tag: str = "",
        deadline: float | None = None,
        one_call: bool = True,
    ) -> list[str]:
        """`n` answers to one prompt: with `one_call`, one upstream call with `n` (the prompt is
        billed once); an upstream that returns fewer is made up with separate calls and not asked
        again. Answers of failed calls are missing; if every call failed, the last error raises.
        """
        if n == 1 or not one_call or self.endpoints[0].supports_n is False:
            return await self._separately(messages, usage, n, tag, deadline)
        texts = await self._complete(messages, usage, tag, deadline, None, n)
        if len(texts) < n:
            self.endpoints[0].supports_n = False
            log.info("upstream_ignores_n", role=self.role, model=self.model.model, asked=n, got=len(texts))
            texts += await self._separately(messages, usage, n - len(texts), tag, deadline)
        else:
            self.endpoints[0].supports_n = True
        return texts

    async def stream(
        self,
        messages: Messages,
        usage: UsageLedger,
        *,
        tag: str = "",
        params: dict[str, Any] | None = None,
    ) -> AsyncIterator[StreamPiece]:
        """Stream the answer as it arrives; usage is recorded at the end.

        `params` are extra request fields (the client's sampling and shaping fields, which win
        over the configured ones). A failure before anything was yielded is retried like any
        other call (and falls back); once pieces are out it raises, since a retry would repeat
        what the caller has already passed on. The caller bounds the total time.
        """
        started = time.monotonic()
        reported: dict[str, Any] = {}
        endpoint: _Endpoint | None = None
        try:
            extra = {**(params or {}), "stream": True, "stream_options": {"include_usage": True}}
            endpoint, (response, first) = await self._call(
                messages, tag, None, extra, 1, self._open_stream, reported=reported
            )
            async with response:
                for piece in first:
                    yield piece
                async for piece in self._pieces(response, reported):
                    yield piece
        except (asyncio.CancelledError, GeneratorExit):
            usage.record_aborted(self.role, time.monotonic() - started)
            raise
        except BaseException:
            usage.record_failure(self.role, time.monotonic() - started)
            raise
        self._record(usage, endpoint, reported, started, 0)

    def estimate_prompt(self, messages: Messages) -> int:
        """Prompt tokens a call would be billed, from what earlier answers reported."""
        return int(prompt_chars(messages) * self.tokens_per_char) + 8

    # --- internals ------------------------------------------------------------------------

    async def _complete(
        self,
        messages: Messages,
        usage: UsageLedger,
        tag: str,
        deadline: float | None,
        max_tokens: int | None,
        n: int,
        bodies: dict | None = None,
    ) -> list[str]:
        started = time.monotonic()
        extra = {"max_tokens": max_tokens} if max_tokens else None
        try:
            endpoint, body = await self._call(messages, tag, deadline, extra, n, self._post_json, bodies=bodies)
        except asyncio.CancelledError:
            usage.record_aborted(self.role, time.monotonic() - started)
            raise
        except DeadlineReached as exc:
            if exc.sent:
                usage.record_aborted(self.role, time.monotonic() - started)
            raise
        except BaseException:
            usage.record_failure(self.role, time.monotonic() - started)
            raise
        try:
            texts = [(choice["message"].get("content") or "") for choice in body["choices"]]
        except (KeyError, TypeError, AttributeError) as exc:
            raise UpstreamError(self.role, "response has no choices[].message") from exc
        if not texts:
            raise UpstreamError(self.role, "response has no choices")
        self._record(usage, endpoint, body.get("usage") or {}, started, prompt_chars(messages))
        return texts

    async def _separately(
        self, messages: Messages, usage: UsageLedger, n: int, tag: str, deadline: float | None
    ) -> list[str]:
        bodies: dict = {}  # the same request n times: serialised once
        if n == 1:
            return await self._complete(messages, usage, tag, deadline, None, 1, bodies)
        results = await asyncio.gather(
            *(self._complete(messages, usage, tag, deadline, None, 1, bodies) for _ in range(n)),
            return_exceptions=True,
        )
        results = [r[0] if isinstance(r, list) else r for r in results]
        texts = [r for r in results if isinstance(r, str)]
        errors = [r for r in results if not isinstance(r, str)]
        for error in errors:
            if isinstance(error, asyncio.CancelledError):
                raise error
        if not texts and errors:
            raise errors[-1]
        for error in errors:
            log.warning("upstream_call_failed", role=self.role, error=describe_error(error))
        return texts

    def _record(self, usage: UsageLedger, endpoint: _Endpoint, reported: dict, started: float, chars: int) -> None:
        seconds = time.monotonic() - started
        if not reported:
            log.warning("upstream_usage_missing", role=self.role, model=endpoint.model.model)
        prompt = int(reported.get("prompt_tokens") or 0)
        completion = int(reported.get("completion_tokens") or 0)
        details = reported.get("prompt_tokens_details") or {}
        cached = int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0
        usage.record(self.role, prompt, completion, cached, endpoint.cost(prompt, completion, cached), seconds)
        endpoint.latency_s = seconds if not endpoint.latency_s else 0.8 * endpoint.latency_s + 0.2 * seconds
        if chars and prompt:
            ratio = prompt / chars
            # Learn fast upwards (an underestimate could overrun a budget), slowly downwards.
            if not self._calibrated or ratio > self.tokens_per_char:
                self.tokens_per_char = ratio
            else:
                self.tokens_per_char = 0.9 * self.tokens_per_char + 0.1 * ratio
            self._calibrated = True

    async def _call(self, messages, tag, deadline, extra, n, send, bodies: dict | None = None, **kwargs):
        """Each endpoint in turn, each with its retries; the last endpoint's error is raised.
        `bodies` keeps the serialised request per endpoint for calls that repeat it."""
        # One id for every attempt of this call, so upstream logs (and tests) can tell retries.
        headers = {REQUEST_TAG_HEADER: tag, CALL_ID_HEADER: f"{_CALL_PREFIX}{next(_call_ids)}"}
        last = len(self.endpoints) - 1
        for number, endpoint in enumerate(self.endpoints):
            body = bodies.get(number) if bodies is not None else None
            if body is None:
                payload = {**endpoint.payload, "messages": messages}
                if n > 1:
                    payload["n"] = n
                if extra:
                    payload.update(extra)
                body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
                if bodies is not None:
                    bodies[number] = body
            try:
                result = await self._attempts(send, endpoint, body, {**endpoint.headers, **headers}, deadline, **kwargs)
                return endpoint, result
            except (asyncio.CancelledError, DeadlineReached):
                raise
            except Exception as exc:
                if number == last:
                    raise
                log.warning(
                    "upstream_fallback",
                    role=self.role,
                    failed_model=endpoint.model.model,
                    next_model=self.endpoints[number + 1].model.model,
                    error=describe_error(exc),
                )
        raise AssertionError("unreachable: there is always one endpoint")

    async def _attempts(self, send, endpoint: _Endpoint, body: bytes, headers, deadline, **kwargs):
        attempt = 1
        while True:
            timeout = None
            if deadline is not None:
                left = deadline - time.time()
                if left <= 0:
                    raise DeadlineReached(f"{self.role} upstream: no time left before the deadline", sent=False)
                if left < endpoint.model.timeout_s:
                    timeout = aiohttp.ClientTimeout(total=left)
            started = time.monotonic()
            try:
                result = await send(endpoint, body, headers, timeout, **kwargs)
            except BaseException as exc:
                self._observe(exc, started)
                if isinstance(exc, (asyncio.TimeoutError, TimeoutError)) and timeout is not None:
                    raise DeadlineReached(f"{self.role} upstream: cut at the deadline", sent=True) from None
                wait = self._retry_wait(exc, attempt, endpoint, deadline)
                if wait is None:
                    raise
                log.warning(
                    "upstream_retry", role=self.role, attempt=attempt, wait_s=round(wait, 3), error=describe_error(exc)
                )
                await asyncio.sleep(wait)
                attempt += 1
                continue
            self._observe(None, started)
            return result

    def _retry_wait(
        self, exc: BaseException, attempt: int, endpoint: _Endpoint, deadline: float | None
    ) -> float | None:
        """Seconds to wait before the next attempt, or None when retrying cannot help or fit."""
        if attempt >= self.upstream.max_attempts or not isinstance(exc, Exception) or not _retryable(exc):
            return None
        backoff = min(self.upstream.backoff_initial_s * 2 ** (attempt - 1), self.upstream.backoff_max_s)
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            if retry_after > self.upstream.backoff_max_s:
                return None  # never sooner than the upstream asked, never longer than configured
            backoff = max(backoff, retry_after)
        if deadline is not None and time.time() + backoff + endpoint.latency_s >= deadline:
            return None
        return backoff

    def _observe(self, exc: BaseException | None, started: float) -> None:
        if self.observer is not None:
            self.observer.upstream_attempt(self.role, attempt_outcome(exc), time.monotonic() - started)

    async def _post_json(self, endpoint: _Endpoint, body: bytes, headers, timeout) -> Any:
        async with self.session.post(
            endpoint.url, data=body, headers=headers, timeout=timeout or endpoint.timeout
        ) as response:
            if response.status >= 400:
                raise await self._status_error(response)
            raw = await response.read()
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UpstreamError(self.role, "malformed response body (not JSON)", retryable=True) from exc

    async def _open_stream(self, endpoint: _Endpoint, body: bytes, headers, timeout, *, reported: dict):
        """Open the stream and read up to its first piece: a failure until then can be retried."""
        response = await self.session.post(endpoint.url, data=body, headers=headers, timeout=endpoint.stream_timeout)
        try:
            if response.status >= 400:
                raise await self._status_error(response)
            first: list[StreamPiece] = []
            async for piece in self._pieces(response, reported):
                first.append(piece)
                if piece.text or piece.tool_calls:
                    break
        except BaseException:
            response.release()
            raise
        return response, first

    async def _pieces(self, response: aiohttp.ClientResponse, reported: dict) -> AsyncIterator[StreamPiece]:
        """The pieces of an SSE answer up to `[DONE]`; the usage event goes into `reported`."""
        async for raw_line in response.content:
            if not raw_line.startswith(b"data:"):
                continue  # blank separators, comments (keepalives), event names
            data = raw_line[5:].strip()
            if data == b"[DONE]":
                return
            try:
                event = json.loads(data)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise UpstreamError(self.role, "malformed stream event", retryable=True) from exc
            if not isinstance(event, dict):
                raise UpstreamError(self.role, "malformed stream event", retryable=True)
            if event.get("error"):
                raise UpstreamError(self.role, "error event in stream", retryable=True)
            if event.get("usage"):
                reported.update(event["usage"])
            for choice in event.get("choices") or ():
                delta = choice.get("delta") or {}
                logprobs = (choice.get("logprobs") or {}).get("content")
                piece = StreamPiece(
                    delta.get("content") or "", delta.get("tool_calls"), logprobs, choice.get("finish_reason")
                )
                if piece.text or piece.tool_calls or piece.logprobs or piece.finish_reason:
                    yield piece

    async def _status_error(self, response: aiohttp.ClientResponse) -> UpstreamError:
        detail = await _error_summary(response)
        status = response.status
        return UpstreamError(
            self.role,
            f"HTTP {status}{' ' + detail if detail else ''}",
            status=status,
            retryable=status == 429 or status >= 500 or status == 408,
            retry_after=parse_retry_after(response.headers.get("Retry-After")),
        )


async def _error_summary(response: aiohttp.ClientResponse) -> str:
    """The error's type and code, never its message: upstream messages may quote the request,
    even the API key ("Incorrect API key provided: sk-..."), and are not ours to pass on."""
    try:
        body = await response.json(content_type=None)
        error = body.get("error") if isinstance(body, dict) else None
    except (json.JSONDecodeError, aiohttp.ClientError, UnicodeDecodeError, ValueError):
        error = None
    if not isinstance(error, dict):
        return ""
    parts = [str(error[k])[:60] for k in ("type", "code") if isinstance(error.get(k), (str, int))]
    return "(" + ", ".join(parts) + ")" if parts else ""
