"""Standard Webhooks delivery of ``batch.<status>`` events when a batch becomes terminal.

With ``EmulatorConfig.webhook_url`` set, a ticker advances the lifecycle every
:data:`TICK_SECONDS` (so events fire without polling) and POSTs
``{"id":"evt_…","object":"event","type":"batch.completed","created_at":…,"data":{"id":…}}``
with headers ``webhook-id``, ``webhook-timestamp`` and, given ``webhook_secret``
(``whsec_<base64>``), ``webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{ts}.{body}">``.
Non-2xx answers and connection errors are retried ``webhook_max_attempts`` times in all, with
doubling backoff from ``webhook_backoff_seconds``; the webhook id stays the same across retries.
``EmulatorState.webhook_counts`` counts ``attempts``, ``delivered`` and ``failed`` (gave up).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from batchd.emulator.ids import new_id
from batchd.emulator.lines import Json
from batchd.emulator.state import Batch, EmulatorState

TICK_SECONDS = 0.05


def secret_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_<base64>`` secret (padding optional)."""
    return base64.b64decode(secret.removeprefix("whsec_") + "==")


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value for one delivery."""
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def event_for(b: Batch) -> Json:
    """The event announcing that ``b`` reached its (terminal) status."""
    created = b.ts.get(f"{b.status}_at", int(time.time()))
    head = {"id": new_id("evt_"), "object": "event", "type": f"batch.{b.status}"}
    return head | {"created_at": created, "data": {"id": b.id}}


class _Sender:
    def __init__(self, state: EmulatorState, session: aiohttp.ClientSession) -> None:
        self.state, self.session, self.cfg = state, session, state.config
        self.key = secret_key(self.cfg.webhook_secret) if self.cfg.webhook_secret else None
        self.tasks: set[asyncio.Task[None]] = set()

    async def tick(self) -> None:
        while True:
            self.state.advance()
            done, self.state.finished = self.state.finished, []
            for b in done:
                task = asyncio.create_task(self.deliver(event_for(b)))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            await asyncio.sleep(TICK_SECONDS)

    async def deliver(self, event: Json) -> None:
        body, counts, url = orjson.dumps(event), self.state.webhook_counts, self.cfg.webhook_url
        assert url is not None
        for attempt in range(max(1, self.cfg.webhook_max_attempts)):
            if attempt:
                await asyncio.sleep(self.cfg.webhook_backoff_seconds * 2 ** (attempt - 1))
            ts = int(time.time())
            headers = {"Content-Type": "application/json", "webhook-id": event["id"]}
            headers["webhook-timestamp"] = str(ts)
            if self.key is not None:
                headers["webhook-signature"] = sign(self.key, event["id"], ts, body)
            counts["attempts"] += 1
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with self.session.post(url, data=body, headers=headers) as r:
                    if 200 <= r.status < 300:
                        counts["delivered"] += 1
                        return
        counts["failed"] += 1


def webhook_ctx(state: EmulatorState) -> Callable[[web.Application], AsyncIterator[None]]:
    """An ``app.cleanup_ctx`` entry running the ticker and deliveries while the app runs."""

    async def ctx(_app: web.Application) -> AsyncIterator[None]:
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            sender = _Sender(state, session)
            ticker = asyncio.create_task(sender.tick())
            try:
                yield
            finally:
                tasks: list[asyncio.Task[Any]] = [ticker, *sender.tasks]
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    return ctx
