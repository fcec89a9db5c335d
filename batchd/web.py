"""The daemon's aiohttp app: /metrics, /healthz, /readyz; the HTTP queue and webhooks."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from batchd import queue_api, webhooks
from batchd.metrics import Metrics
from batchd.stages import Context

READY = web.AppKey("ready", dict)


def create_app(
    metrics: Metrics,
    refresh: Callable[[], Awaitable[None]],
    ctx: Context | None = None,
    token: str | None = None,
    webhook_secret: bytes | None = None,
) -> web.Application:
    """Build the app; `refresh` updates gauges computed from the store before a scrape.

    /v1/jobs is mounted only with a `token`, /webhooks/openai only with a `webhook_secret`.
    """
    app = web.Application()
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
        held = ctx.hold.view() if ctx is not None else None
        if held is not None:  # jobs wait for the operator: not ready, and why
            return web.json_response({"ready": False, "held": held}, status=503)
        return web.json_response({"ready": ok}, status=200 if ok else 503)

    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if ctx is not None and token:
        queue_api.mount(app, ctx, token)
    if ctx is not None and webhook_secret:
        webhooks.mount(app, ctx, webhook_secret)
    return app
