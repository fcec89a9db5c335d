"""Intake: notice files in inbox/ (inotify, plus a slow rescan) and claim them.

On Linux the inbox's inotify descriptor is registered with the event loop, so a
rename into inbox/ is claimed at once and an idle daemon never wakes up for it.
(watchfiles' watcher thread polls its event queue every `step` ms: at step=5 that
was 200 wake-ups a second, 0.5 % of a core while idle, and 5-10 ms per drop.)
Elsewhere watchfiles is the fallback. The rescan catches anything an event missed.
"""

from __future__ import annotations

import asyncio

from inotify_simple import INotify, flags
from watchfiles import awatch

from batchd.stages import Context, wait_for

RESCAN_SECONDS = 5.0
# A file created, written and closed, or renamed into inbox/. A queue overflow is
# always reported; the directory scan on every wake-up finds everything anyway.
_MASK = flags.CLOSE_WRITE | flags.MOVED_TO | flags.CREATE


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
    # Rename everything waiting, make the renames durable with one pair of directory
    # fsyncs, then record the jobs (a crash in between is what adopt_orphans is for).
    claims = [c for name in ctx.spool.waiting() if (c := ctx.spool.claim(name, sync=False))]
    if claims:
        ctx.spool.sync_claims()
    for claimed in claims:
        await ctx.store.create_job(claimed.job_id, claimed.name, claimed.rel_path, "inbox")
        ctx.log.info("job_claimed", job_id=claimed.job_id, name=claimed.name)
        ctx.wake_submit.set()  # submitting starts while the rest of a burst is recorded
        n += 1
    ctx.metrics.inbox_files.set(len(ctx.spool.waiting()))
    return n


async def _claim(ctx: Context) -> None:
    try:
        await claim_waiting(ctx)
    except OSError as e:  # e.g. spool briefly unwritable: retry on next event/rescan
        ctx.log.error("claim_failed", error=str(e))


async def _run_watchfiles(ctx: Context) -> None:
    async for _changes in awatch(
        ctx.spool.inbox,
        stop_event=asyncio.Event(),
        debounce=20,
        step=5,
        rust_timeout=int(RESCAN_SECONDS * 1000),
        yield_on_timeout=True,
        recursive=False,
    ):
        await _claim(ctx)


async def run(ctx: Context) -> None:
    """Claim what is waiting, then claim on every inotify event (rescan as a safety net)."""
    await adopt_orphans(ctx)
    await claim_waiting(ctx)
    try:
        ino = INotify(nonblocking=True)
        ino.add_watch(ctx.spool.inbox, _MASK)
    except (OSError, AttributeError) as e:  # no inotify here (or no watches left)
        ctx.log.info("inotify_unavailable", error=str(e))
        await _run_watchfiles(ctx)
        return
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()

    def readable() -> None:
        ino.read(timeout=0)  # level-triggered: drain now so the loop does not spin
        wake.set()

    loop.add_reader(ino.fd, readable)
    try:
        while True:
            await wait_for(wake, RESCAN_SECONDS)
            await _claim(ctx)
    finally:
        loop.remove_reader(ino.fd)
        ino.close()
