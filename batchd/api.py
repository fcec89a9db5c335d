"""The OpenAI Batch API client and the typed API errors, where they have always been
imported from. They live in `batchd.providers` now: `providers/errors.py` (the error
hierarchy every provider raises), `providers/http.py` (session, retries, downloads,
`Tap`, `Lines`) and `providers/openai.py` (`BatchApi`, the OpenAI provider).
"""

from __future__ import annotations

from batchd.providers.base import ATTEMPT_KEY
from batchd.providers.errors import (
    AccessDenied,
    ApiError,
    AuthError,
    InvalidRequest,
    NotFound,
    QuotaRefused,
    RateLimited,
    TlsError,
    Transient,
    WrongEndpoint,
)
from batchd.providers.http import Lines, Tap
from batchd.providers.openai import BatchApi

__all__ = [
    "ATTEMPT_KEY",
    "AccessDenied",
    "ApiError",
    "AuthError",
    "BatchApi",
    "InvalidRequest",
    "Lines",
    "NotFound",
    "QuotaRefused",
    "RateLimited",
    "Tap",
    "TlsError",
    "Transient",
    "WrongEndpoint",
]
