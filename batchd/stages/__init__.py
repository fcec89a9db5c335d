"""Stages: each reads the store, does one kind of I/O, records the result.

Each stage is level-triggered: at start-up it acts on whatever records are in its
state, so a restart after a crash needs no separate recovery path; after that it
reads only what is due (through an index, in bounded batches) and sleeps until the
earliest due time or an event. `loop` is the one loop every stage runs in, `guarded`
the one way an item's error is kept to that item, and `Worker` runs items
concurrently under a limit and drains them at shutdown.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from batchd.config import Config
from batchd.leases import Leases
from batchd.metrics import Metrics
from batchd.prices import PriceBook, price_source
from batchd.providers import Provider, Providers
from batchd.providers.errors import AccessDenied, ApiError, InvalidRequest
from batchd.spool import Spool
from batchd.stages.health import Hold
from batchd.states import JobState, desired_job_state
from batchd.store import LiveBatch, Store

Step = Callable[[], Awaitable[float | None]]
Item = Callable[[], Awaitable[None]]
OnInvalid = Callable[[str, InvalidRequest], Awaitable[None]]


@dataclass
class Context:
    """The parts every stage shares; built by the daemon."""

    cfg: Config
    store: Store
    spool: Spool
    providers: Providers
    metrics: Metrics
    log: Any
    clock: Callable[[], float] = time.time
    # Set to wake a stage early (new file claimed, job ready to collect, …).
    wake_submit: asyncio.Event = field(default_factory=asyncio.Event)
    wake_track: asyncio.Event = field(default_factory=asyncio.Event)
    wake_collect: asyncio.Event = field(default_factory=asyncio.Event)
    wake_retention: asyncio.Event = field(default_factory=asyncio.Event)
    wake_intake: asyncio.Event = field(default_factory=asyncio.Event)
    wake_facade: asyncio.Event = field(default_factory=asyncio.Event)  # a job ended
    # Serialises result-dir naming and publishing so two jobs never pick one NAME.
    publish_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Serialises failing jobs: the stage that decided and the loop that resumes
    # decided failures must not both build a staging dir for one job.
    fail_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Batch ids a verified webhook says have ended; the tracker drains this set in
    # place (pop/discard) and refreshes them at once. webhooks_enabled = route mounted.
    webhook_batches: set[str] = field(default_factory=set)
    webhooks_enabled: bool = False
    # Batches created since the tracker last looked (handed over in process; the
    # tracker also reloads from the store now and then).
    new_batches: list[LiveBatch] = field(default_factory=list)
    # Per provider NAME: why its API refuses access (its jobs wait meanwhile).
    holds: dict[str, Hold] = field(default_factory=dict)
    # What this replica works on (replicas sharing a PostgreSQL store); solo: everything.
    leases: Leases = field(default_factory=Leases.solo)
    # Set at shutdown: stages start nothing new; what is in flight drains.
    stopping: bool = False
    # True while files are moved out of inbox/ but their jobs not yet recorded.
    claiming: bool = False
    # Bumped when what admission decides on changes (a limit learned, a reload).
    admission_version: int = 0
    # Jobs ended while this process ran, by final state (`run --once` exit code).
    outcomes: Counter[str] = field(default_factory=Counter)
    # `run --once` stopped because a held provider's jobs could not go on.
    stuck_held: bool = False
    # Batch prices per provider NAME ([prices] first, then genai-prices); built on use.
    price_books: dict[str, PriceBook] = field(default_factory=dict)
    # Queue sources (batchd/sources/): each source stage's wake event by name (set when
    # a job of the source ends); in `run --once` the sources still reading, and those
    # given up (their broker stayed unreachable).
    wake_sources: dict[str, asyncio.Event] = field(default_factory=dict)
    sources_draining: set[str] = field(default_factory=set)
    sources_failed: set[str] = field(default_factory=set)

    def provider(self, name: str | None) -> Provider:
        """The provider of a job or attempt (None: the default)."""
        return self.providers.of(name)

    def hold_of(self, name: str | None) -> Hold:
        """The hold of one provider (None: the default's)."""
        key = name or self.providers.default_name
        h = self.holds.get(key)
        if h is None:
            h = self.holds[key] = Hold(provider=key, default=key == self.providers.default_name)
        return h

    @property
    def hold(self) -> Hold:
        """The default provider's hold."""
        return self.hold_of(None)

    def blocked(self, name: str | None) -> bool:
        """True while this provider refuses access (its jobs wait)."""
        return self.hold_of(name).blocked

    @property
    def all_blocked(self) -> bool:
        """True while every provider refuses access (nothing can move)."""
        return all(self.hold_of(n).blocked for n in self.providers)

    async def block(self, err: AccessDenied) -> None:
        """Hold the provider that refused access."""
        await self.hold_of(err.provider).block(self, err)

    def prices_of(self, name: str | None) -> PriceBook:
        """The batch prices of one provider's models (None: the default's)."""
        key = name or self.providers.default_name
        book = self.price_books.get(key)
        if book is None:
            cfg = self.providers[key].cfg if key in self.providers else None
            source = price_source(cfg.kind, cfg.api.base_url) if cfg else "openai"
            book = self.price_books[key] = PriceBook(source, self.cfg.prices)
        return book

    @property
    def prices(self) -> PriceBook:
        """The default provider's batch prices."""
        return self.prices_of(None)

    def reprice(self) -> None:
        """Price with the current [prices] (after a reload; books are rebuilt on use)."""
        self.price_books.clear()

    def wake_all(self) -> None:
        """Wake every stage (the API is back, another process changed the store, …)."""
        for e in (
            self.wake_submit,
            self.wake_track,
            self.wake_collect,
            self.wake_retention,
            self.wake_intake,
            self.wake_facade,
            *self.wake_sources.values(),
        ):
            e.set()


async def wait_for(event: asyncio.Event, timeout: float | None) -> None:
    """Wait until `event` is set or `timeout` passes (None: only the event), then clear it.

    asyncio.timeout, not asyncio.wait_for: on Python 3.11 wait_for swallows a
    cancellation that arrives as the event is set, and the stage loop then ran on
    for ever while the daemon waited for it to stop.
    """
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        pass
    event.clear()


async def loop(ctx: Context, wake: asyncio.Event, step: Step) -> None:
    """Run `step` until shutdown; between steps sleep until the time it returns (None:
    until woken). A stage with nothing due costs nothing, however short the intervals."""
    while not ctx.stopping:
        due = await step()
        if ctx.stopping:
            return
        await wait_for(wake, None if due is None else max(0.0, due - ctx.clock()))


async def sync_job(ctx: Context, job_id: str) -> None:
    """Move a submitted job to the state its pieces and attempts call for."""
    job = await ctx.store.job(job_id)
    pieces = await ctx.store.pieces(job_id)
    atts = [a for a in await ctx.store.attempts(job_id) if a.open]
    new = desired_job_state(
        job.state,
        [p.done for p in pieces],
        [(a.batch_id is not None, a.status) for a in atts],
        job.cancel_requested,
    )
    if new != job.state:
        await ctx.store.transition(job_id, new, current=job)
        if new == JobState.COLLECTING:
            ctx.wake_collect.set()
    if new == JobState.SUBMITTING:
        # Also when it was submitting already: a follow-up attempt just queued (another
        # piece still pending, or a restart that found it so) must not wait for an
        # unrelated wake-up; the submit stage may be asleep with nothing else due.
        ctx.wake_submit.set()


class Backoff:
    """Per-item failure counts and retry times, so one failing job or attempt waits
    (jittered, exponential) while the stage carries on with everything else."""

    def __init__(self, clock: Callable[[], float], base: float = 0.5, cap: float = 60.0) -> None:
        self._clock, self._base, self._cap = clock, base, cap
        self._failures: dict[str, int] = {}
        self._until: dict[str, float] = {}

    def ready(self, key: str) -> bool:
        """False while `key` is backing off."""
        return self._until.get(key, 0.0) <= self._clock()

    def failed(self, key: str) -> tuple[int, float]:
        """Record a failure; returns (failures so far, seconds until the next try)."""
        n = self._failures[key] = self._failures.get(key, 0) + 1
        delay = min(self._cap, self._base * 2 ** min(n, 16)) * random.uniform(0.5, 1.0)
        self._until[key] = self._clock() + delay
        return n, delay

    def ok(self, key: str) -> None:
        """Forget `key`'s failures."""
        self._failures.pop(key, None)
        self._until.pop(key, None)

    def __len__(self) -> int:
        return len(self._until)

    def next_ready(self) -> float | None:
        """When the first item backing off may be tried again."""
        return min(self._until.values(), default=None)


async def guarded(
    ctx: Context,
    stage: str,
    backoff: Backoff,
    key: str,
    job_id: str,
    item: Item,
    on_invalid: OnInvalid | None = None,
) -> None:
    """Run one item; keep whatever goes wrong with it.

    The API refusing access (a bad key, a wrong base URL) holds every job instead of
    failing this one; another 4xx is the job's (`on_invalid`); anything else backs
    this item off while the rest of the stage carries on.
    """
    try:
        try:
            await item()
        except AccessDenied as e:
            await ctx.block(e)
            return
        except InvalidRequest as e:
            if on_invalid is None:
                raise
            await on_invalid(job_id, e)
        backoff.ok(key)
    except AccessDenied as e:
        await ctx.block(e)
    except Exception as e:
        n, delay = backoff.failed(key)
        ctx.log.warning(
            f"{stage}_retry",
            job_id=job_id,
            error=f"{type(e).__name__}: {e}",
            failures=n,
            retry_in=round(delay, 2),
            exc_info=not isinstance(e, ApiError | OSError),
        )


class Worker:
    """Runs a stage's items concurrently, at most `limit` at once, each `guarded`; a
    finished item wakes the stage so it can start the next. At shutdown, `drain` gives
    those in flight a grace period, then cancels them."""

    def __init__(self, ctx: Context, stage: str, limit: int, wake: asyncio.Event) -> None:
        self.ctx, self.stage, self.limit, self.wake = ctx, stage, limit, wake
        self.backoff = Backoff(ctx.clock)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._fatal: BaseException | None = None

    @property
    def free(self) -> int:
        """Slots for more items."""
        return max(0, self.limit - len(self._tasks))

    def busy(self, key: str) -> bool:
        """True while `key` runs or backs off."""
        return key in self._tasks or not self.backoff.ready(key)

    def running(self, key: str) -> bool:
        """True while `key` runs (not merely backs off)."""
        return key in self._tasks

    def start(self, key: str, job_id: str, item: Item, on_invalid: OnInvalid | None = None) -> bool:
        """Start `item` unless `key` is busy or every slot is taken."""
        if self.busy(key) or not self.free or self.ctx.stopping:
            return False
        task = asyncio.create_task(
            guarded(self.ctx, self.stage, self.backoff, key, job_id, item, on_invalid),
            name=f"{self.stage}:{key}",
        )
        self._tasks[key] = task
        task.add_done_callback(lambda _t: self._done(key))
        return True

    def _done(self, key: str) -> None:
        task = self._tasks.pop(key, None)
        if task is not None and not task.cancelled() and task.exception() is not None:
            # Not an error of the item (guarded keeps those): SystemExit, a crash. It
            # must end the stage, as it would have inline.
            self._fatal = task.exception()
        self.wake.set()

    def check(self) -> None:
        """Raise what ended an item's task that was not the item's own error."""
        if self._fatal is not None:
            fatal, self._fatal = self._fatal, None
            raise fatal

    async def drain(self, grace: float) -> None:
        """Let items in flight finish for up to `grace` seconds, then cancel the rest."""
        tasks = list(self._tasks.values())
        if not tasks:
            return
        _done, pending = await asyncio.wait(tasks, timeout=grace)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending)
