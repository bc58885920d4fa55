"""structlog setup: readable on a terminal, JSON under systemd or when asked."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _under_systemd() -> bool:
    # systemd sets JOURNAL_STREAM when stderr goes to the journal; INVOCATION_ID for any unit.
    return bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"))


def resolve_format(fmt: str) -> str:
    if fmt == "auto":
        return "json" if _under_systemd() else "console"
    return fmt


def configure(fmt: str = "auto", level: str = "info") -> None:
    """Configure structlog once for the process. fmt: auto|console|json."""
    fmt = resolve_format(fmt)
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def get(name: str = "xenblk", **bind: Any) -> Any:
    return structlog.get_logger(name).bind(**bind)
