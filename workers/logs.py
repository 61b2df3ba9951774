"""structlog set-up: readable lines in a terminal, JSON lines in production (RAMPLUS_LOG__FORMAT=json)."""

from __future__ import annotations

import logging
import os
import sys

import structlog


class _StderrLogger:
    """Writes to whatever `sys.stderr` is at call time (it may be swapped, e.g. by test runners)."""

    def msg(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


def configure_logging(level: str | None = None, fmt: str | None = None) -> None:
    # From the environment, not Settings: logging starts first, so that a settings error is logged too
    # (the names are those of Settings.log).
    level_name = (level or os.environ.get("RAMPLUS_LOG__LEVEL", "INFO")).upper()
    fmt = fmt or os.environ.get("RAMPLUS_LOG__FORMAT") or ("console" if sys.stderr.isatty() else "json")
    renderer = structlog.dev.ConsoleRenderer() if fmt == "console" else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping().get(level_name, logging.INFO)),
        logger_factory=lambda *args: _StderrLogger(),
        cache_logger_on_first_use=False,
    )
