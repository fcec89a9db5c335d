"""Tracking cost: batch-status API calls for 10,000 in-flight batches.

    python -m bench.tracking [--smoke] [--batches N]

10,000 batches are created directly over HTTP on an in-process emulator (they stay
in_progress) and recorded in a fresh batchd database through `batchd.store.Store`,
as `tests/test_track.py` does. Then batchd's tracker runs: one `track.sweep` (a full
sweep), and `track.run` for a few poll intervals. Baseline: the user's script, one
`batches.retrieve` (GET /v1/batches/{id}) per batch per poll. Calls are counted by
the emulator. Target: <= 101 calls per sweep (list pages of 100).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from pathlib import Path
from typing import Any

from aiohttp import web

from batchd import config, logs
from batchd.api import BatchApi
from batchd.emulator import EmulatorConfig, EmulatorState, create_app
from batchd.metrics import Metrics
from batchd.spool import Spool
from batchd.stages import Context, track
from batchd.store import Store
from bench.common import API_KEY, Row, fmt_ratio, parser, print_table, small_chat, workdir

GET_ONE = "GET /v1/batches/{id}"


def _delta(state: EmulatorState, before: Counter[str]) -> dict[str, int]:
    now = Counter(state.calls)
    now.subtract(before)
    return {k: v for k, v in now.items() if v}


async def _create(api: BatchApi, file_id: str, n: int, conc: int = 16) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    it = iter(range(n))

    async def worker() -> None:
        for _ in it:
            out.append(await api.create_batch(file_id, "/v1/chat/completions", "24h", {}))

    await asyncio.gather(*(worker() for _ in range(conc)))
    return out


async def run(n: int, tmp: Path, interval: float, intervals: int) -> list[Row]:
    """Create n batches, seed the store, count the calls of batchd and of the baseline."""
    logs.setup("warning", "json")
    state = EmulatorState(
        EmulatorConfig(api_key=API_KEY, validating_seconds=0.0, in_progress_seconds=1e6)
    )
    runner = web.AppRunner(create_app(state), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    data = {
        "api": {"base_url": url, "api_key_env": "BENCH_API_KEY"},
        "spool": {"dir": str(tmp / "spool")},
        "state": {"database": str(tmp / "batchd.db")},
        "batch": {"poll_interval_seconds": interval},
    }
    cfg = config.parse(data, tmp, env={"BENCH_API_KEY": API_KEY})
    store = await Store.open(cfg.state.database)
    try:
        async with BatchApi(cfg.api, API_KEY, Metrics()) as api:
            src = tmp / "in.jsonl"
            src.write_bytes(small_chat(2))
            f = await api.upload_file(src, "in.jsonl")
            t = time.perf_counter()
            batches = await _create(api, f["id"], n)
            created_s = time.perf_counter() - t
            # Seeding only: batchd itself runs with its durable default (FULL).
            await store._db.execute("PRAGMA synchronous = OFF")
            await store.create_job("job1", "bench", "processing/x.jsonl", "inbox")
            for i, b in enumerate(batches):
                aid = f"att{i:05d}"
                await store.add_attempt(aid, "job1", i, "processing/x.jsonl")
                b = b | {"status": "in_progress"}
                await store.update_attempt(aid, batch_id=b["id"], status="in_progress", batch=b)
            await store._db.execute("PRAGMA synchronous = FULL")
            ctx = Context(cfg, store, Spool(cfg.spool.dir), api, Metrics(), logs.get())

            # One full sweep.
            before = Counter(state.calls)
            t = time.perf_counter()
            await track.sweep(ctx)
            sweep_s = time.perf_counter() - t
            sweep_calls = sum(_delta(state, before).values())
            assert {a.status for a in await store.live_attempts()} == {"in_progress"}

            # The tracker's own loop for a few poll intervals (its sweeps counted).
            sweeps = 0
            real_sweep = track.sweep
            before = Counter(state.calls)
            at_last_sweep = 0

            async def counted(ctx: Context, only: set[str] | None = None) -> None:
                nonlocal sweeps, at_last_sweep
                await real_sweep(ctx, only)
                sweeps += 1  # completed ones only (the last may be cut short) ...
                at_last_sweep = sum(_delta(state, before).values())  # ... and their calls

            track.sweep = counted  # type: ignore[assignment]
            task = asyncio.create_task(track.run(ctx))
            await asyncio.sleep((interval + sweep_s) * intervals + interval / 2)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            track.sweep = real_sweep  # type: ignore[assignment]
            loop_calls = at_last_sweep  # a sweep cut short by the end is not counted
            per_interval = loop_calls / max(1, sweeps)  # one sweep per poll interval

            # Baseline: one GET per batch (what the user's script does each poll).
            before = Counter(state.calls)
            t = time.perf_counter()
            for b in batches:
                await api.get_batch(b["id"])
            base_s = time.perf_counter() - t
            base_calls = _delta(state, before).get(GET_ONE, 0)
    finally:
        await store.close()
        await runner.cleanup()
        state.close()
    return [
        Row(
            f"calls per full sweep, {n} in-flight batches",
            str(sweep_calls),
            str(base_calls),
            fmt_ratio(sweep_calls, base_calls),
            f"<= {n // 100 + 1}",
            sweep_calls <= n // 100 + 1,
        ),
        Row(
            f"calls per poll interval (track.run: {loop_calls} calls, {sweeps} sweeps)",
            f"{per_interval:.0f}",
            str(base_calls),
            fmt_ratio(per_interval, base_calls),
            f"<= {n // 100 + 1}",
            per_interval <= n // 100 + 1,
        ),
        Row(
            "wall time of one sweep (s)",
            f"{sweep_s:.2f}",
            f"{base_s:.2f}",
            fmt_ratio(sweep_s, base_s),
            "-",
            None,
        ),
        Row(f"(setup: {n} batches created in {created_s:.1f} s)", "-", "-", "-", "-", None),
    ]


def main() -> int:
    """Run and print the table."""
    p = parser(__doc__)
    p.add_argument("--batches", type=int, help="in-flight batches (default 10000; smoke 300)")
    a = p.parse_args()
    n = a.batches or (300 if a.smoke else 10_000)
    interval, intervals = (0.5, 2) if a.smoke else (3.0, 3)
    with workdir("track") as tmp:
        rows = asyncio.run(run(n, tmp, interval, intervals))
    notes = [
        "baseline = one GET /v1/batches/{id} per in-flight batch per poll (the SDK's "
        "batches.retrieve loop), timed here with batchd's HTTP client on the same emulator"
    ]
    print_table("Tracking cost (bench.tracking)", rows, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
