"""Tracking cost: in-flight batches are refreshed by list pages, not one GET each."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from batchd import logs
from batchd.api import BatchApi
from batchd.metrics import Metrics
from batchd.providers import Providers
from batchd.spool import Spool
from batchd.stages import Context, track
from batchd.store import Store
from tests.conftest import Emulator, chat_lines, make_config, start_emulator


@asynccontextmanager
async def in_flight(
    tmp_path: Path, ours: int, newer: int, shift: int = 0
) -> AsyncIterator[tuple[Context, Emulator]]:
    """`ours` batches tracked in the store, then `newer` batches of someone else's on the
    pages before them; `shift` moves our recorded created_at (to end paging early)."""
    emu, runner = await start_emulator(
        time_scale=1.0, validating_seconds=0.0, in_progress_seconds=600.0
    )
    cfg = make_config(tmp_path, emu.url)
    store = await Store.open(cfg.state.database)
    try:
        async with BatchApi(cfg.api, cfg.api.api_key(), Metrics()) as api:
            src = tmp_path / "in.jsonl"
            src.write_bytes(chat_lines(2))
            f = await api.upload_file(src, "in.jsonl")
            await store.create_job("job1", "n", "processing/x.jsonl", "inbox")
            for i in range(ours):
                b = await api.create_batch(f["id"], "/v1/chat/completions", "24h", {})
                b["created_at"] = int(b["created_at"]) + shift
                await store.add_attempt(f"att{i:03d}", "job1", i, "processing/x.jsonl")
                await store.update_attempt(
                    f"att{i:03d}", batch_id=b["id"], status=b["status"], batch=b
                )
            for _ in range(newer):
                await api.create_batch(f["id"], "/v1/chat/completions", "24h", {})
            async with Providers.build(cfg, Metrics()) as providers:
                ctx = Context(cfg, store, Spool(cfg.spool.dir), providers, Metrics(), logs.get())
                yield ctx, emu
    finally:
        await store.close()
        await runner.cleanup()
        emu.state.close()


async def _sweep_calls(ctx: Context, emu: Emulator, tracker: track.Tracker) -> dict[str, int]:
    before = Counter(emu.state.calls)
    await tracker.sweep(track.budget(len(tracker.live)))
    calls = Counter(emu.state.calls)
    calls.subtract(before)
    return {k: v for k, v in calls.items() if v}


async def test_sweep_of_250_in_flight_batches_costs_at_most_4_calls(tmp_path: Path) -> None:
    async with in_flight(tmp_path, ours=250, newer=20) as (ctx, emu):
        tracker = track.Tracker(ctx)
        await tracker.reload()
        used = await _sweep_calls(ctx, emu, tracker)
        assert sum(used.values()) <= track.budget(250) == 4, used
        assert used.get("GET /v1/batches/{id}", 0) == 0
        statuses = Counter(a.status for a in await ctx.store.live_attempts())
        assert statuses == {"in_progress": 250}  # every one refreshed
        # Write on change: a second sweep that finds nothing new writes nothing.
        events = len(await ctx.store.events("job1"))
        stamps = {a.id: a.updated_at for a in await ctx.store.attempts("job1")}
        await _sweep_calls(ctx, emu, tracker)
        assert len(await ctx.store.events("job1")) == events
        assert {a.id: a.updated_at for a in await ctx.store.attempts("job1")} == stamps


async def test_batches_older_than_the_pages_fall_back_to_get_within_the_budget(
    tmp_path: Path,
) -> None:
    # Our two batches sit on page 2, but their recorded creation time says paging may
    # stop after page 1: they are fetched one by one instead, at most ⌈2/100⌉+1 = 2
    # status calls per interval, so the second waits for the next sweep.
    async with in_flight(tmp_path, ours=2, newer=150, shift=10_000) as (ctx, emu):
        tracker = track.Tracker(ctx)
        await tracker.reload()
        assert await _sweep_calls(ctx, emu, tracker) == {
            "GET /v1/batches": 1,
            "GET /v1/batches/{id}": 1,
        }
        assert await _sweep_calls(ctx, emu, tracker) == {
            "GET /v1/batches": 1,
            "GET /v1/batches/{id}": 1,
        }
        assert {a.status for a in await ctx.store.live_attempts()} == {"in_progress"}


def test_the_status_call_budget() -> None:
    assert [track.budget(n) for n in (1, 2, 100, 101, 250, 10_000)] == [2, 2, 2, 3, 4, 101]
