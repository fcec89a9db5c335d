"""Track stage: poll in-flight batches until a terminal status, then hand to collect."""

from __future__ import annotations

from collections import Counter
from typing import Any

from batchd.api import ApiError
from batchd.stages import Context, wait_for
from batchd.states import JobState, is_terminal_status
from batchd.store import Attempt


async def _record(ctx: Context, att: Attempt, batch: dict[str, Any]) -> None:
    status = batch.get("status")
    if status != att.status:
        await ctx.store.update_attempt(att.id, "batch_status", status=status, batch=batch)
        ctx.log.info("batch_status", job_id=att.job_id, batch_id=att.batch_id, status=status)
    if is_terminal_status(status):
        ctx.metrics.batches_ended.labels(str(status)).inc()
        job = await ctx.store.job(att.job_id)
        if job.state == JobState.TRACKING:
            await ctx.store.transition(
                job.id,
                JobState.COLLECTING,
                "batch_ended",
                {"batch_id": att.batch_id, "status": status},
            )
        ctx.wake_collect.set()


async def poll_once(ctx: Context) -> None:
    """Refresh every live attempt once; set the batches-by-status gauge."""
    live = await ctx.store.live_attempts()
    reached = False
    for att in live:
        assert att.batch_id is not None
        try:
            batch = await ctx.api.get_batch(att.batch_id)
        except ApiError as e:
            ctx.log.warning("poll_failed", job_id=att.job_id, batch_id=att.batch_id, error=str(e))
            continue
        reached = True
        await _record(ctx, att, batch)
    if reached or not live:
        ctx.metrics.last_poll.set(ctx.clock())
    by_status = Counter(a.status for a in await ctx.store.live_attempts())
    for st in ctx.metrics.batches._metrics:
        ctx.metrics.batches.labels(*st).set(by_status.get(st[0], 0))


async def requeue_ended(ctx: Context) -> None:
    """Jobs left in TRACKING whose attempts all ended (crash between steps) go to collect."""
    for job in await ctx.store.jobs([JobState.TRACKING]):
        atts = [a for a in await ctx.store.attempts(job.id) if a.batch_id]
        if atts and all(is_terminal_status(a.status) for a in atts):
            await ctx.store.transition(job.id, JobState.COLLECTING, "batch_ended")
            ctx.wake_collect.set()


async def run(ctx: Context) -> None:
    """Loop: poll every `poll_interval_seconds` (or sooner when a batch was created)."""
    await requeue_ended(ctx)
    while True:
        await poll_once(ctx)
        await wait_for(ctx.wake_track, ctx.cfg.batch.poll_interval_seconds)
