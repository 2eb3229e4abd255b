"""Ingress deployment: the OpenAI API over HTTP, composing Thinker and Fuser through handles.

Everything that can fail fast (body, model, messages) is checked before the first byte, so the
HTTP status is real; after that a stream reports failures as an SSE error event.
"""


import uuid
from collections.abc import AsyncIterator
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from actors.config import ServiceConfig
from actors.log_setup import bind_request, configure_logging
from actors.pipeline import AllThreadsFailed, DeepThinkingRun
from actors.protocol import (
    APIError,
    completion_body,
    parse_request,
    sse,
    to_conversation,
    usage_body,
)
from actors.replies import (
    Reply,
    extension,
    log_request_complete,
    upstream_failed,
    with_keepalives,
)
from actors.schemas import FusionDelta, FusionJob, StepEvent, ThreadJob

log = structlog.get_logger(__name__)

KEEPALIVE_S = 10.0  # SSE comment interval during silent phases (proxies drop idle streams)

app = FastAPI(title="Token Killer", docs_url="/docs", redoc_url=None)


@app.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    error = APIError(exc.status_code, str(exc.detail), code=code)
    return JSONResponse(error.body(), status_code=exc.status_code)


def _request_id() -> str:
    try:  # Serve's id: the incoming X-Request-ID if the client sent one; returned as a header
        request_id = serve.context._get_serve_request_context().request_id
    except Exception:  # noqa: BLE001 - outside a Serve request
        request_id = ""
    return request_id or uuid.uuid4().hex



@serve.deployment(ray_actor_options={"num_cpus": 0.2}, max_ongoing_requests=1000)
@serve.ingress(app)
class Ingress:
    def __init__(self, config: ServiceConfig, thinker: DeploymentHandle, fuser: DeploymentHandle) -> None:
        configure_logging()
        self.config = config
        # Streaming handles, made once: each thread and the fusion are one call each.
        self.thinker = thinker.options(stream=True)
        self.fuser = fuser.options(stream=True)

    @app.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": self.config.served_model_name, "object": "model", "created": 0, "owned_by": "token-killer"}
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        chat = parse_request(await request.body())
        if chat.model != self.config.served_model_name:
            raise APIError(
                404,
                f"The model '{chat.model}' does not exist. Available: '{self.config.served_model_name}'.",
                param="model",
                code="model_not_found",
            )
        request_id = _request_id()
        bind_request(request_id)
        run = DeepThinkingRun(
            request_id,
            to_conversation(chat),
            self.config.thinking.num_threads,
            self._run_thread,
            self._fuse,
        )
        reply = Reply(request_id, chat, self.config)
        if chat.stream:
            return StreamingResponse(
                self._stream(run, reply), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        return await self._complete(run, reply)

    # --- composition through handles ---------------------------------------------------------

    async def _run_thread(self, job: ThreadJob) -> AsyncIterator[StepEvent]:
        async for event in self.thinker.run_thread.remote(job):
            yield event

    async def _fuse(self, job: FusionJob) -> AsyncIterator[FusionDelta]:
        async for delta in self.fuser.fuse.remote(job):
            yield delta

    # --- replies --------------------------------------------------------------------------------

    async def _complete(self, run: DeepThinkingRun, reply: Reply) -> JSONResponse:
        outcome = "cancelled"
        try:
            async for event in run.events():
                reply.add(event)
            outcome = "ok"
        except AllThreadsFailed as exc:
            outcome = "failed"
            raise upstream_failed(exc) from exc
        finally:
            log_request_complete(run, reply, outcome)
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

    async def _stream(self, run: DeepThinkingRun, reply: Reply) -> AsyncIterator[str]:
        outcome = "cancelled"
        yield sse(reply.chunk({"role": "assistant", "content": ""}))
        try:
            async for event in with_keepalives(run.events(), KEEPALIVE_S):
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
            yield sse(upstream_failed(exc).body())
        except Exception as exc:  # noqa: BLE001 - the status is sent; report in-band
            outcome = "failed"
            log.exception("stream_failed")
            yield sse(APIError(502, f"The request failed while streaming: {exc}", type="upstream_error").body())
        finally:
            log_request_complete(run, reply, outcome)
        yield sse("[DONE]")


