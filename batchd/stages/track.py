"""Track stage: learn the status of every in-flight batch, cheaply.

The tracker keeps what it knows of each batch in flight in memory (status and
request_counts), so a sweep costs a dict lookup per unchanged batch and writes only
the batches that changed. A sweep pages through `GET /v1/batches` (100 per page,
newest first) until every batch in flight has been seen or the pages are older than
the oldest of them; batches not found that way are fetched one by one.

`poll_interval_seconds` is a ceiling: at most ⌈N/100⌉+1 status calls per interval
for N batches in flight. The calls a sweep leaves over are spent on batches near a
transition (validating, finalizing, cancelling) half-way through the interval. A
webhook naming a batch has it fetched at once. With nothing in flight the stage
sleeps until a batch is created.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

import orjson

from batchd.api import AccessDenied, ApiError
from batchd.stages import Context, loop
from batchd.states import is_terminal_status
from batchd.store import LiveBatch

_BUSY = frozenset({"validating", "finalizing", "cancelling"})
MAX_PAGES = 200
RELOAD_SECONDS = 60.0  # re-read the batches in flight from the store now and then
PROGRESS_LOG_SECONDS = 60.0
GAUGE_SECONDS = 2.0
OTHERS_SECONDS = 1.0  # replicas: how often the tracker looks for others' new batches
CHANGED_SLACK = 30.0  # seconds a replica's clock may be behind another's


@dataclass
class _Page:
    """A list page as last seen: the hash of its bytes, and what it said."""

    key: int
    batches: list[dict[str, Any]] | None  # None once recorded
    ids: list[str]
    has_more: bool
    last_created: float


def budget(n: int) -> int:
    """Status calls allowed per interval with `n` batches in flight."""
    return math.ceil(n / 100) + 1


def _counts(batch: dict[str, Any]) -> tuple[int, int, int]:
    rc = batch.get("request_counts") or {}
    return int(rc.get("completed") or 0), int(rc.get("failed") or 0), int(rc.get("total") or 0)


def interval(ctx: Context) -> float:
    """Seconds between full sweeps; with webhooks on, polling is only the safety net
    and runs at [webhooks] poll_interval_seconds."""
    base = ctx.cfg.batch.poll_interval_seconds
    if ctx.webhooks_enabled:
        return max(base, ctx.cfg.webhooks.poll_interval_seconds)
    return base


class Tracker:
    """The batches in flight and the status calls spent on them."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.live: dict[str, LiveBatch] = {}
        self._loaded_at = float("-inf")
        self._next_full: float | None = None  # None: nothing in flight
        self._next_busy: float | None = None
        self._spent = 0  # status calls in the current interval
        self._logged_at = float("-inf")
        self._gauged_at = float("-inf")
        self._seen: dict[str, float] = {}  # batch id -> when a status call last saw it
        self._pages: dict[str | None, _Page] = {}  # list pages by cursor, as last seen
        self._calls: deque[float] = deque()  # times of the recent status calls
        self._tracking = not ctx.leases.shared  # replicas: only while holding the role
        self._others_at = float("-inf")  # when batches of other replicas were looked for

    async def reload(self) -> None:
        """Read the batches in flight from the store."""
        self.live = {b.batch_id: b for b in await self.ctx.store.live_batches()}
        self._pages.clear()  # what is known may differ from what the pages said
        self.ctx.new_batches.clear()
        self._loaded_at = self.ctx.clock()

    def _absorb(self) -> None:
        if self.ctx.new_batches:
            self._pages.clear()
        for b in self.ctx.new_batches:
            self.live.setdefault(b.batch_id, b)
        self.ctx.new_batches.clear()

    async def record(self, lb: LiveBatch, batch: dict[str, Any]) -> None:
        """Compare with what is known; write (and act) only when something changed."""
        ctx = self.ctx
        self._seen[lb.batch_id] = ctx.clock()
        status = batch.get("status")
        counts = _counts(batch)
        if status == lb.status and counts == (lb.completed, lb.failed, lb.total):
            return
        await ctx.store.record_batch(lb, batch, status, counts)
        if status != lb.status:
            ctx.log.info("batch_status", job_id=lb.job_id, batch_id=lb.batch_id, status=status)
        if is_terminal_status(status):
            self.live.pop(lb.batch_id, None)
            self._seen.pop(lb.batch_id, None)
            ctx.metrics.batches_ended.labels(str(status)).inc()
            ctx.wake_collect.set()
            ctx.wake_submit.set()  # budget freed
        else:
            self.live[lb.batch_id] = LiveBatch(
                lb.attempt_id, lb.job_id, lb.batch_id, status, *counts, lb.created
            )

    async def _get(self, lb: LiveBatch) -> bool:
        await self._pace(budget(len(self.live)))
        try:
            b = await self.ctx.api.get_batch(lb.batch_id, caller="tracker")
        except AccessDenied as e:
            await self.ctx.hold.block(self.ctx, e)
            return False
        except ApiError as e:
            self.ctx.log.warning(
                "poll_failed", job_id=lb.job_id, batch_id=lb.batch_id, error=str(e)
            )
            return False
        finally:
            self._spent += 1
            self._answered()
        await self.record(lb, b)
        return True

    async def _pace(self, limit: int) -> None:
        """At most `limit` status calls in any span of one interval (a sliding window).

        Timed from when earlier calls were answered, not sent: the server handled each
        before its answer came, so this holds on the server's clock too."""
        now = time.monotonic()
        span = interval(self.ctx)
        calls = self._calls
        while calls and now - calls[0] >= span:
            calls.popleft()
        if len(calls) >= limit:
            await asyncio.sleep(span - (now - calls[0]))
            calls.popleft()

    def _answered(self) -> None:
        self._calls.append(time.monotonic())

    async def _page(self, after: str | None, limit: int) -> _Page:
        """One list page: parsed only when its bytes differ from last time."""
        await self._pace(limit)
        try:
            raw = await self.ctx.api.list_batches_raw(100, after, caller="tracker")
        finally:
            self._spent += 1
            self._answered()
        key = hash(raw)
        seen = self._pages.get(after)
        if seen is not None and seen.key == key:
            return seen
        data = orjson.loads(raw)
        batches = [b for b in data.get("data") or [] if isinstance(b, dict)]
        page = _Page(
            key,
            batches,
            [str(b.get("id")) for b in batches],
            bool(data.get("has_more")),
            float(batches[-1].get("created_at") or 0) if batches else 0.0,
        )
        self._pages[after] = page
        return page

    async def sweep(self, limit: int) -> None:
        """Refresh every batch in flight with at most `limit` status calls."""
        ctx = self.ctx
        unseen = dict(self.live)
        oldest = min((b.created for b in unseen.values()), default=0.0)
        reached = False
        calls = 0
        if len(unseen) > 1:
            after: str | None = None
            for _ in range(min(MAX_PAGES, limit)):
                try:
                    page = await self._page(after, limit)
                except AccessDenied as e:
                    await ctx.hold.block(ctx, e)
                    return
                except ApiError as e:
                    # The API is not answering: fetching every batch one by one would
                    # only multiply the calls. Try again at the next sweep.
                    ctx.log.warning("poll_failed", error=str(e))
                    return
                finally:
                    calls += 1
                reached = True
                if page.batches is None:  # the same bytes as last time: nothing changed
                    for batch_id in page.ids:
                        if unseen.pop(batch_id, None) is not None:
                            self._seen[batch_id] = ctx.clock()
                else:
                    for b in page.batches:
                        lb = unseen.pop(str(b.get("id")), None)
                        if lb is not None:
                            await self.record(lb, b)
                    page.batches = None  # recorded: from now on only the ids are needed
                if not unseen or not page.has_more or not page.ids:
                    break
                if page.last_created < oldest:
                    break
                after = page.ids[-1]
        # Not on the pages read: ask one by one, the longest unseen first, within the
        # budget (the rest at the next sweep).
        waiting = sorted(unseen.values(), key=lambda b: (self._seen.get(b.batch_id, 0), b.created))
        for lb in waiting[: max(0, limit - calls)]:
            reached = await self._get(lb) or reached
        if reached:
            ctx.metrics.last_poll.set(ctx.clock())

    async def _pushed(self) -> None:
        """Batches a webhook says have ended: fetched at once."""
        pushed = set(self.ctx.webhook_batches)
        self.ctx.webhook_batches.difference_update(pushed)
        for batch_id in pushed:
            lb = self.live.get(batch_id)
            if lb is not None:
                await self._get(lb)

    def _gauges(self, force: bool = False) -> None:
        """Batches by status, requests in flight, the progress line: a pass over every
        batch in flight, so at most every GAUGE_SECONDS."""
        now = self.ctx.clock()
        if not force and now - self._gauged_at < GAUGE_SECONDS:
            return
        self._gauged_at = now
        m = self.ctx.metrics
        by_status = Counter(b.status for b in self.live.values())
        for (st,) in list(m.batches._metrics):
            m.batches.labels(st).set(by_status.get(st, 0))
        done = sum(b.completed for b in self.live.values())
        failed = sum(b.failed for b in self.live.values())
        total = sum(b.total for b in self.live.values())
        m.requests_in_flight.labels("completed").set(done)
        m.requests_in_flight.labels("failed").set(failed)
        m.requests_in_flight.labels("pending").set(max(0, total - done - failed))
        if self.live and now - self._logged_at >= PROGRESS_LOG_SECONDS:
            self._logged_at = now
            self.ctx.log.info(
                "progress",
                batches=len(self.live),
                jobs=len({b.job_id for b in self.live.values()}),
                requests=total,
                completed=done,
                failed=failed,
                by_status=dict(by_status),
            )

    async def _role(self) -> bool:
        """Replicas: one tracks at a time. True while this one holds the role; taking it
        over starts from what the store says is in flight."""
        leases = self.ctx.leases
        if not await leases.role("tracker"):
            if self._tracking:
                self._tracking = False
                self.live.clear()
                self._pages.clear()
                self._next_full = self._next_busy = None
                self._gauges(force=True)  # the replica that tracks now reports them
                self.ctx.log.warning("role_lost", role="tracker", replica=leases.owner)
            self.ctx.new_batches.clear()  # the tracking replica finds them in the store
            return False
        if not self._tracking:
            self._tracking = True
            self._loaded_at = float("-inf")  # reload now
        return True

    async def _from_others(self) -> None:
        """Replicas: batches other replicas created, and batch ids webhooks delivered to
        them, looked for at most every OTHERS_SECONDS (indexed reads of what changed)."""
        ctx = self.ctx
        now = ctx.clock()
        if now - self._others_at < OTHERS_SECONDS:
            return
        since, self._others_at = self._others_at - CHANGED_SLACK, now
        for b in await ctx.store.live_batches_changed(since):
            if b.batch_id not in self.live:
                self.live[b.batch_id] = b
                self._pages.clear()
        assert ctx.leases.claims is not None
        ctx.webhook_batches.update(await ctx.leases.claims.take_pushed())

    async def step(self) -> float | None:
        """Sweep when the interval is up (or check busy batches half-way); returns when
        to look again, or None with nothing in flight."""
        ctx = self.ctx
        if ctx.leases.shared and not await self._role():
            return ctx.clock() + ctx.leases.renew_every  # try again soon: takeover is quick
        now = ctx.clock()
        if now - self._loaded_at >= RELOAD_SECONDS:
            await self.reload()
            self._others_at = now
        elif ctx.leases.shared:
            await self._from_others()
        self._absorb()
        if ctx.hold.blocked:
            return None
        if ctx.webhook_batches:
            await self._pushed()
        if not self.live:
            self._gauges(force=True)
            self._next_full = None
            return now + OTHERS_SECONDS if ctx.leases.shared else None
        every = interval(ctx)
        if self._next_full is None:  # the first batch in flight: its status is known
            self._next_full, self._spent = now + every, 0
            if any(b.status in _BUSY for b in self.live.values()):
                self._next_busy = now + every / 2
        elif now >= self._next_full:
            self._spent = 0
            self._next_full = now + every
            await self.sweep(budget(len(self.live)))
            self._gauges()
            busy = [b for b in self.live.values() if b.status in _BUSY]
            left = budget(len(self.live)) - self._spent
            self._next_busy = now + every / 2 if busy and len(busy) <= left else None
        elif self._next_busy is not None and now >= self._next_busy:
            self._next_busy = None
            busy = [b for b in self.live.values() if b.status in _BUSY]
            for lb in busy[: max(0, budget(len(self.live)) - self._spent)]:
                await self._get(lb)
            self._gauges()
        due = [self._next_full, self._loaded_at + RELOAD_SECONDS]
        if self._next_busy is not None:
            due.append(self._next_busy)
        if ctx.leases.shared:  # the role is renewed meanwhile; others' batches come in
            due.append(now + OTHERS_SECONDS)
        return min(due)


async def run(ctx: Context) -> None:
    """Loop: sweep; sleep until the interval passes, a batch is created, or a webhook
    names a batch."""
    tracker = Tracker(ctx)
    await tracker.reload()
    await loop(ctx, ctx.wake_track, tracker.step)
