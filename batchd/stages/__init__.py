"""Stages: each reads the store, does one kind of I/O, records the result.

Each stage is level-triggered: it acts on whatever records are in its state, so a
restart after a crash needs no separate recovery path.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from batchd.api import BatchApi
from batchd.config import Config
from batchd.metrics import Metrics
from batchd.spool import Spool
from batchd.states import JobState, desired_job_state
from batchd.store import Store


@dataclass
class Context:
    """The parts every stage shares; built by the daemon."""

    cfg: Config
    store: Store
    spool: Spool
    api: BatchApi
    metrics: Metrics
    log: Any
    clock: Callable[[], float] = time.time
    # Set to wake a stage early (new file claimed, job ready to collect, …).
    wake_submit: asyncio.Event = field(default_factory=asyncio.Event)
    wake_track: asyncio.Event = field(default_factory=asyncio.Event)
    wake_collect: asyncio.Event = field(default_factory=asyncio.Event)
    # Serialises result-dir naming and publishing so two jobs never pick one NAME.
    publish_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Serialises failing jobs: the stage that decided and the loop that resumes
    # decided failures must not both build a staging dir for one job.
    fail_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Batch ids a verified webhook says have ended; the tracker drains this set in
    # place (pop/discard) and refreshes them at once. webhooks_enabled = route mounted.
    webhook_batches: set[str] = field(default_factory=set)
    webhooks_enabled: bool = False


async def wait_for(event: asyncio.Event, timeout: float) -> None:
    """Wait until `event` is set or `timeout` passes, then clear it.

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
        await ctx.store.transition(job_id, new)
        if new == JobState.COLLECTING:
            ctx.wake_collect.set()
        elif new == JobState.SUBMITTING:
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
