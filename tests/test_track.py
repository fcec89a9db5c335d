"""Tracking cost: in-flight batches are refreshed by list pages, not one GET each."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from batchd import logs
from batchd.api import BatchApi
from batchd.metrics import Metrics
from batchd.spool import Spool
from batchd.stages import Context, track
from batchd.store import Store
from tests.conftest import chat_lines, make_config, start_emulator


async def test_sweep_of_250_in_flight_batches_costs_at_most_4_calls(tmp_path: Path) -> None:
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
            # Someone else's batches, newer than ours, are on the pages too.
            for i in range(250):
                b = await api.create_batch(f["id"], "/v1/chat/completions", "24h", {})
                await store.add_attempt(f"att{i:03d}", "job1", i, "processing/x.jsonl")
                await store.update_attempt(
                    f"att{i:03d}", batch_id=b["id"], status=b["status"], batch=b
                )
            for _ in range(20):
                await api.create_batch(f["id"], "/v1/chat/completions", "24h", {})
            ctx = Context(cfg, store, Spool(cfg.spool.dir), api, Metrics(), logs.get())
            before = Counter(emu.state.calls)
            await track.sweep(ctx)
            calls = Counter(emu.state.calls)
            calls.subtract(before)
            used = {k: v for k, v in calls.items() if v}
            assert sum(used.values()) <= 4, used
            assert used.get("GET /v1/batches/{id}", 0) == 0
            statuses = Counter(a.status for a in await store.live_attempts())
            assert statuses == {"in_progress": 250}  # every one refreshed
    finally:
        await store.close()
        await runner.cleanup()
        emu.state.close()


async def test_batches_older_than_the_pages_fall_back_to_get(tmp_path: Path) -> None:
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
            for i in range(2):
                b = await api.create_batch(f["id"], "/v1/chat/completions", "24h", {})
                # created_at claims to be newer than the list shows, so paging stops early
                b["created_at"] = int(b["created_at"]) + 10_000
                await store.add_attempt(f"att{i}", "job1", i, "processing/x.jsonl")
                await store.update_attempt(f"att{i}", batch_id=b["id"], status=b["status"], batch=b)
            ctx = Context(cfg, store, Spool(cfg.spool.dir), api, Metrics(), logs.get())
            await track.sweep(ctx)
            assert {a.status for a in await store.live_attempts()} == {"in_progress"}
    finally:
        await store.close()
        await runner.cleanup()
        emu.state.close()
