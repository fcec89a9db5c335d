"""Seeded fault injection for the emulator ("nothing lost, nothing twice" tests).

Every knob is a probability per API call (0.0 = off, 1.0 = always). Faults apply only to
matched routes of an emulated API (``/v1/*`` and every provider prefix) on requests that passed
authentication, never to ``/_emulator/*``; error bodies use that API's envelope.
Draws come from one ``random.Random(seed)``, so a given request sequence faults identically on
every run. Each injected fault is counted in ``EmulatorState.fault_counts`` under its knob name
(served in ``GET /_emulator/stats`` as ``fault_counts``).
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass
from typing import Protocol

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

TRUNCATE_KEY = web.RequestKey("emulator_truncate", bool)
_SERVER_ERRORS = (
    (500, "The server had an error while processing your request. Sorry about that!"),
    (502, "Bad gateway."),
    (503, "The engine is currently overloaded, please try again later."),
)


@dataclass
class FaultConfig:
    """Fault probabilities per API call; all 0.0 (off) by default."""

    seed: int = 0  # seed of the fault RNG
    rate_limit: float = 0.0  # 429 + Retry-After (seconds) and retry-after-ms headers
    retry_after_seconds: float = 0.05  # value advertised by rate_limit
    server_error: float = 0.0  # 500, 502 or 503 with an error envelope; request not acted on
    drop_connection: float = 0.0  # close the connection without any response; not acted on
    slow: float = 0.0  # delay the request by slow_seconds before handling it
    slow_seconds: float = 0.5
    ghost_create: float = 0.0  # batch create calls: batch created, then 500 or dropped connection
    truncated_download: float = 0.0  # file/results download: full Content-Length, half, close
    routes: frozenset[str] | None = None  # e.g. {"POST /v1/batches"}; None = every API route
    # Every knob that is on fires on the first request it can apply to, then at random:
    # a test that turns a knob on is sure to see it fire (seeded draws may never hit).
    force_first: bool = False

    def enabled(self) -> bool:
        """Whether any knob is on."""
        knobs = (self.rate_limit, self.server_error, self.drop_connection, self.slow)
        return any(p > 0 for p in (*knobs, self.ghost_create, self.truncated_download))


class _State(Protocol):
    fault_counts: Counter[str]


class Target(Protocol):
    """The emulated API a request is for (set on the request by the API middleware)."""

    create_routes: frozenset[str]  # "METHOD /canonical/path" keys that create a batch
    download_routes: frozenset[str]  # keys that stream a results or file download

    def fault(self, status: int, message: str, code: str | None, path: str = "") -> web.Response:
        """An injected error in this API's envelope (which may depend on the path)."""


TARGET_KEY = web.RequestKey[Target]("emulator_target")


def openai_error(status: int, message: str, kind: str, code: str | None) -> web.Response:
    """An error response in OpenAI's ``{"error": {message, type, param, code}}`` envelope."""
    err = {"message": message, "type": kind, "param": None, "code": code}
    return web.Response(
        body=orjson.dumps({"error": err}), status=status, content_type="application/json"
    )


def _drop(request: web.Request) -> web.Response:
    """Close the connection; the returned response can no longer be sent."""
    if request.transport is not None:
        request.transport.close()
    return web.Response(status=500)


def truncate_at(request: web.Request, size: int) -> int | None:
    """Bytes of a ``size``-byte download to send before closing, or None for all of them."""
    return size // 2 if request.get(TRUNCATE_KEY) else None


def fault_middleware(cfg: FaultConfig, state: _State) -> Middleware:
    """The middleware injecting ``cfg``'s faults; install it inside the auth middleware."""
    rng = random.Random(cfg.seed)

    forced: set[str] = set()

    def draw(p: float, name: str = "") -> bool:
        if p > 0 and cfg.force_first and name and name not in forced:
            forced.add(name)
            return True
        return p > 0 and rng.random() < p

    def hit(name: str, p: float) -> bool:
        if draw(p, name):
            state.fault_counts[name] += 1
            return True
        return False

    @web.middleware
    async def faults(request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        target: Target | None = request.get(TARGET_KEY)
        if resource is None or target is None:
            return await handler(request)
        key = f"{request.method} {resource.canonical}"
        if cfg.routes is not None and key not in cfg.routes:
            return await handler(request)
        if hit("slow", cfg.slow):
            await asyncio.sleep(cfg.slow_seconds)
        if hit("drop_connection", cfg.drop_connection):
            return _drop(request)
        if hit("rate_limit", cfg.rate_limit):
            resp = target.fault(
                429, "Rate limit reached (emulated).", "rate_limit_exceeded", request.path
            )
            resp.headers["Retry-After"] = f"{cfg.retry_after_seconds:g}"
            resp.headers["retry-after-ms"] = str(round(cfg.retry_after_seconds * 1000))
            return resp
        if hit("server_error", cfg.server_error):
            status = rng.choice(_SERVER_ERRORS)[0]
            return target.fault(status, dict(_SERVER_ERRORS)[status], None, request.path)
        if key in target.download_routes and hit("truncated_download", cfg.truncated_download):
            request[TRUNCATE_KEY] = True
        if key in target.create_routes and draw(cfg.ghost_create, "ghost_create"):
            drop = rng.random() < 0.5
            created = await handler(request)
            if created.status >= 300:  # nothing was created: no ghost
                return created
            state.fault_counts["ghost_create"] += 1
            ghost = dict(_SERVER_ERRORS)[500]
            return _drop(request) if drop else target.fault(500, ghost, None, request.path)
        return await handler(request)

    return faults
