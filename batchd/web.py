"""The daemon's aiohttp app: /metrics, /healthz, /readyz; the HTTP queue and webhooks."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from batchd import logs, queue_api, webhooks
from batchd.metrics import Metrics
from batchd.queue_api import Problem
from batchd.stages import Context

if TYPE_CHECKING:
    from batchd.facade import Facade

READY = web.AppKey("ready", dict)
_CODES = {404: "not_found", 405: "method_not_allowed", 413: "too_large", 417: "expectation_failed"}


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error is `{"error": {"message", "code"}}`: unknown routes and methods too."""
    req = request
    try:
        return await handler(req)
    except Problem as p:
        return p.response()
    except web.HTTPException as e:
        if e.status < 400:
            raise
        if e.status == 404:
            message = f"no route {req.method} {req.path}"
        elif e.status == 405:
            message = f"{req.method} is not allowed on {req.path} (allowed: {e.headers['Allow']})"
        else:
            message = e.reason
        problem = Problem(e.status, _CODES.get(e.status, "http_error"), message)
        resp = problem.response()
        if "Allow" in e.headers:
            resp.headers["Allow"] = e.headers["Allow"]
        return resp
    except Exception:
        logs.get().exception("http_handler_failed", method=req.method, path=req.path)
        return Problem(500, "internal", "internal error (see the daemon's log)").response()


def create_app(
    metrics: Metrics,
    refresh: Callable[[], Awaitable[None]],
    ctx: Context | None = None,
    token: str | None = None,
    webhook_secret: bytes | None = None,
    facade: Facade | None = None,
) -> web.Application:
    """Build the app; `refresh` updates gauges computed from the store before a scrape.

    /v1/jobs is mounted only with a `token`, /webhooks/openai only with a `webhook_secret`,
    the OpenAI-compatible /v1/files, /v1/uploads, /v1/batches only with a `facade`.
    """
    app = web.Application(middlewares=[errors_as_json])
    app[READY] = {"ready": False}

    async def metrics_handler(_req: web.Request) -> web.Response:
        await refresh()
        return web.Response(
            body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def healthz(_req: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(req: web.Request) -> web.Response:
        ok = bool(req.app[READY]["ready"])
        holds = [v for h in ctx.holds.values() if (v := h.view())] if ctx is not None else []
        if holds:  # jobs wait for the operator: not ready, and why (per provider)
            body = {"ready": False, "held": holds[0], "holds": holds}
            return web.json_response(body, status=503)
        return web.json_response({"ready": ok}, status=200 if ok else 503)

    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if ctx is not None and token:
        queue_api.mount(app, ctx, token)
    if ctx is not None and webhook_secret:
        webhooks.mount(app, ctx, webhook_secret)
    if facade is not None:
        facade.mount(app)
    return app
