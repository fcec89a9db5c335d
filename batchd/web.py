"""The daemon's aiohttp app: /metrics, /healthz, /readyz."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from batchd.metrics import Metrics

READY = web.AppKey("ready", dict)


def create_app(metrics: Metrics, refresh: Callable[[], Awaitable[None]]) -> web.Application:
    """Build the app; `refresh` updates gauges computed from the store before a scrape."""
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
        return web.json_response({"ready": ok}, status=200 if ok else 503)

    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
