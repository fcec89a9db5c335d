"""Stage plumbing shared by every loop."""

from __future__ import annotations

import asyncio

import pytest

from batchd.stages import wait_for


async def test_wait_for_never_swallows_a_cancellation() -> None:
    # Regression: with asyncio.wait_for, a cancel arriving as the event was set was
    # swallowed on Python 3.11, so a stage loop ran on and --once never returned.
    for _ in range(20):
        ev = asyncio.Event()

        async def stage_loop(ev: asyncio.Event = ev) -> None:
            while True:
                await wait_for(ev, 10)

        task = asyncio.create_task(stage_loop())
        await asyncio.sleep(0)
        ev.set()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 2)


async def test_wait_for_times_out_and_clears() -> None:
    ev = asyncio.Event()
    await wait_for(ev, 0.01)
    ev.set()
    await wait_for(ev, 10)
    assert not ev.is_set()
