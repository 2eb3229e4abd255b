"""structlog set-up: one JSON object per line on stderr, request id bound per task.

Called once per process (each replica's constructor). Binding `request_id` with contextvars puts
it on every line a role logs while it serves that request, in whichever replica it runs.
"""

from __future__ import annotations

import logging
import sys

import structlog

_configured = False


def configure_logging(level: str = "INFO") -> None:
    global _configured
    if _configured:
        return
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(ensure_ascii=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    _configured = True


def bind_request(request_id: str) -> None:
    """Tag this task's log lines (Serve runs each request in its own task and context)."""
    structlog.contextvars.bind_contextvars(request_id=request_id)
