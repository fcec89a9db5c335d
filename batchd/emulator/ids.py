"""Object ids and timestamp formats shared by the emulated providers."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime


def new_id(prefix: str) -> str:
    """A fresh random object id such as ``batch_<hex>``."""
    return prefix + secrets.token_hex(12)


def rfc3339(unix: float | None) -> str | None:
    """``unix`` seconds as an RFC 3339 UTC string (``2024-01-15T14:30:00Z``), None stays None."""
    if unix is None:
        return None
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
