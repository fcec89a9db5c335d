"""Intake: notice files in inbox/ (and in inbox/PROVIDER/ for each configured provider
NAME: those jobs go to that provider) and claim the complete ones.

A file renamed into inbox/ is complete by convention and is claimed at once. People
also write straight into inbox/ (cp, scp, rsync --inplace, editors, `> inbox/x.jsonl`),
so a file is only claimed when no process has it open for writing (a read lease is
refused while one does) and, unless it arrived by rename, when it has not changed for
`[intake] settle_seconds`. What still changes after the claim is caught by the
fingerprint check in validation (see submit.py).

On Linux the inbox's inotify descriptor is registered with the event loop, so an
idle daemon never wakes up for it; elsewhere watchfiles is the fallback. A slow
rescan catches anything an event missed. A burst is claimed in chunks: one pair of
directory fsyncs and one store transaction per chunk, not per file.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from inotify_simple import INotify, flags
from ulid import ULID
from watchfiles import awatch

from batchd.spool import Claimed, no_writer
from batchd.stages import Context, loop
from batchd.store import NewJob

RESCAN_SECONDS = 5.0
ADOPT_SECONDS = 5.0  # replicas: orphans of others are looked for as often as they may be adopted
CHUNK = 500
_MASK = flags.CLOSE_WRITE | flags.MOVED_TO | flags.CREATE


class Intake:
    """The intake stage's state: names that arrived by rename, ignored names logged."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.moved: set[str] = set()  # arrived by rename(2): complete by convention
        self._warned: set[str] = set()
        self.wake = ctx.wake_intake
        self._adopted_at = ctx.clock()  # run() adopts at start-up

    def on_event(self, name: str, mask: int) -> None:
        """An inotify event for inbox/NAME (NAME may be PROVIDER/FILE)."""
        if mask & flags.MOVED_TO:
            self.moved.add(name)
        elif mask & flags.CREATE:
            self.moved.discard(name)  # written in place after all

    def _report_ignored(self, ignored: dict[str, str]) -> None:
        for name in ignored.keys() - self._warned:
            self.ctx.log.warning("inbox_file_ignored", file=name, why=ignored[name])
        self._warned = set(ignored)
        self.ctx.metrics.inbox_ignored.set(len(ignored))

    async def step(self) -> float | None:
        """Claim what is complete; returns when to look again."""
        ctx = self.ctx
        every = max(ADOPT_SECONDS, ctx.cfg.replicas.adopt_after_seconds)
        if ctx.leases.shared and ctx.clock() - self._adopted_at >= every:
            # Replicas: one that died between a claim and its record left an orphan that
            # it may never come back for.
            self._adopted_at = ctx.clock()
            await adopt_orphans(ctx)
        entries, ignored = ctx.spool.scan()
        self._report_ignored(ignored)
        now = time.time()  # file times are wall-clock, whatever clock the stages use
        settle = ctx.cfg.intake.settle_seconds
        ready: list[str] = []
        due = now + RESCAN_SECONDS
        for e in entries:
            writer_free = no_writer(ctx.spool.inbox / e.name)
            if writer_free is False:  # still being written: its CLOSE_WRITE wakes us
                due = min(due, now + max(settle, 0.5))
            elif e.name in self.moved or now - e.mtime >= settle:
                ready.append(e.name)
            else:
                due = min(due, e.mtime + settle)
        for i in range(0, len(ready), CHUNK):
            if ctx.stopping:
                break
            await self._claim(ready[i : i + CHUNK])
        ctx.metrics.inbox_files.set(len(entries) - len(ready))
        return ctx.clock() + max(0.0, due - time.time())

    async def _claim(self, names: list[str]) -> None:
        ctx = self.ctx
        claims: list[Claimed] = []
        ctx.claiming = True
        try:
            for name in names:
                c = ctx.spool.claim(name, sync=False)
                self.moved.discard(name)
                if c is not None:
                    claims.append(c)
            if not claims:
                return
            ctx.spool.sync_claims()  # durable before recorded (adopt_orphans covers a crash)
            given = await ctx.store.create_jobs(
                [
                    NewJob(c.job_id, c.name, c.rel_path, _source(c), provider=c.provider)
                    for c in claims
                ],
                ctx.spool.dir_taken,
                skip_recorded=ctx.leases.shared,  # a replica adopted one meanwhile
            )
        finally:
            ctx.claiming = False
        for c in claims:
            if c.job_id in given:
                ctx.log.info(
                    "job_claimed",
                    job_id=c.job_id,
                    name=given[c.job_id],
                    file=c.name,
                    provider=c.provider or ctx.providers.default_name,
                )
        ctx.wake_submit.set()


def _claimed_lately(ctx: Context, job_id: str) -> bool:
    """Replicas share the spool: a file another replica has just claimed has no job row
    yet. The job id is a ULID made at the claim, so it tells how long ago that was."""
    if not ctx.leases.shared:
        return False  # a daemon alone: every claim before this start is an orphan
    try:
        claimed_at = ULID.from_str(job_id).timestamp
    except ValueError:
        return False
    return time.time() - claimed_at < ctx.cfg.replicas.adopt_after_seconds


async def adopt_orphans(ctx: Context) -> int:
    """Record jobs for claimed files whose record was lost in a crash; drop half-written
    `.part` files of jobs never recorded. Costs one lookup per file in processing/.
    Replicas leave alone what was claimed within [replicas] adopt_after_seconds."""
    orphans: list[Claimed] = []
    for c in ctx.spool.claimed_files():
        if _claimed_lately(ctx, c.job_id):
            continue
        try:
            await ctx.store.job(c.job_id)
        except KeyError:
            orphans.append(c)
    for job_id, path in list(ctx.spool.partial_files()):
        if _claimed_lately(ctx, job_id):
            continue
        try:
            await ctx.store.job(job_id)
        except KeyError:
            path.unlink(missing_ok=True)
    names = await ctx.store.create_jobs(
        [NewJob(c.job_id, c.name, c.rel_path, _source(c), provider=c.provider) for c in orphans],
        ctx.spool.dir_taken,
        skip_recorded=ctx.leases.shared,
    )
    for job_id, name in names.items():
        ctx.log.info("job_adopted", job_id=job_id, name=name)
    if names:
        ctx.wake_submit.set()
    return len(names)


def _watch_inotify(ctx: Context, intake: Intake) -> Callable[[], None] | None:
    """Register inbox/'s inotify fd with the loop; returns the cleanup, or None."""
    prefixes: dict[int, str] = {}  # watch descriptor -> "" (inbox/) or "PROVIDER/"
    try:
        ino = INotify(nonblocking=True)
        prefixes[ino.add_watch(ctx.spool.inbox, _MASK)] = ""
        for name in sorted(ctx.spool.providers):
            prefixes[ino.add_watch(ctx.spool.inbox / name, _MASK)] = name + "/"
    except (OSError, AttributeError) as e:  # no inotify here (or no watches left)
        ctx.log.info("inotify_unavailable", error=str(e))
        return None
    aio = asyncio.get_running_loop()

    def readable() -> None:
        for ev in ino.read(timeout=0):  # level-triggered: drain now so the loop won't spin
            intake.on_event(prefixes.get(ev.wd, "") + ev.name, ev.mask)
        intake.wake.set()

    aio.add_reader(ino.fd, readable)

    def close() -> None:
        aio.remove_reader(ino.fd)
        ino.close()

    return close


async def _watchfiles(ctx: Context, intake: Intake) -> None:
    async for _changes in awatch(
        ctx.spool.inbox,
        stop_event=asyncio.Event(),
        debounce=20,
        step=50,
        rust_timeout=int(RESCAN_SECONDS * 1000),
        yield_on_timeout=True,
        recursive=bool(ctx.spool.providers),  # inbox/PROVIDER/ too
    ):
        intake.wake.set()


async def run(ctx: Context) -> None:
    """Adopt orphans, then claim on every inbox event (a rescan now and then)."""
    await adopt_orphans(ctx)
    intake = Intake(ctx)
    close = _watch_inotify(ctx, intake)
    fallback = None if close else asyncio.create_task(_watchfiles(ctx, intake))
    try:
        await loop(ctx, intake.wake, intake.step)
    finally:
        if close:
            close()
        if fallback:
            fallback.cancel()
            await asyncio.gather(fallback, return_exceptions=True)


def _source(c: Claimed) -> str:
    """A job's source (`[budget.sources]`, `batchd jobs --cost`): `inbox`, or
    `inbox/NAME` for a file dropped into the subdirectory of provider NAME."""
    return f"inbox/{c.provider}" if c.provider else "inbox"
