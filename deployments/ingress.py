"""Ingress deployment: the OpenAI API's routes (chat completions, responses), and the pipeline
bound to the deployment handles.

Replies are built by `actors/serving.py` and its two wire formats (`serving_chat.py`,
`serving_responses.py`); errors of every kind leave in the OpenAI shape.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures at import time.
import uuid
import weakref
from collections.abc import AsyncIterator, Callable

import structlog
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from actors.admission import Grant, open_gate
from actors.config import ServiceConfig
from actors.log_setup import bind_request
from actors.pipeline import DeepThinkingRun
from actors.prompts import PromptSet
from actors.protocol import APIError
from actors.schemas import FusionDelta, FusionJob, ThinkJob, ThinkUpdate
from actors.serving import Prepared, internal_error
from actors.serving_chat import ChatServing
from actors.serving_responses import ResponsesServing
from deployments.handles import call_with_retries, stream_with_retries
from deployments.metrics import ServiceMetrics
from deployments.replica import start_process_care

log = structlog.get_logger(__name__)

app = FastAPI(title="Token Killer", docs_url="/docs", redoc_url=None)


def _request_id() -> str:
    try:  # Serve's id: the incoming X-Request-ID if the client sent one; returned as a header
        request_id = serve.context._get_serve_request_context().request_id
    except Exception:  # noqa: BLE001 - outside a Serve request
        request_id = ""
    return request_id or uuid.uuid4().hex


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


@app.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return _error_response(exc)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return _error_response(APIError(exc.status_code, str(exc.detail), code=code))


@app.exception_handler(Exception)
async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    """Anything else: an OpenAI-shaped 500, never a bare one; the traceback goes to the log."""
    request_id = _request_id()
    log.error("unexpected_error", request_id=request_id, exc_info=exc)
    return _error_response(internal_error(request_id))


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


async def authorized(request: Request) -> None:
    """The client's key (keys file, TOKEN_KILLER_API_KEYS), on every /v1 route. Async: FastAPI
    would run a plain function in a thread pool, a thread hop per request."""
    request.state.key = request.app.state.gate.authenticate(request.headers.get("authorization"))


# Defined before the deployment: Serve captures the class (and what it refers to) when it is
# decorated.
async def _released(lines: AsyncIterator[str], release) -> AsyncIterator[str]:
    try:
        async for line in lines:
            yield line
    finally:
        release()


@serve.deployment
@serve.ingress(app)
class Ingress:
    async def __init__(
        self, config: ServiceConfig, prompts: PromptSet, thinker: DeploymentHandle, fuser: DeploymentHandle
    ) -> None:
        self._care = start_process_care()
        self.limits = config.limits
        # Keys, their limits and spend, the replica's slots (actors/admission.py).
        self.gate = await open_gate(config.keys, config.limits, [k.get_secret_value() for k in config.service_api_keys])
        app.state.gate = self.gate
        self.metrics = ServiceMetrics()
        # Handles made once. One call thinks a whole request and one fuses it: streamed for SSE
        # clients, whole (one message each way) for JSON clients.
        self.thinker_stream = thinker.options(stream=True)
        self.thinker = thinker
        self.fuser_stream = fuser.options(stream=True)
        self.fuser = fuser
        # The two wire formats, over the same stages.
        stages = {
            "think_stream": self._think_stream,
            "think_whole": self._think_whole,
            "fuse_stream": self._fuse_stream,
            "fuse_whole": self._fuse_whole,
            "on_finish": self._finished,
        }
        self.serving = ChatServing(config, prompts, **stages)
        self.responses_serving = ResponsesServing(config, prompts, **stages)

    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models(self, request: Request) -> dict:
        listing = self.serving.models()
        key = request.state.key
        if key is not None and key.profiles is not None:  # the profiles this key may use
            listing.data = [card for card in listing.data if card.id in key.profiles]
        return listing.model_dump()

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorized)])
    async def model(self, model_id: str) -> dict:
        return self.serving.model(model_id).model_dump()

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(self, request: Request):
        return await self._reply(self.serving, request)

    @app.post("/v1/responses", dependencies=[Depends(authorized)])
    async def responses(self, request: Request):
        return await self._reply(self.responses_serving, request)

    @app.api_route(
        "/v1/responses/{response_id:path}", methods=["GET", "POST", "DELETE"], dependencies=[Depends(authorized)]
    )
    async def stored_response(self, response_id: str):
        raise APIError(
            404,
            f"No response '{response_id}' is stored here: this service is stateless (store: false) and keeps "
            "no responses to fetch, cancel, delete or compact.",
            code="not_found",
        )

    async def _reply(self, serving: ChatServing | ResponsesServing, request: Request):
        """Either wire format: checked, admitted, then a JSON body or an SSE stream."""
        grant, release = await self._admit(request.state.key)
        try:
            raw = await _read_body(request, self.limits.max_body_bytes)
            request_id = _request_id()
            bind_request(request_id)
            prepared = serving.prepare(raw, request_id, grant)
        except BaseException:
            release()
            raise
        if not prepared.ask.stream:
            try:
                body = await serving.complete(prepared)
            finally:
                release()
            return Response(serving.encode(body), media_type="application/json")
        try:
            lines = await serving.stream(prepared)
        except BaseException:
            release()
            raise
        # If the client leaves before the stream starts, the generator never runs its finally.
        weakref.finalize(lines, release)
        return StreamingResponse(
            _released(lines, release), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    async def _admit(self, key) -> tuple[Grant, Callable[[], None]]:
        """The key's limits and a slot among `limits.max_in_flight` (or 429 / 503), and how to
        give the slot back."""
        slots = self.gate.slots
        try:
            grant, slot = await self.gate.admit(key)
        except APIError as exc:
            self.metrics.key_request(key.id if key else None, exc.code or "refused")
            raise
        self.metrics.key_request(grant.key_id, "admitted")
        self.metrics.in_flight.set(slots.current)

        def release() -> None:
            slot.release()
            self.metrics.in_flight.set(slots.current)

        return grant, release

    # --- the pipeline's stages, bound to the handles --------------------------------------------

    def _think_stream(self, job: ThinkJob) -> AsyncIterator[ThinkUpdate]:
        return stream_with_retries(lambda: self.thinker_stream.think.remote(job))

    async def _think_whole(self, job: ThinkJob) -> AsyncIterator[ThinkUpdate]:
        yield await call_with_retries(lambda: self.thinker.think_whole.remote(job))

    def _fuse_stream(self, job: FusionJob) -> AsyncIterator[FusionDelta]:
        return stream_with_retries(lambda: self.fuser_stream.fuse.remote(job))

    async def _fuse_whole(self, job: FusionJob) -> AsyncIterator[FusionDelta]:
        yield await call_with_retries(lambda: self.fuser.answer.remote(job))

    def _finished(self, prepared: Prepared, run: DeepThinkingRun, outcome: str) -> None:
        usage = run.stats.usage
        self.gate.record(prepared.key_id, usage.prompt_tokens, usage.completion_tokens, usage.cost_usd)
        self.metrics.request_done(prepared.profile, run.stats, prepared.key_id)

    async def __del__(self) -> None:
        await self.gate.close()
