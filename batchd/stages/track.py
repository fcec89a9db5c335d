"""Track stage: learn the status of every in-flight batch, cheaply, on every provider.

The tracker keeps what it knows of each batch in flight in memory (status and request
counts), so a sweep costs a dict lookup per unchanged batch and writes only the
batches that changed. A sweep pages through each provider's batch list (about 100 per
page, newest first) until every batch in flight there has been seen or the pages are
older than the oldest of them; batches not found that way are fetched one by one.

`poll_interval_seconds` is a ceiling, per provider: at most ⌈N/100⌉+1 status calls per
interval for its N batches in flight. The calls a sweep leaves over are spent on
batches near a transition (validating, finalizing, cancelling) half-way through the
interval. A webhook naming a batch has it fetched at once. With nothing in flight the
stage sleeps until a batch is created.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter, deque
from dataclasses import dataclass

from batchd.providers import Provider
from batchd.providers.base import Snapshot
from batchd.providers.errors import AccessDenied, ApiError
from batchd.providers.http import CALLER
from batchd.stages import Context, loop
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
    batches: list[Snapshot] | None  # None once recorded
    ids: list[str]
    cursor: str | None  # the next page's
    last_created: float


def budget(n: int) -> int:
    """Status calls allowed per interval with `n` batches in flight."""
    return math.ceil(n / 100) + 1


class _Lane:
    """One provider's share of the tracker: its status calls and list pages as seen."""

    def __init__(self, provider: Provider) -> None:
        self.provider = provider
        self.spent = 0  # status calls in the current interval
        self.calls: deque[float] = deque()  # times of the recent status calls
        self.pages: dict[str | None, _Page] = {}  # list pages by cursor, as last seen


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
        self._logged_at = float("-inf")
        self._gauged_at = float("-inf")
        self._seen: dict[str, float] = {}  # batch id -> when a status call last saw it
        self._tracking = not ctx.leases.shared  # replicas: only while holding the role
        self._others_at = float("-inf")  # when batches of other replicas were looked for
        self._lanes: dict[str, _Lane] = {}
        self._unknown: set[str] = set()  # provider NAMEs of batches, no longer configured

    def lane(self, name: str | None) -> _Lane:
        """One provider's lane (None: the default provider's)."""
        provider = self.ctx.provider(name)
        lane = self._lanes.get(provider.name)
        if lane is None:
            lane = self._lanes[provider.name] = _Lane(provider)
        return lane

    def _by_lane(self) -> dict[str, dict[str, LiveBatch]]:
        """Batches in flight per provider; those of a provider no longer configured wait
        (said once) until it is configured again."""
        out: dict[str, dict[str, LiveBatch]] = {}
        default = self.ctx.providers.default_name
        for b in self.live.values():
            name = b.provider or default
            if name not in self.ctx.providers:
                if name not in self._unknown:
                    self._unknown.add(name)
                    self.ctx.log.error(
                        "provider_not_configured",
                        provider=name,
                        action="its batches are not tracked until it is configured again",
                    )
                continue
            out.setdefault(name, {})[b.batch_id] = b
        return out

    @property
    def _spent(self) -> int:
        return sum(lane.spent for lane in self._lanes.values())

    def _left(self) -> dict[str, int]:
        """Status calls each provider has left in this interval."""
        return {
            name: budget(len(batches)) - self.lane(name).spent
            for name, batches in self._by_lane().items()
        }

    async def reload(self) -> None:
        """Read the batches in flight from the store."""
        self.live = {b.batch_id: b for b in await self.ctx.store.live_batches()}
        for lane in self._lanes.values():
            lane.pages.clear()  # what is known may differ from what the pages said
        self.ctx.new_batches.clear()
        self._loaded_at = self.ctx.clock()

    def _absorb(self) -> None:
        for b in self.ctx.new_batches:
            self.lane(b.provider).pages.clear()
            self.live.setdefault(b.batch_id, b)
        self.ctx.new_batches.clear()

    async def record(self, lb: LiveBatch, snap: Snapshot) -> None:
        """Compare with what is known; write (and act) only when something changed."""
        ctx = self.ctx
        self._seen[lb.batch_id] = ctx.clock()
        status = snap.status
        counts = snap.counts
        if status == lb.status and counts == (lb.completed, lb.failed, lb.total):
            return
        await ctx.store.record_batch(lb, snap.raw, status, counts, snap.raw_status)
        if status != lb.status:
            ctx.log.info(
                "batch_status",
                job_id=lb.job_id,
                batch_id=lb.batch_id,
                status=status,
                raw_status=snap.raw_status,
            )
        if snap.ended:
            self.live.pop(lb.batch_id, None)
            self._seen.pop(lb.batch_id, None)
            name = self.lane(lb.provider).provider.name
            ctx.metrics.batches_ended.labels(status, name).inc()
            ctx.wake_collect.set()
            ctx.wake_submit.set()  # budget freed
        else:
            self.live[lb.batch_id] = LiveBatch(
                lb.attempt_id, lb.job_id, lb.batch_id, status, *counts, lb.created, lb.provider
            )

    async def _get(self, lb: LiveBatch) -> bool:
        lane = self.lane(lb.provider)
        n = sum(1 for b in self.live.values() if b.provider == lb.provider)
        await self._pace(lane, budget(n))
        try:
            snap = await lane.provider.get(lb.batch_id)
        except AccessDenied as e:
            await self.ctx.block(e)
            return False
        except ApiError as e:
            self.ctx.log.warning(
                "poll_failed", job_id=lb.job_id, batch_id=lb.batch_id, error=str(e)
            )
            return False
        finally:
            lane.spent += 1
            lane.calls.append(time.monotonic())
        await self.record(lb, snap)
        return True

    async def _pace(self, lane: _Lane, limit: int) -> None:
        """At most `limit` status calls to a provider in any span of one interval (a
        sliding window).

        Timed from when earlier calls were answered, not sent: the server handled each
        before its answer came, so this holds on the server's clock too."""
        now = time.monotonic()
        span = interval(self.ctx)
        calls = lane.calls
        while calls and now - calls[0] >= span:
            calls.popleft()
        if len(calls) >= limit:
            await asyncio.sleep(span - (now - calls[0]))
            calls.popleft()

    async def _page(self, lane: _Lane, cursor: str | None, limit: int) -> _Page:
        """One list page: parsed only when its bytes differ from last time."""
        await self._pace(lane, limit)
        try:
            raw = await lane.provider.list_raw(cursor)
        finally:
            lane.spent += 1
            lane.calls.append(time.monotonic())
        key = hash(raw)
        seen = lane.pages.get(cursor)
        if seen is not None and seen.key == key:
            return seen
        parsed = lane.provider.parse_page(raw, cursor)
        batches = parsed.batches
        page = _Page(
            key,
            batches,
            [b.id for b in batches],
            parsed.cursor,
            batches[-1].created_at if batches else 0.0,
        )
        lane.pages[cursor] = page
        return page

    async def sweep(self, limit: int | None = None) -> None:
        """Refresh every batch in flight, each provider within its status-call budget
        (`limit`: the same budget for every provider, instead)."""
        lanes = {n: live for n, live in self._by_lane().items() if not self.ctx.blocked(n)}
        results = await asyncio.gather(
            *(
                self._sweep_lane(
                    self.lane(name), live, budget(len(live)) if limit is None else limit
                )
                for name, live in lanes.items()
            )
        )
        if any(results):
            self.ctx.metrics.last_poll.set(self.ctx.clock())

    async def _sweep_lane(self, lane: _Lane, live: dict[str, LiveBatch], limit: int) -> bool:
        """One provider's sweep; True when its API answered."""
        ctx = self.ctx
        unseen = dict(live)
        oldest = min((b.created for b in unseen.values()), default=0.0)
        reached = False
        calls = 0
        if len(unseen) > 1:
            cursor: str | None = None
            for _ in range(min(MAX_PAGES, limit)):
                try:
                    page = await self._page(lane, cursor, limit)
                except AccessDenied as e:
                    await ctx.block(e)
                    return False
                except ApiError as e:
                    # The API is not answering: fetching every batch one by one would
                    # only multiply the calls. Try again at the next sweep.
                    ctx.log.warning("poll_failed", provider=lane.provider.name, error=str(e))
                    return False
                finally:
                    calls += 1
                reached = True
                if page.batches is None:  # the same bytes as last time: nothing changed
                    for batch_id in page.ids:
                        if unseen.pop(batch_id, None) is not None:
                            self._seen[batch_id] = ctx.clock()
                else:
                    for b in page.batches:
                        lb = unseen.pop(b.id, None)
                        if lb is not None:
                            await self.record(lb, b)
                    page.batches = None  # recorded: from now on only the ids are needed
                if not unseen or page.cursor is None or not page.ids:
                    break
                if page.last_created < oldest:
                    break
                cursor = page.cursor
        # Not on the pages read: ask one by one, the longest unseen first, within the
        # budget (the rest at the next sweep).
        waiting = sorted(unseen.values(), key=lambda b: (self._seen.get(b.batch_id, 0), b.created))
        for lb in waiting[: max(0, limit - calls)]:
            reached = await self._get(lb) or reached
        return reached

    def _new_interval(self) -> None:
        for lane in self._lanes.values():
            lane.spent = 0

    def _busy(self) -> dict[str, list[LiveBatch]]:
        """Batches near a transition, per provider (held providers are left alone)."""
        out: dict[str, list[LiveBatch]] = {}
        for name, live in self._by_lane().items():
            busy = [b for b in live.values() if b.status in _BUSY]
            if busy and not self.ctx.blocked(name):
                out[name] = busy
        return out

    async def _pushed(self) -> None:
        """Batches a webhook says have ended: fetched at once."""
        pushed = set(self.ctx.webhook_batches)
        self.ctx.webhook_batches.difference_update(pushed)
        for batch_id in pushed:
            lb = self.live.get(batch_id)
            if (
                lb is not None
                and (lb.provider or self.ctx.providers.default_name) in self.ctx.providers
            ):
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
                self._lanes.clear()
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
                for lane in self._lanes.values():
                    lane.pages.clear()
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
        if ctx.all_blocked:
            return None
        if ctx.webhook_batches:
            await self._pushed()
        if not self.live:
            self._gauges(force=True)
            self._next_full = None
            return now + OTHERS_SECONDS if ctx.leases.shared else None
        every = interval(ctx)
        if self._next_full is None:  # the first batch in flight: its status is known
            self._next_full = now + every
            self._new_interval()
            if any(b.status in _BUSY for b in self.live.values()):
                self._next_busy = now + every / 2
        elif now >= self._next_full:
            self._new_interval()
            self._next_full = now + every
            await self.sweep()
            self._gauges()
            left = self._left()
            busy = self._busy()
            fits = all(len(b) <= left.get(name, 0) for name, b in busy.items())
            self._next_busy = now + every / 2 if busy and fits else None
        elif self._next_busy is not None and now >= self._next_busy:
            self._next_busy = None
            left = self._left()
            for name, near in self._busy().items():
                for lb in near[: max(0, left.get(name, 0))]:
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
    CALLER.set("tracker")  # this task's status calls say `User-Agent: batchd (tracker)`
    tracker = Tracker(ctx)
    await tracker.reload()
    await loop(ctx, ctx.wake_track, tracker.step)
