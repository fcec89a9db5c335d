"""Track stage: learn the status of every in-flight batch, cheaply.

One sweep pages through `GET /v1/batches` (100 per page, newest first) until every
in-flight batch has been seen or the page is older than the oldest of them; only
batches not found that way are fetched one by one. 250 in-flight batches cost 3
calls, 10,000 cost 100. Polling is quicker while a batch is near a transition
(validating, finalizing, cancelling) and when a webhook names a batch.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from batchd.api import ApiError
from batchd.stages import Context, wait_for
from batchd.states import is_terminal_status
from batchd.store import Attempt

_BUSY = frozenset({"validating", "finalizing", "cancelling"})
MAX_PAGES = 200


async def _record(ctx: Context, att: Attempt, batch: dict[str, Any]) -> None:
    status = batch.get("status")
    if status != att.status:
        await ctx.store.update_attempt(att.id, "batch_status", status=status, batch=batch)
        ctx.log.info("batch_status", job_id=att.job_id, batch_id=att.batch_id, status=status)
        if is_terminal_status(status):
            ctx.metrics.batches_ended.labels(str(status)).inc()
            ctx.wake_collect.set()


async def sweep(ctx: Context, only: set[str] | None = None) -> None:
    """Refresh in-flight attempts (all, or just the batch ids in `only`)."""
    live = {a.batch_id: a for a in await ctx.store.live_attempts() if a.batch_id}
    if only is not None:
        live = {k: v for k, v in live.items() if k in only}
    if not live:
        ctx.metrics.last_poll.set(ctx.clock())
        return
    oldest = min(float((a.batch or {}).get("created_at") or 0) for a in live.values())
    unseen = dict(live)
    reached = False
    if len(live) > 1:
        after: str | None = None
        for _ in range(MAX_PAGES):
            try:
                page = await ctx.api.list_batches(100, after)
            except ApiError as e:
                # The API is not answering: fetching every batch one by one would only
                # multiply the calls. Try again at the next sweep.
                ctx.log.warning("poll_failed", error=str(e))
                return
            reached = True
            data = page.get("data") or []
            for b in data:
                att = unseen.pop(b.get("id"), None)
                if att is not None:
                    await _record(ctx, att, b)
            if not unseen or not page.get("has_more") or not data:
                break
            if float(data[-1].get("created_at") or 0) < oldest:
                break
            after = data[-1]["id"]
    for batch_id, att in unseen.items():  # not on the pages read: ask one by one
        try:
            b = await ctx.api.get_batch(batch_id)
        except ApiError as e:
            ctx.log.warning("poll_failed", job_id=att.job_id, batch_id=batch_id, error=str(e))
            continue
        reached = True
        await _record(ctx, att, b)
    if reached:
        ctx.metrics.last_poll.set(ctx.clock())


async def _set_gauges(ctx: Context) -> str | None:
    """Batches-by-status gauge; returns the busiest status in flight (for the interval)."""
    by_status = Counter(a.status for a in await ctx.store.live_attempts())
    for st in list(ctx.metrics.batches._metrics):
        ctx.metrics.batches.labels(*st).set(by_status.get(st[0], 0))
    return next((s for s in by_status if s in _BUSY), None)


def interval(ctx: Context, busy: str | None) -> float:
    """Seconds to the next full sweep: quicker near a transition; with webhooks on,
    polling is only the safety net and runs at [webhooks] poll_interval_seconds."""
    base = ctx.cfg.batch.poll_interval_seconds
    if ctx.webhooks_enabled:
        base = max(base, ctx.cfg.webhooks.poll_interval_seconds)
        return base
    return max(min(base, 0.05), base / 5) if busy else base


async def run(ctx: Context) -> None:
    """Loop: sweep; sleep until the interval passes, a batch is created, or a webhook
    names a batch (then only that batch is fetched, at once)."""
    loop = asyncio.get_running_loop()
    next_full = 0.0
    while True:
        pushed = set(ctx.webhook_batches)
        if pushed:
            ctx.webhook_batches.difference_update(pushed)
            await sweep(ctx, pushed)
        if not pushed or loop.time() >= next_full:
            await sweep(ctx)
            busy = await _set_gauges(ctx)
            next_full = loop.time() + interval(ctx, busy)
        await wait_for(ctx.wake_track, max(0.0, next_full - loop.time()))
