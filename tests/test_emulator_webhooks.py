"""Webhook delivery of the emulator, received by a loopback aiohttp server."""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from tests.test_emulator import call, create, emulator, req, upload

SECRET = "whsec_" + base64.b64encode(os.urandom(24)).decode()
Delivery = tuple[dict[str, str], bytes]


@asynccontextmanager
async def receiver(fail_first: int = 0) -> AsyncIterator[tuple[str, list[Delivery]]]:
    """A webhook endpoint answering 500 to the first `fail_first` deliveries."""
    got: list[Delivery] = []

    async def hook(request: web.Request) -> web.Response:
        got.append((dict(request.headers), await request.read()))
        return web.Response(status=500 if len(got) <= fail_first else 204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/hook", got
    finally:
        await runner.cleanup()


async def until(cond: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_event_arrives_without_polling_and_verifies() -> None:
    async with (
        receiver() as (url, got),
        emulator(webhook_url=url, webhook_secret=SECRET) as (s, _),
    ):
        batch = await create(s, [req(i) for i in range(3)])
        await until(lambda: got)
        headers, body = got[0]
        event = Webhook(SECRET).verify(body, headers)
        assert event["type"] == "batch.completed" and event["object"] == "event"
        assert event["data"] == {"id": batch["id"]} and event["id"].startswith("evt_")
        assert headers["webhook-id"] == event["id"] and int(headers["webhook-timestamp"])
        _, done = await call(s, "GET", f"/v1/batches/{batch['id']}")
        assert event["created_at"] == done["completed_at"]
        _, stats = await call(s, "GET", "/_emulator/stats")
        assert stats["webhooks"] == {"attempts": 1, "delivered": 1}
        bad = Webhook("whsec_" + base64.b64encode(b"wrong").decode())
        with pytest.raises(WebhookVerificationError):
            bad.verify(body, headers)


async def test_failed_and_cancelled_events() -> None:
    async with (
        receiver() as (url, got),
        emulator(webhook_url=url, webhook_secret=SECRET, in_progress_seconds=10_000) as (s, _),
    ):
        f = await upload(s, b"{not json\n")
        body = {"input_file_id": f["id"], "endpoint": "/v1/chat/completions"}
        _, failed = await call(s, "POST", "/v1/batches", json=body | {"completion_window": "24h"})
        slow = await create(s, [req(1)])
        await until(lambda: len(got) == 1)
        await call(s, "POST", f"/v1/batches/{slow['id']}/cancel")
        await until(lambda: len(got) == 2)
        events = [Webhook(SECRET).verify(b, h) for h, b in got]
        assert [(e["type"], e["data"]["id"]) for e in events] == [
            ("batch.failed", failed["id"]),
            ("batch.cancelled", slow["id"]),
        ]


async def test_non_2xx_is_retried_with_same_id() -> None:
    async with (
        receiver(fail_first=2) as (url, got),
        emulator(webhook_url=url, webhook_secret=SECRET) as (s, state),
    ):
        await create(s, [req(1)])
        await until(lambda: len(got) == 3)
        assert len({h["webhook-id"] for h, _ in got}) == 1
        assert all(Webhook(SECRET).verify(b, h)["type"] == "batch.completed" for h, b in got)
        await until(lambda: state.webhook_counts["delivered"] == 1)
        assert state.webhook_counts == {"attempts": 3, "delivered": 1}


async def test_gives_up_after_max_attempts() -> None:
    async with (
        receiver(fail_first=99) as (url, got),
        emulator(webhook_url=url, webhook_max_attempts=2) as (s, state),
    ):
        await create(s, [req(1)])
        await until(lambda: state.webhook_counts["failed"] == 1)
        assert len(got) == 2 and "webhook-signature" not in got[0][0]  # no secret: unsigned
        assert orjson.loads(got[0][1])["type"] == "batch.completed"
