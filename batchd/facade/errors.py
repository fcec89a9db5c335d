"""Errors in OpenAI's envelope: `{"error": {"message", "type", "param", "code"}}`.

The status selects the SDK's exception class; `x-should-retry: false` stops the SDK from
retrying a 409 (it retries 408/409/429/5xx by default).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

_TYPES = {401: "invalid_request_error", 429: "rate_limit_exceeded"}


def json_response(
    obj: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    """A JSON response encoded with orjson."""
    return web.Response(
        body=orjson.dumps(obj), status=status, headers=headers, content_type="application/json"
    )


class ApiError(Exception):
    """An API error answered in OpenAI's envelope."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("server_error" if status >= 500 else _TYPES.get(status))

    def body(self) -> dict[str, Any]:
        """The `{"error": {...}}` object."""
        err = {
            "message": self.message,
            "type": self.kind or "invalid_request_error",
            "param": self.param,
            "code": self.code,
        }
        return {"error": err}

    def response(self) -> web.Response:
        """The JSON response (a 409 is marked not to be retried)."""
        headers = {"x-should-retry": "false"} if self.status == 409 else {}
        if self.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return json_response(self.body(), self.status, headers)


def not_found(what: str, object_id: str, param: str = "id") -> ApiError:
    """404 for an object that does not exist for this tenant (another tenant's looks the same)."""
    return ApiError(404, f"No such {what}: '{object_id}'", param, None)


def invalid(param: str, message: str, code: str | None = "invalid_value") -> ApiError:
    """400 for a bad parameter."""
    return ApiError(400, message, param, code)


def missing(param: str) -> ApiError:
    """400 for a required parameter that is absent."""
    msg = f"Missing required parameter: '{param}'."
    return ApiError(400, msg, param, "missing_required_parameter")
