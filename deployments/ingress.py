"""Ingress deployment: the OpenAI API over HTTP, composing Thinker and Fuser through handles.

Everything that can fail fast (body, model, messages) is checked before the first byte, so the
HTTP status is real; after that a stream reports failures as an SSE error event.
"""


import asyncio
import time
import uuid
import weakref
from collections.abc import AsyncIterator
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from actors.admission import InFlightLimit, Ticket, check_bearer
from actors.config import ServiceConfig
from actors.log_setup import bind_request, configure_logging
from actors.pipeline import AllThreadsFailed, DeepThinkingRun
from actors.protocol import (
    APIError,
    completion_body,
    enforce_limits,
    parse_request,
    sse,
    to_conversation,
    usage_body,
)
from actors.replies import (
    Reply,
    extension,
    log_request_complete,
    request_failed,
    with_keepalives,
)
from actors.schemas import FusionDelta, FusionJob, StepEvent, ThreadJob
from deployments.metrics import ServiceMetrics

log = structlog.get_logger(__name__)

THREAD_ATTEMPTS = 3  # a thread is restarted on another replica if its replica dies early

app = FastAPI(title="Token Killer", docs_url="/docs", redoc_url=None)


@app.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    error = APIError(exc.status_code, str(exc.detail), code=code)
    return JSONResponse(error.body(), status_code=exc.status_code)


def _is_capacity_error(exc: BaseException) -> bool:
    """Our own replicas died or pushed back (not an upstream): retrying soon can help."""
    return isinstance(exc, (RayActorError, BackPressureError, DeploymentUnavailableError))


def _unwrapped(exc: RayTaskError) -> BaseException:
    """The exception a replica raised, without Ray's wrapper and its remote traceback."""
    return exc.cause if isinstance(exc.cause, BaseException) else exc


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    too_large = APIError(413, f"Request body exceeds {limit} bytes.", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _request_id() -> str:
    try:  # Serve's id: the incoming X-Request-ID if the client sent one; returned as a header
        request_id = serve.context._get_serve_request_context().request_id
    except Exception:  # noqa: BLE001 - outside a Serve request
        request_id = ""
    return request_id or uuid.uuid4().hex



@serve.deployment(ray_actor_options={"num_cpus": 0.2}, max_ongoing_requests=1100)
@serve.ingress(app)
class Ingress:
    def __init__(self, config: ServiceConfig, thinker: DeploymentHandle, fuser: DeploymentHandle) -> None:
        configure_logging()
        self.config = config
        self.in_flight = InFlightLimit(config.limits.max_in_flight, config.limits.retry_after_s)
        self.metrics = ServiceMetrics()
        # Streaming handles, made once: each thread and the fusion are one call each.
        self.thinker = thinker.options(stream=True)
        self.fuser = fuser.options(stream=True)

    @app.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        check_bearer(request.headers.get("authorization"), self.config.service_api_keys)
        return {
            "object": "list",
            "data": [
                {"id": self.config.served_model_name, "object": "model", "created": 0, "owned_by": "token-killer"}
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        limits = self.config.limits
        check_bearer(request.headers.get("authorization"), self.config.service_api_keys)
        chat = parse_request(await _read_body(request, limits.max_body_bytes))
        if chat.model != self.config.served_model_name:
            raise APIError(
                404,
                f"The model '{chat.model}' does not exist. Available: '{self.config.served_model_name}'.",
                param="model",
                code="model_not_found",
            )
        enforce_limits(chat, limits.max_messages, limits.max_total_chars)
        conversation = to_conversation(chat)
        ticket = self.in_flight.enter()
        self.metrics.in_flight.set(self.in_flight.current)
        request_id = _request_id()
        bind_request(request_id)
        budget = min(chat.deadline_s or limits.deadline_s, limits.deadline_s)
        reserve = min(limits.fusion_reserve_s, budget / 2)  # a short budget still gets to think
        run = DeepThinkingRun(
            request_id,
            conversation,
            self.config.thinking.num_threads,
            self._run_thread,
            self._fuse,
            thinking_deadline=time.time() + budget - reserve,
        )
        reply = Reply(request_id, chat, self.config)
        if not chat.stream:
            return await self._complete(run, reply, ticket)
        stream = self._stream(run, reply, ticket)
        # If the client leaves before the stream starts, the generator never runs its finally.
        weakref.finalize(stream, self._release, ticket)
        return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # --- composition through handles ---------------------------------------------------------

    async def _run_thread(self, job: ThreadJob) -> AsyncIterator[StepEvent]:
        # A thread whose replica died before it reported anything starts again on another
        # replica; once steps are out, a restart would repeat them, so the thread is dropped.
        for attempt in range(1, THREAD_ATTEMPTS + 1):
            started = False
            try:
                async for event in self.thinker.run_thread.remote(job):
                    started = True
                    yield event
                return
            except RayTaskError as exc:
                raise _unwrapped(exc) from None
            except (RayActorError, DeploymentUnavailableError) as exc:
                if started or attempt == THREAD_ATTEMPTS:
                    raise
                log.warning("thread_replica_lost_restarting", thread=job.thread_index, error=type(exc).__name__)
                await asyncio.sleep(0.1 * attempt)

    async def _fuse(self, job: FusionJob) -> AsyncIterator[FusionDelta]:
        try:
            async for delta in self.fuser.fuse.remote(job):
                yield delta
        except RayTaskError as exc:
            raise _unwrapped(exc) from None

    # --- replies --------------------------------------------------------------------------------

    def _release(self, ticket: Ticket) -> None:
        ticket.release()
        self.metrics.in_flight.set(self.in_flight.current)

    def _finish(self, run: DeepThinkingRun, reply: Reply, ticket: Ticket, outcome: str) -> None:
        self._release(ticket)
        self.metrics.request_done(run.stats)
        log_request_complete(run, reply, outcome)

    async def _complete(self, run: DeepThinkingRun, reply: Reply, ticket: Ticket) -> JSONResponse:
        outcome = "cancelled"
        try:
            async for event in run.events():
                reply.add(event)
            outcome = "ok"
        except AllThreadsFailed as exc:
            outcome = "failed"
            raise self._failure(exc) from exc
        finally:
            self._finish(run, reply, ticket, outcome)
        return JSONResponse(
            completion_body(
                id=reply.id,
                created=reply.created,
                model=reply.model,
                content="".join(reply.content),
                reasoning="".join(reply.reasoning) if reply.show_reasoning else None,
                usage=run.stats.usage,
                extension=extension(run),
            )
        )

    def _failure(self, exc: AllThreadsFailed) -> APIError:
        capacity = any(_is_capacity_error(e) for e in exc.errors)
        return request_failed(exc, capacity=capacity, retry_after_s=self.config.limits.retry_after_s)

    async def _stream(self, run: DeepThinkingRun, reply: Reply, ticket: Ticket) -> AsyncIterator[str]:
        outcome = "cancelled"
        try:
            yield sse(reply.chunk({"role": "assistant", "content": ""}))
            async for event in with_keepalives(run.events(), self.config.stream_keepalive_s):
                if event is None:
                    yield ": keepalive\n\n"
                    continue
                text = reply.add(event)
                if text:
                    key = "content" if isinstance(event, FusionDelta) else "reasoning_content"
                    yield sse(reply.chunk({key: text}))
            yield sse(reply.chunk({}, finish_reason="stop"))
            if reply.include_usage:
                yield sse(
                    {
                        "id": reply.id,
                        "object": "chat.completion.chunk",
                        "created": reply.created,
                        "model": reply.model,
                        "choices": [],
                        "usage": usage_body(run.stats.usage),
                        "token_killer": extension(run),
                    }
                )
            outcome = "ok"
        except AllThreadsFailed as exc:
            outcome = "failed"
            yield sse(self._failure(exc).body())
        except Exception as exc:  # noqa: BLE001 - the status is sent; report in-band
            outcome = "failed"
            log.exception("stream_failed")
            yield sse(APIError(502, f"The request failed while streaming: {exc}", type="upstream_error").body())
        finally:
            self._finish(run, reply, ticket, outcome)
        yield sse("[DONE]")


