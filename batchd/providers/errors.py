"""Typed errors of every provider API, so that a retry policy is a type check.

Every provider module raises these (each parses its own error envelope into them);
the stages never look at a provider's error text to decide what to do.
"""

from __future__ import annotations

from typing import Any

from batchd.logs import redact_text


class ApiError(Exception):
    """An error from a provider's API (or from reaching it)."""

    def __init__(
        self,
        message: str,
        status: int = 0,
        code: str | None = None,
        type: str | None = None,
        param: str | None = None,
    ) -> None:
        self.message = redact_text(message)
        super().__init__(self.message)
        self.status, self.code, self.type, self.param = status, code, type, param
        self.provider: str | None = None  # the configured provider NAME, set by the client

    def to_dict(self) -> dict[str, Any]:
        """The API's error envelope fields."""
        return {
            "status": self.status,
            "message": self.message,
            "code": self.code,
            "type": self.type,
            "param": self.param,
        }


class Transient(ApiError):
    """5xx, timeout or dropped connection: worth retrying; outcome of a write unknown."""


class RateLimited(Transient):
    """429: retry after `retry_after` seconds; the request was not acted on."""

    def __init__(self, message: str, retry_after: float | None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class TlsError(Transient):
    """The TLS handshake failed (unknown CA, name mismatch, expired, client certificate
    required): not retried within a call; the stage tries again later."""

    def __init__(self, op: str, cause: str) -> None:
        super().__init__(f"{op}: {cause}")
        self.cause = cause


class InvalidRequest(ApiError):
    """400 and other 4xx not listed below: retrying would not help."""


class QuotaRefused(ApiError):
    """A create refused for a quota that frees up as batches finish (Azure's
    `token_limit_exceeded` at create): admission waits and tries again; not the job's
    fault. `limit` is the stated limit, when the message gives one."""

    def __init__(self, message: str, limit: int | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.limit = limit


class AccessDenied(InvalidRequest):
    """The operator's problem, not a job's: no job can get through until it is fixed
    (a missing, wrong or revoked key; an API root that is not one). Jobs wait."""


class AuthError(AccessDenied):
    """401/403: the key is missing, wrong, or lacks permission."""


class WrongEndpoint(AccessDenied):
    """404 from a route that always exists: the provider's base URL does not point at
    the API (typically a missing `/v1`)."""


class NotFound(InvalidRequest):
    """404: unknown id."""
