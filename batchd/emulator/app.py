"""The emulator's aiohttp application: every emulated provider API under its own URL prefix
(OpenAI at ``/v1``), plus ``/_emulator/stats``.

Prefixes and what each serves: :mod:`batchd.emulator.providers`. Optional fault injection:
:mod:`batchd.emulator.faults`; webhooks: :mod:`batchd.emulator.webhooks`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from batchd.emulator.faults import TARGET_KEY, fault_middleware
from batchd.emulator.http import json_response
from batchd.emulator.providers import PROVIDERS
from batchd.emulator.providers.base import Provider
from batchd.emulator.state import ApiError, EmulatorConfig, EmulatorState
from batchd.emulator.webhooks import webhook_ctx

STATE_KEY = web.AppKey("emulator_state", EmulatorState)


def mounted(state: EmulatorState) -> list[Provider]:
    """The provider APIs this emulator serves (``config.providers``; default: all)."""
    wanted = state.config.providers
    return [cls(state) for name, cls in PROVIDERS.items() if wanted is None or name in wanted]


def create_app(state: EmulatorState) -> web.Application:
    """Build the emulator application; ``app[STATE_KEY]`` is ``state``."""
    apis = mounted(state)
    by_prefix = sorted(apis, key=lambda a: len(a.prefix), reverse=True)

    def api_of(path: str) -> Provider | None:
        return next((a for a in by_prefix if path.startswith(a.prefix)), None)

    @web.middleware
    async def api_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        api = api_of(request.path)
        if api is None:
            return await handler(request)
        resource = request.match_info.route.resource
        if resource is not None:
            state.calls[f"{request.method} {resource.canonical}"] += 1
        try:
            api.auth(request)
            request[TARGET_KEY] = api
            resp = await handler(request)
            if (
                request.method == "GET"
                and resource is not None
                and resource.canonical.startswith("/v1/batches")
                and resp.status == 200
            ):
                # Status calls answered, timed, with who made them (`batchd (tracker)`):
                # how many replicas make per interval is checked against one daemon's.
                state.polls.append((state.now(), request.headers.get("User-Agent", "")))
            return resp
        except ApiError as exc:
            return api.error(exc, request.path)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            url = f"Invalid URL ({request.method} {request.path})"
            err = ApiError(exc.status, url if exc.status in (404, 405) else exc.reason)
            return api.error(err, request.path)

    async def stats(_request: web.Request) -> web.StreamResponse:
        return json_response(state.stats())

    async def polls(_request: web.Request) -> web.StreamResponse:
        """Every status call so far: [seconds since the first, User-Agent]."""
        t0 = state.polls[0][0] if state.polls else 0.0
        return json_response({"polls": [[round(t - t0, 4), ua] for t, ua in state.polls]})

    middlewares: list[Middleware] = [api_middleware]  # outermost: faults only after auth
    if state.config.faults.enabled():
        middlewares.append(fault_middleware(state.config.faults, state))
    app = web.Application(middlewares=middlewares, client_max_size=1024**3)
    app[STATE_KEY] = state
    if state.config.webhook_url:
        app.cleanup_ctx.append(webhook_ctx(state))
    for api in apis:
        for method, path, handler in api.routes() + api.open_routes():
            app.router.add_route(method, path, handler)
    app.router.add_get("/_emulator/stats", stats)
    app.router.add_get("/_emulator/polls", polls)
    return app


async def serve(
    host: str,
    port: int,
    config: EmulatorConfig,
    ready: Callable[[str, int], None] | None = None,
) -> None:
    """Serve the emulator on ``host:port`` until cancelled; `ready(host, port)` is called
    with the address actually bound (port 0 picks a free one)."""
    state = EmulatorState(config)
    runner = web.AppRunner(create_app(state), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        if ready is not None:
            bound_host, bound_port = runner.addresses[0][:2]
            ready(str(bound_host), int(bound_port))
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        state.close()
