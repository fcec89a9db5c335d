"""One emulated provider API: a URL prefix, its auth, its error envelope, its routes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import ClassVar

from aiohttp import web

from batchd.emulator.http import json_response
from batchd.emulator.lines import Json
from batchd.emulator.state import ApiError, EmulatorState

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_KIND_BY_STATUS = {429: "requests", 500: "server_error", 502: "server_error", 503: "server_error"}


def bearer_token(request: web.Request) -> str:
    """The token of an ``Authorization: Bearer`` header, or ``""``."""
    header = request.headers.get("Authorization", "")
    return header[7:].strip() if header[:7].lower() == "bearer " else ""


class Provider:
    """One API served under :attr:`prefix`; subclasses set the class attributes and routes.

    The emulator's middleware counts calls, runs :meth:`auth` and renders every
    :class:`ApiError` with :meth:`error_body`; the fault middleware uses :meth:`fault` and the
    route keys in :attr:`create_routes` / :attr:`download_routes`.
    """

    name: ClassVar[str] = "openai"
    prefix: ClassVar[str] = "/v1/"
    create_routes: frozenset[str] = frozenset()
    download_routes: frozenset[str] = frozenset()

    def __init__(self, state: EmulatorState) -> None:
        self.state = state

    def auth(self, request: web.Request) -> None:
        """Raise a 401 unless the request carries an acceptable credential."""
        token = bearer_token(request)
        if not token:
            msg = "You didn't provide an API key. Provide it in an Authorization header."
            raise ApiError(401, msg)
        key = self.state.config.api_key
        if key is not None and token != key:
            raise ApiError(
                401, f"Incorrect API key provided: {token[:8]}...", None, "invalid_api_key"
            )

    def error_body(self, err: ApiError) -> Json:
        """``err`` in this API's error envelope."""
        return err.body()

    def error(self, err: ApiError, path: str = "") -> web.Response:
        """``err`` as a response to a request for ``path``."""
        return json_response(self.error_body(err), err.status)

    def fault(self, status: int, message: str, code: str | None, path: str = "") -> web.Response:
        """An injected fault (429 or 5xx) in this API's envelope."""
        err = ApiError(status, message, None, code, _KIND_BY_STATUS.get(status))
        return self.error(err, path)

    def routes(self) -> list[tuple[str, str, Handler]]:
        """(method, path, handler) of every route, paths starting with :attr:`prefix`."""
        raise NotImplementedError

    def open_routes(self) -> list[tuple[str, str, Handler]]:
        """Routes outside :attr:`prefix` (no auth, no faults), e.g. presigned upload URLs."""
        return []
