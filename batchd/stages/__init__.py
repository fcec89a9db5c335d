"""Stages: each reads the store, does one kind of I/O, records the result.

Each stage is level-triggered: it acts on whatever records are in its state, so a
restart after a crash needs no separate recovery path.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from batchd.api import BatchApi
from batchd.config import Config
from batchd.metrics import Metrics
from batchd.spool import Spool
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


async def wait_for(event: asyncio.Event, timeout: float) -> None:
    """Wait until `event` is set or `timeout` passes, then clear it."""
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        pass
    event.clear()
