"""Intake: notice files in inbox/ (inotify via watchfiles, plus a slow rescan) and claim them."""

from __future__ import annotations

import asyncio

from watchfiles import awatch

from batchd.stages import Context

RESCAN_SECONDS = 5.0


async def adopt_orphans(ctx: Context) -> int:
    """Create job records for claimed files whose record was lost in a crash."""
    known = await ctx.store.input_paths()
    n = 0
    for c in ctx.spool.orphans(known):
        await ctx.store.create_job(c.job_id, c.name, c.rel_path, "inbox")
        ctx.log.info("job_adopted", job_id=c.job_id, name=c.name)
        n += 1
    return n


async def claim_waiting(ctx: Context) -> int:
    """Claim every ready file in inbox/; returns how many were claimed."""
    n = 0
    for name in ctx.spool.waiting():
        claimed = ctx.spool.claim(name)
        if claimed is None:
            continue
        await ctx.store.create_job(claimed.job_id, claimed.name, claimed.rel_path, "inbox")
        ctx.log.info("job_claimed", job_id=claimed.job_id, name=claimed.name)
        n += 1
    ctx.metrics.inbox_files.set(len(ctx.spool.waiting()))
    if n:
        ctx.wake_submit.set()
    return n


async def run(ctx: Context) -> None:
    """Claim what is waiting, then claim on every inotify event (rescan as a safety net)."""
    await adopt_orphans(ctx)
    await claim_waiting(ctx)
    stop = asyncio.Event()
    async for _changes in awatch(
        ctx.spool.inbox,
        stop_event=stop,
        debounce=20,
        step=5,
        rust_timeout=int(RESCAN_SECONDS * 1000),
        yield_on_timeout=True,
        recursive=False,
    ):
        try:
            await claim_waiting(ctx)
        except OSError as e:  # e.g. spool briefly unwritable: retry on next event/rescan
            ctx.log.error("claim_failed", error=str(e))
