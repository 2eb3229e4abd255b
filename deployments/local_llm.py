"""Ray Serve deployment `LocalLLM`: the embedded llama.cpp model over HTTP.

Each replica owns one `LocalEngine` (llama.cpp's OpenAI-compatible server running
in the replica process) and relays OpenAI requests to it through one persistent
`aiohttp.ClientSession`. Routes (under the application's route prefix):

* ``POST /v1/chat/completions``: the JSON body is forwarded with ``model``
  forced to `LOCAL_MODEL_NAME`. Non-stream responses come back as JSON with the
  engine's status code and ``usage``. With ``"stream": true`` the engine's SSE
  bytes are relayed chunk by chunk as ``text/event-stream``
  (``stream_options.include_usage`` adds a final usage chunk).
* ``GET /v1/models``: lists `LOCAL_MODEL_NAME`.

Build it with `build_local_app` (``serve run deployments.local_llm:build_local_app``
or ``serve.run(build_local_app({}))``).
"""

# No `from __future__ import annotations`: Serve rebuilds the route signatures
# for the class-based view and FastAPI would then take `request: Request` as a
# query parameter (422 on every call).
import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve import Application

from actors.local_engine import LOCAL_MODEL_NAME, LocalEngine

logger = logging.getLogger("ray.serve")

# No overall timeout: a non-stream answer arrives in one piece after the whole
# generation, possibly after waiting for a free slot. A client disconnect cancels
# the request, which closes the engine connection, and llama.cpp then frees the
# slot. sock_read only guards against a hung engine.
_ENGINE_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=900)

app = FastAPI(title="Token Killer local LLM", docs_url=None, redoc_url=None)


def _error(status: int, message: str, type_: str = "invalid_request_error") -> JSONResponse:
    """OpenAI-shaped error body (the engine's own errors have the same shape)."""
    return JSONResponse(
        {"error": {"message": message, "type": type_, "code": status}},
        status_code=status,
    )


@serve.deployment
@serve.ingress(app)
class LocalLLM:
    """Owns a `LocalEngine` and relays the OpenAI API to it."""

    async def __init__(
        self,
        n_parallel: int = 8,
        n_ctx: int | None = None,
        n_threads: int = 2,
    ) -> None:
        self._session: aiohttp.ClientSession | None = None
        # The engine serves as many connections as Serve lets requests in (serve_config.yaml's
        # max_ongoing_requests for this deployment), plus spare ones for health probes.
        ongoing = serve.get_replica_context()._deployment_config.max_ongoing_requests
        self._engine = LocalEngine(
            n_parallel=n_parallel,
            n_ctx=n_ctx,
            n_threads=n_threads,
            max_connections=ongoing,
        )
        # Loading the model blocks for about a second; keep the loop free.
        await asyncio.to_thread(self._engine.start)
        self._created = int(time.time())
        self._chat_url = self._engine.base_url + "/chat/completions"
        self._health_url = self._engine.server_url + "/health"
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                # Serve caps chat requests at max_ongoing_requests (= the
                # engine's max_connections); the engine's 4 spare HTTP threads
                # are for check_health, so the pool must not make a health
                # probe wait behind 64 running requests.
                limit=self._engine.http_threads,
                # No keep-alive. llama.cpp closes idle keep-alive connections on
                # its own schedule, and reusing one just as it closes fails a
                # POST with ServerDisconnectedError (seen under load). Each idle
                # keep-alive connection would also pin one engine HTTP thread.
                # A new loopback connection per request costs well under 1 ms.
                force_close=True,
            ),
            timeout=_ENGINE_TIMEOUT,
        )
        logger.info("LocalLLM ready: %s at %s", LOCAL_MODEL_NAME, self._engine.base_url)

    # -- routes ------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        try:
            body: Any = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "Request body is not valid JSON.")
        if not isinstance(body, dict):
            return _error(400, "Request body must be a JSON object.")
        body["model"] = LOCAL_MODEL_NAME  # clients may send any model name
        stream = bool(body.get("stream"))

        assert self._session is not None
        try:
            resp = await self._session.post(self._chat_url, json=body)
        except (TimeoutError, aiohttp.ClientError) as exc:
            logger.warning("local engine unreachable: %r", exc)
            return _error(502, f"Local engine unreachable: {exc!r}", "engine_error")

        if stream and resp.status == 200:
            return StreamingResponse(
                self._relay(resp),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )

        # Non-stream answer, or an error before the stream started (JSON).
        try:
            content = await resp.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            return _error(502, f"Local engine failed: {exc!r}", "engine_error")
        finally:
            resp.release()
        return Response(
            content=content,
            status_code=resp.status,
            media_type=resp.content_type or "application/json",
        )

    @staticmethod
    async def _relay(resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        """Yield the engine's SSE bytes as they arrive, without re-framing.

        If the client goes away the generator is closed, which closes the
        engine connection; llama.cpp then cancels the generation.
        """
        try:
            async for chunk in resp.content.iter_any():
                yield chunk
        except (TimeoutError, aiohttp.ClientError) as exc:
            # Headers are already sent; end the stream with an SSE error event.
            logger.warning("local engine stream broke: %r", exc)
            error = {"message": f"Local engine failed: {exc!r}", "type": "engine_error", "code": 502}
            yield f"data: {json.dumps({'error': error})}\n\n".encode()
        finally:
            resp.close()

    @app.get("/v1/models")
    async def models(self) -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": LOCAL_MODEL_NAME,
                    "object": "model",
                    "created": self._created,
                    "owned_by": "token-killer",
                }
            ],
        }

    # -- Serve hooks -------------------------------------------------------

    async def check_health(self) -> None:
        """Called by Serve every health_check_period_s; raising marks the
        replica unhealthy and Serve replaces it. The engine keeps spare HTTP
        threads, so /health answers at once even with every slot busy."""
        if self._session is None or not self._engine.running:
            raise RuntimeError("local engine is not running")
        async with self._session.get(self._health_url, timeout=aiohttp.ClientTimeout(total=10)) as resp:
            if resp.status != 200:
                raise RuntimeError(f"local engine /health returned {resp.status}")

    async def __del__(self) -> None:
        """Serve awaits this once at shutdown, after draining requests
        (the @serve.ingress wrapper accepts an async __del__)."""
        session, self._session = getattr(self, "_session", None), None
        if session is not None:
            await session.close()
        engine = getattr(self, "_engine", None)
        if engine is not None and engine.running:
            await asyncio.to_thread(engine.stop)
            logger.info("LocalLLM shut down: local engine stopped")


def build_local_app(args: dict[str, Any]) -> Application:
    """App builder. Optional args: ``n_parallel``, ``n_ctx``, ``n_threads``
    (see `LocalEngine`); ``None`` or missing means the default."""
    args = dict(args or {})
    kwargs: dict[str, Any] = {}
    for key in ("n_parallel", "n_ctx", "n_threads"):
        value = args.pop(key, None)
        if value is not None:
            kwargs[key] = int(value)
    if args:
        raise ValueError(f"build_local_app: unknown args {sorted(args)}")
    return LocalLLM.bind(**kwargs)
