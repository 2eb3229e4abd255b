"""The one upstream client every role uses: an OpenAI-compatible chat call with honest usage.

It runs on the replica's persistent `aiohttp.ClientSession` (never one per call) and retries only
what retrying can fix — connection errors, timeouts, 429 and 5xx, malformed bodies — with
exponential backoff that never undercuts the upstream's `Retry-After`. Every call's `usage`, as
the upstream reported it, is recorded in the caller's `UsageLedger`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

import aiohttp
import structlog
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

from actors.config import ModelConfig, ServiceConfig, UpstreamConfig
from actors.schemas import UsageLedger

log = structlog.get_logger(__name__)

REQUEST_TAG_HEADER = "X-Request-Tag"
CALL_ID_HEADER = "X-Call-Id"


class CallObserver(Protocol):
    """Told about every upstream attempt (the deployments count them as metrics)."""

    def upstream_attempt(self, role: str, outcome: str, seconds: float) -> None: ...


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
    if isinstance(exc, asyncio.TimeoutError):
        return "timeout"
    return "connection"


class UpstreamError(Exception):
    """An upstream call failed. The message is a summary, never the raw body or the key."""

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
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after


def _is_retryable(exc: BaseException) -> bool:
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
    return aiohttp.ClientSession(connector=connector)


def role_clients(
    session: aiohttp.ClientSession, config: ServiceConfig, observer: CallObserver | None = None
) -> dict[str, "ModelClient"]:
    return {
        role: ModelClient(session, role, model, config.upstream, observer) for role, model in config.models.items()
    }


@dataclass(frozen=True)
class _Endpoint:
    model: ModelConfig
    url: str
    headers: dict[str, str]

    @classmethod
    def of(cls, model: ModelConfig) -> "_Endpoint":
        headers = {"Content-Type": "application/json"}
        if model.api_key is not None:
            headers["Authorization"] = f"Bearer {model.api_key.get_secret_value()}"
        return cls(model, model.base_url.rstrip("/") + "/chat/completions", headers)


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
        self.endpoints = [_Endpoint.of(m) for m in (model, *model.fallbacks)]
        self._backoff = wait_exponential(
            multiplier=upstream.backoff_initial_s, max=upstream.backoff_max_s
        )

    async def complete(
        self, messages: list[dict[str, str]], usage: UsageLedger, *, tag: str = "", max_tokens: int | None = None
    ) -> str:
        """One chat completion; returns the text and records the reported usage."""
        started = time.monotonic()
        try:
            body = await self._call(self._post_json, messages, False, tag, max_tokens)
        except BaseException:
            usage.record_failure(self.role, time.monotonic() - started)
            raise
        text, prompt_tokens, completion_tokens = self._read_completion(body)
        usage.record(self.role, prompt_tokens, completion_tokens, time.monotonic() - started)
        return text

    async def stream(
        self, messages: list[dict[str, str]], usage: UsageLedger, *, tag: str = ""
    ) -> AsyncIterator[str]:
        """Stream the answer's text deltas as they arrive; usage is recorded at the end.

        Opening the stream is retried (and falls back); once text has been relayed a failure is
        final, since a retry would repeat tokens the caller has already passed on.
        """
        started = time.monotonic()
        prompt_tokens = completion_tokens = 0
        try:
            response = await self._call(self._open_stream, messages, True, tag, None)
            async with response:
                async for data in _sse_data(response):
                    try:
                        event = json.loads(data)
                    except json.JSONDecodeError as exc:
                        raise UpstreamError(self.role, "malformed stream event") from exc
                    if isinstance(event, dict) and event.get("error"):
                        raise UpstreamError(self.role, "error event in stream")
                    reported = event.get("usage") if isinstance(event, dict) else None
                    if reported:
                        prompt_tokens = int(reported.get("prompt_tokens") or 0)
                        completion_tokens = int(reported.get("completion_tokens") or 0)
                    for choice in event.get("choices") or ():
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            yield text
        except BaseException:
            usage.record_failure(self.role, time.monotonic() - started)
            raise
        usage.record(self.role, prompt_tokens, completion_tokens, time.monotonic() - started)

    # --- internals -------------------------------------------------------------------------

    async def _call(self, send, messages, stream: bool, tag: str, max_tokens: int | None):
        """Each endpoint in turn, each with its retries; the last endpoint's error is raised."""
        # One id for every attempt of this call, so upstream logs (and tests) can tell retries.
        headers = {REQUEST_TAG_HEADER: tag, CALL_ID_HEADER: uuid.uuid4().hex}
        for number, endpoint in enumerate(self.endpoints):
            payload = {
                "model": endpoint.model.model,
                "messages": messages,
                "temperature": endpoint.model.temperature,
                "max_tokens": max_tokens or endpoint.model.max_tokens,
                "stream": stream,
            }
            if stream:
                payload["stream_options"] = {"include_usage": True}
            try:
                return await self._retrying(send, endpoint, payload, headers)
            except Exception as exc:
                if number + 1 == len(self.endpoints):
                    raise
                log.warning(
                    "upstream_fallback",
                    role=self.role,
                    failed_model=endpoint.model.model,
                    next_model=self.endpoints[number + 1].model.model,
                    error=_describe(exc),
                )
        raise AssertionError("unreachable: there is always one endpoint")

    async def _retrying(self, send, endpoint: _Endpoint, payload: dict[str, Any], headers: dict[str, str]):
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(self.upstream.max_attempts),
            wait=self._wait,
            retry=retry_if_exception(_is_retryable),
            before_sleep=self._log_retry,
            reraise=True,
        ):
            with attempt:
                return await self._observed(send(endpoint, payload, {**endpoint.headers, **headers}))
        raise AssertionError("unreachable: tenacity re-raises the last error")

    async def _observed(self, attempt):
        if self.observer is None:
            return await attempt
        started = time.monotonic()
        error: BaseException | None = None
        try:
            return await attempt
        except BaseException as exc:
            error = exc
            raise
        finally:
            self.observer.upstream_attempt(self.role, attempt_outcome(error), time.monotonic() - started)

    def _wait(self, state: RetryCallState) -> float:
        backoff = self._backoff(state)
        exc = state.outcome.exception() if state.outcome else None
        retry_after = getattr(exc, "retry_after", None)
        return max(backoff, retry_after) if retry_after is not None else backoff

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            "upstream_retry",
            role=self.role,
            attempt=state.attempt_number,
            wait_s=round(state.next_action.sleep, 3) if state.next_action else None,
            error=_describe(exc),
        )

    @staticmethod
    def _timeout(endpoint: _Endpoint, stream: bool) -> aiohttp.ClientTimeout:
        limit = endpoint.model.timeout_s
        if stream:  # a long answer may stream for longer than one call's budget: bound the gaps
            return aiohttp.ClientTimeout(sock_connect=limit, sock_read=limit)
        return aiohttp.ClientTimeout(total=limit)

    async def _post_json(self, endpoint: _Endpoint, payload: dict[str, Any], headers: dict[str, str]) -> Any:
        async with self.session.post(
            endpoint.url, json=payload, headers=headers, timeout=self._timeout(endpoint, False)
        ) as response:
            await self._raise_for_status(response)
            raw = await response.read()
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UpstreamError(self.role, "malformed response body (not JSON)", retryable=True) from exc

    async def _open_stream(
        self, endpoint: _Endpoint, payload: dict[str, Any], headers: dict[str, str]
    ) -> aiohttp.ClientResponse:
        response = await self.session.post(
            endpoint.url, json=payload, headers=headers, timeout=self._timeout(endpoint, True)
        )
        try:
            await self._raise_for_status(response)
        except BaseException:
            response.release()
            raise
        return response

    async def _raise_for_status(self, response: aiohttp.ClientResponse) -> None:
        if response.status < 400:
            return
        detail = await _error_summary(response)
        status = response.status
        retryable = status == 429 or status >= 500 or status == 408
        raise UpstreamError(
            self.role,
            f"HTTP {status}{' ' + detail if detail else ''}",
            status=status,
            retryable=retryable,
            retry_after=parse_retry_after(response.headers.get("Retry-After")),
        )

    def _read_completion(self, body: Any) -> tuple[str, int, int]:
        try:
            choice = body["choices"][0]
            text = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise UpstreamError(self.role, "response has no choices[0].message") from exc
        reported = body.get("usage") or {}
        if not reported:
            log.warning("upstream_usage_missing", role=self.role, model=self.model.model)
        return text, int(reported.get("prompt_tokens") or 0), int(reported.get("completion_tokens") or 0)


async def _sse_data(response: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """The `data:` payloads of an SSE response, up to `[DONE]`."""
    async for raw_line in response.content:
        line = raw_line.decode("utf-8", errors="replace").strip()
        if not line.startswith("data:"):
            continue  # blank separators, comments (keepalives), event names
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield data


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


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return ""
    if isinstance(exc, UpstreamError):
        return str(exc)
    return type(exc).__name__
