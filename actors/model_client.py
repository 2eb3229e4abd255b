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
from collections.abc import AsyncIterator
from email.utils import parsedate_to_datetime
from typing import Any

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


def role_clients(session: aiohttp.ClientSession, config: ServiceConfig) -> dict[str, "ModelClient"]:
    return {role: ModelClient(session, role, model, config.upstream) for role, model in config.models.items()}


class ModelClient:
    """Calls one configured model for one role."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        role: str,
        model: ModelConfig,
        upstream: UpstreamConfig,
    ) -> None:
        self.session = session
        self.role = role
        self.model = model
        self.upstream = upstream
        self.url = model.base_url.rstrip("/") + "/chat/completions"
        self.headers = {"Content-Type": "application/json"}
        if model.api_key is not None:
            self.headers["Authorization"] = f"Bearer {model.api_key.get_secret_value()}"
        self._backoff = wait_exponential(
            multiplier=upstream.backoff_initial_s, max=upstream.backoff_max_s
        )

    async def complete(
        self, messages: list[dict[str, str]], usage: UsageLedger, *, tag: str = "", max_tokens: int | None = None
    ) -> str:
        """One chat completion; returns the text and records the reported usage."""
        payload = self._payload(messages, stream=False, max_tokens=max_tokens)
        started = time.monotonic()
        try:
            body = await self._retrying(self._post_json, payload, tag)
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

        Opening the stream is retried; once text has been relayed a failure is final, since
        a retry would repeat tokens the caller has already passed on.
        """
        payload = self._payload(messages, stream=True)
        payload["stream_options"] = {"include_usage": True}
        started = time.monotonic()
        prompt_tokens = completion_tokens = 0
        try:
            response = await self._retrying(self._open_stream, payload, tag)
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

    def _payload(self, messages: list[dict[str, str]], *, stream: bool, max_tokens: int | None = None) -> dict[str, Any]:
        return {
            "model": self.model.model,
            "messages": messages,
            "temperature": self.model.temperature,
            "max_tokens": max_tokens or self.model.max_tokens,
            "stream": stream,
        }

    async def _retrying(self, call, payload: dict[str, Any], tag: str):
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(self.upstream.max_attempts),
            wait=self._wait,
            retry=retry_if_exception(_is_retryable),
            before_sleep=self._log_retry,
            reraise=True,
        ):
            with attempt:
                return await call(payload, tag)
        raise AssertionError("unreachable: tenacity re-raises the last error")

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

    def _timeout(self, stream: bool) -> aiohttp.ClientTimeout:
        if stream:  # a long answer may stream for longer than one call's budget: bound the gaps
            return aiohttp.ClientTimeout(sock_connect=self.model.timeout_s, sock_read=self.model.timeout_s)
        return aiohttp.ClientTimeout(total=self.model.timeout_s)

    def _request_headers(self, tag: str) -> dict[str, str]:
        return {**self.headers, REQUEST_TAG_HEADER: tag} if tag else self.headers

    async def _post_json(self, payload: dict[str, Any], tag: str) -> Any:
        async with self.session.post(
            self.url, json=payload, headers=self._request_headers(tag), timeout=self._timeout(False)
        ) as response:
            await self._raise_for_status(response)
            raw = await response.read()
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UpstreamError(self.role, "malformed response body (not JSON)", retryable=True) from exc

    async def _open_stream(self, payload: dict[str, Any], tag: str) -> aiohttp.ClientResponse:
        response = await self.session.post(
            self.url, json=payload, headers=self._request_headers(tag), timeout=self._timeout(True)
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
            f"HTTP {status}{': ' + detail if detail else ''}",
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
    """A short, safe description of an upstream error: its message field, truncated."""
    try:
        body = await response.json(content_type=None)
        message = body.get("error", {}).get("message") if isinstance(body, dict) else None
    except (json.JSONDecodeError, aiohttp.ClientError, UnicodeDecodeError, AttributeError):
        message = None
    if not isinstance(message, str):
        return ""
    return message[:200]


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return ""
    if isinstance(exc, UpstreamError):
        return str(exc)
    return type(exc).__name__
