"""structlog setup (JSON under systemd or when configured, console on a TTY) and redaction."""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_SECRET_KEY = re.compile(
    r"(authorization|api[_-]?key|token|secret|password|credential|bearer)", re.IGNORECASE
)
_SECRET_VALUE = re.compile(
    r"(sk-[A-Za-z0-9_\-]{6,}|whsec_[A-Za-z0-9+/=]{6,}|Bearer\s+[A-Za-z0-9._\-]{6,}"
    r"|AIza[A-Za-z0-9_\-]{20,})"  # Google (Gemini) API keys
)
REDACTED = "[REDACTED]"
# Counters and names that merely contain the word "token" are not secrets.
_NOT_SECRET = re.compile(
    r"(^|_)(tokens?_(in|out)|est_tokens|tokens|token_limit|input_tokens|"
    r"output_tokens|cached_tokens|reasoning_tokens|total_tokens)$"
)


def redact_text(text: str) -> str:
    """Replace anything that looks like a key (sk-…, whsec_…, Bearer …) in a string."""
    return _SECRET_VALUE.sub(REDACTED, text)


def redact(value: Any, key: str | None = None) -> Any:
    """Walk nested values, hiding those under secret-looking keys or shaped like keys."""
    if key is not None and _SECRET_KEY.search(key) and not _NOT_SECRET.search(key.lower()):
        if isinstance(value, str | bytes) and value:
            return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact(v) for v in value)
    return value


def _redact_processor(
    _logger: Any, _name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    return {k: redact(v, k) for k, v in event_dict.items()}


def _format_exc_redacted(
    logger: Any, name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    event_dict = structlog.processors.format_exc_info(logger, name, event_dict)
    if "exception" in event_dict:
        event_dict["exception"] = redact_text(str(event_dict["exception"]))
    return event_dict


def setup(level: str = "info", fmt: str = "auto") -> None:
    """Configure structlog for the process; safe to call again (e.g. on SIGHUP)."""
    if fmt == "auto":
        under_systemd = "JOURNAL_STREAM" in os.environ or "INVOCATION_ID" in os.environ
        fmt = "console" if sys.stderr.isatty() and not under_systemd else "json"
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *([_format_exc_redacted] if fmt == "json" else []),
            _redact_processor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def get(name: str = "batchd") -> Any:
    """A bound logger."""
    return structlog.get_logger(name)
