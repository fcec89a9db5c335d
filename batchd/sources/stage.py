"""A queue source as a stage: read, record, acknowledge; publish outcomes; reconnect.

Two loops share the connection. The reader records each read's messages and only then
acknowledges them (`base.record`); it stops reading while the source has
`max_pending_jobs` live jobs (back-pressure), and is woken when one of them ends. The
announcer publishes the outcome of every ended, unannounced job of the source, then
marks it announced: level-triggered, so a crash in between publishes it once more.
A broker that cannot be reached is retried with backoff (`batchd_source_up` is 0
meanwhile); in `run --once` the reader stops when a read finds nothing, and a broker
still unreachable after a few tries is given up (exit code 1).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from batchd.config import SourceConfig, redact_url
from batchd.sources import outcome
from batchd.sources.base import Broker, Message, Recorded, Unavailable, record
from batchd.stages import wait_for

if TYPE_CHECKING:
    from batchd.stages import Context
    from batchd.store import Job

T = TypeVar("T")
READ_WAIT = 5.0  # a read waits this long for a message (a stop cuts it short)
ONCE_READ_WAIT = 0.5  # `run --once`: a read that finds nothing in this long: drained
ROOM_RECHECK = 30.0  # while paused, look again at least this often
ANNOUNCE_BATCH = 100
ONCE_TRIES = 4  # `run --once`: connection attempts before a source is given up
MAX_BACKOFF = 60.0


def backoff(failures: int) -> float:
    """Seconds before reconnect attempt `failures` + 1 (jittered; 0.5 s doubling to a
    minute: a broker restart is noticed within a second or two of its end)."""
    return float(min(MAX_BACKOFF, 0.25 * 2 ** min(failures, 9)) * random.uniform(0.5, 1.0))


class SourceStage:
    """One [sources.NAME] in the daemon."""

    def __init__(self, ctx: Context, cfg: SourceConfig, broker: Broker, once: bool = False) -> None:
        self.ctx, self.cfg, self.broker = ctx, cfg, broker
        self.once = once  # `run --once`: the daemon listed it in ctx.sources_draining
        self.name = cfg.name
        self.wake = asyncio.Event()  # a job of this source ended; or stop
        self.room = asyncio.Event()  # the announcer ran: jobs may have ended
        self.stop = asyncio.Event()
        self.paused = False
        m = ctx.metrics
        self.m_up = m.source_up.labels(self.name)
        self.m_consumed = m.source_consumed.labels(self.name)
        self.m_acked = m.source_acked.labels(self.name)
        self.m_redelivered = m.source_redelivered.labels(self.name)
        self.m_dead = m.source_dead_lettered.labels(self.name)
        self.m_published = m.source_published.labels(self.name)
        self.m_paused = m.source_paused.labels(self.name)

    # --- supervision ---------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, serve until stop or an outage, reconnect with backoff."""
        ctx = self.ctx
        ctx.wake_sources[self.name] = self.wake
        failures = 0
        try:
            while not ctx.stopping:
                served_from = time.monotonic()
                try:
                    await self.broker.connect()
                    self.m_up.set(1)
                    ctx.log.info(
                        "source_connected",
                        source=self.name,
                        kind=self.cfg.kind,
                        url=redact_url(self.cfg.url),
                    )
                    await self._serve()
                except Unavailable as e:
                    self.m_up.set(0)
                    # A connection that served a while starts the backoff over; one that
                    # fails at once (a broker refusing every read) keeps doubling it.
                    if time.monotonic() - served_from > MAX_BACKOFF:
                        failures = 0
                    failures += 1
                    delay = backoff(failures)
                    ctx.log.warning(
                        "source_unavailable",
                        source=self.name,
                        error=str(e),
                        failures=failures,
                        retry_in=round(delay, 2),
                    )
                    if self.once and failures >= ONCE_TRIES:
                        ctx.log.error("source_given_up", source=self.name, error=str(e))
                        ctx.sources_failed.add(self.name)
                        ctx.sources_draining.discard(self.name)
                        while not ctx.stopping:  # until the daemon stops
                            await wait_for(self.wake, None)
                        return
                    await self._sleep(delay)
                finally:
                    await self.broker.close()
        finally:
            self.m_up.set(0)
            ctx.wake_sources.pop(self.name, None)
            ctx.sources_draining.discard(self.name)

    async def _sleep(self, seconds: float) -> None:
        """Sleep, cut short by a stop."""
        deadline = time.monotonic() + seconds
        while not self.ctx.stopping and (left := deadline - time.monotonic()) > 0:
            await wait_for(self.wake, left)

    async def _serve(self) -> None:
        self.stop.clear()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._reader(), name=f"source:{self.name}:read")
                tg.create_task(self._announcer(), name=f"source:{self.name}:announce")
        except* Unavailable as eg:
            raise eg.exceptions[0] from None

    async def _until_stop(self, coro: Coroutine[Any, Any, T]) -> T | None:
        """Await `coro` unless a stop comes first (then cancel it and return None)."""
        task = asyncio.ensure_future(coro)
        stopper = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Unavailable):
                await task
            return None
        return task.result()

    # --- reading -------------------------------------------------------------------------

    async def _reader(self) -> None:
        ctx, cfg = self.ctx, self.cfg
        while not ctx.stopping and not self.stop.is_set():
            room = cfg.max_pending_jobs - await ctx.store.source_live_count(self.name)
            if room <= 0:
                if not self.paused:
                    self.paused = True
                    self.m_paused.set(1)
                    ctx.log.info("source_paused", source=self.name, live=cfg.max_pending_jobs)
                    await self.broker.pause()
                self.room.clear()
                await self._until_stop(wait_for(self.room, ROOM_RECHECK))
                continue
            if self.paused:
                self.paused = False
                self.m_paused.set(0)
                ctx.log.info("source_resumed", source=self.name)
            wait = ONCE_READ_WAIT if self.once else READ_WAIT
            msgs = await self._until_stop(self.broker.fetch(min(room, cfg.prefetch), wait))
            if msgs is None:
                return
            if not msgs:
                if self.once:
                    ctx.log.info("source_drained", source=self.name)
                    ctx.sources_draining.discard(self.name)
                    return
                continue
            await self._take(msgs)

    async def _take(self, msgs: list[Message]) -> None:
        ctx = self.ctx
        self.m_consumed.inc(len(msgs))
        done = await record(ctx, self.cfg, msgs)
        for rec in done:
            if rec.invalid:
                assert rec.reason is not None
                await self.broker.dead_letter(rec.msg, {"job_id": rec.job_id, **rec.reason})
                self.m_dead.inc()
            self._log(rec)
        await self.broker.ack(msgs)
        self.m_acked.inc(len(msgs))
        self.m_redelivered.inc(sum(1 for r in done if r.known))

    def _log(self, rec: Recorded) -> None:
        log = self.ctx.log
        fields = {"job_id": rec.job_id, "name": rec.name, "source": self.name}
        if rec.known:
            log.info("source_redelivered", message_id=rec.msg.id, **fields)
        elif rec.invalid:
            assert rec.reason is not None
            log.warning(
                "source_message_invalid",
                message_id=rec.msg.id,
                code=rec.reason.get("code"),
                error=rec.reason.get("message"),
                **fields,
            )
        else:
            log.info("job_claimed", message_id=rec.msg.id, **fields)

    # --- outcomes ------------------------------------------------------------------------

    async def _outcome(self, job: Job) -> dict[str, Any]:
        """The outcome body: the job's recorded cost (its charges, priced at its provider)
        and its result files (looked at in a thread)."""
        cost = outcome.recorded_cost(await self.ctx.store.job_cost(job.id))
        return await asyncio.to_thread(outcome.build, self.ctx.spool, job, cost)

    async def _announcer(self) -> None:
        ctx = self.ctx
        while True:
            jobs = await ctx.store.unannounced(self.name, ANNOUNCE_BATCH)
            for job in jobs:
                if ctx.stopping:
                    break
                body = await self._outcome(job)
                await self.broker.publish(job.id, str(job.state), body)
                await ctx.store.mark_announced(job.id, {"source": self.name})
                self.m_published.inc()
                ctx.log.info(
                    "outcome_published", job_id=job.id, source=self.name, state=str(job.state)
                )
            self.room.set()
            if len(jobs) == ANNOUNCE_BATCH and not ctx.stopping:
                continue
            if ctx.stopping:
                self.stop.set()
                return
            await wait_for(self.wake, None)
            if ctx.stopping:
                self.stop.set()
                return


async def idle(ctx: Context) -> bool:
    """`run --once`: True when every source has drained its read and published the
    outcome of every ended job of its own."""
    if ctx.sources_draining:
        return False
    for name in list(ctx.wake_sources):
        if name not in ctx.sources_failed and await ctx.store.unannounced(name, 1):
            return False
    return True


def stage(cfg: SourceConfig, once: bool = False) -> Callable[[Context], Awaitable[None]]:
    """The daemon's stage function for one source (its broker client imported lazily)."""

    async def run(ctx: Context) -> None:
        from batchd.sources import make_broker

        await SourceStage(ctx, cfg, make_broker(cfg, ctx.spool.root), once).run()

    return run
