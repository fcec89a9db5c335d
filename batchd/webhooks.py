"""OpenAI webhooks: verify Standard Webhooks signatures, drop replays, wake the tracker.

A verified `batch.completed|failed|expired|cancelled` event puts its batch id in
`ctx.webhook_batches` and sets `ctx.wake_track`; the tracker fetches those batches at
once and, with `ctx.webhooks_enabled`, sweeps only every `[webhooks] poll_interval_seconds`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from batchd.queue_api import Problem, json_response
from batchd.stages import Context

PATH = "/webhooks/openai"
TOLERANCE_SECONDS = 300
SEEN_MAX = 10_000
BATCH_ENDED = frozenset({"batch.completed", "batch.failed", "batch.expired", "batch.cancelled"})


def signature(key: bytes, msg_id: str, timestamp: str, body: bytes) -> bytes:
    """HMAC-SHA256 over `{id}.{timestamp}.{body}` (raw digest)."""
    return hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()


def verify(key: bytes, headers: Mapping[str, str], body: bytes, now: float) -> str:
    """Check the timestamp and that any `v1,` signature matches; returns the webhook id."""
    msg_id = headers.get("webhook-id", "")
    stamp = headers.get("webhook-timestamp", "")
    sigs = headers.get("webhook-signature", "")
    if not (msg_id and stamp and sigs):
        raise Problem(400, "missing_headers", "webhook-id, -timestamp and -signature are required")
    try:
        at = float(stamp)
    except ValueError:
        at = math.nan
    if not math.isfinite(at):
        raise Problem(400, "invalid_timestamp", "webhook-timestamp is not a number")
    if abs(now - at) > TOLERANCE_SECONDS:
        raise Problem(400, "stale_timestamp", f"timestamp more than {TOLERANCE_SECONDS}s off")
    expected = signature(key, msg_id, stamp, body)
    for entry in sigs.split():
        version, _, b64 = entry.partition(",")
        if version != "v1":
            continue
        try:
            given = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            continue
        if hmac.compare_digest(expected, given):
            return msg_id
    raise Problem(401, "invalid_signature", "no matching webhook signature")


class RecentIds:
    """A bounded LRU of webhook ids already handled (deliveries are retried)."""

    def __init__(self, maxlen: int = SEEN_MAX) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._maxlen = maxlen

    def add(self, msg_id: str) -> bool:
        """Remember `msg_id`; False when it was already there."""
        if msg_id in self._ids:
            self._ids.move_to_end(msg_id)
            return False
        self._ids[msg_id] = None
        if len(self._ids) > self._maxlen:
            self._ids.popitem(last=False)
        return True


def _ended_batch(event: Any) -> tuple[str, str | None]:
    """(event type, batch id when it is a batch-ended event)."""
    if not isinstance(event, dict):
        raise Problem(400, "invalid_payload", "the payload is not a JSON object")
    kind = event.get("type")
    if not isinstance(kind, str):
        raise Problem(400, "invalid_payload", "the payload has no 'type'")
    if kind not in BATCH_ENDED:
        return kind, None
    data = event.get("data")
    batch_id = data.get("id") if isinstance(data, dict) else None
    if not isinstance(batch_id, str) or not batch_id:
        raise Problem(400, "invalid_payload", "a batch event without data.id")
    return kind, batch_id


def mount(app: web.Application, ctx: Context, key: bytes) -> None:
    """Add POST /webhooks/openai (only called when a secret is configured)."""
    seen = RecentIds()
    ctx.webhooks_enabled = True

    async def receive(req: web.Request) -> web.StreamResponse:
        body = await req.read()
        try:
            msg_id = verify(key, req.headers, body, ctx.clock())
            try:
                event = orjson.loads(body)
            except orjson.JSONDecodeError:
                raise Problem(400, "invalid_payload", "the payload is not JSON") from None
            kind, batch_id = _ended_batch(event)
        except Problem as p:
            ctx.log.warning("webhook_rejected", code=p.code, status=p.status)
            return p.response()
        if not seen.add(msg_id):
            ctx.log.info("webhook_duplicate", webhook_id=msg_id)
            return json_response({"status": "duplicate"})
        if batch_id is None:
            ctx.log.info("webhook_ignored", webhook_id=msg_id, event_type=kind)
            return json_response({"status": "ignored"})
        if ctx.leases.claims is not None and not ctx.leases.has_role("tracker"):
            # Webhooks arrive at any replica: this one does not track, the one that does
            # finds the batch id in the store within a second.
            await ctx.leases.claims.push_batch(batch_id, ctx.clock())
        else:
            ctx.webhook_batches.add(batch_id)
            ctx.wake_track.set()
        ctx.log.info("webhook_received", webhook_id=msg_id, event_type=kind, batch_id=batch_id)
        return json_response({"status": "accepted"})

    app.router.add_post(PATH, receive)
