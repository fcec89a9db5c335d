"""Budgets in the daemon: a job whose high estimate does not fit what is left waits, as a
whole (no batch of it is created), visibly (jobs, show, metric), and starts when the
budget is raised (SIGHUP) or the period rolls over."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from batchd.daemon import Daemon
from batchd.stages.submit import Submit
from batchd.store import Store
from tests.conftest import config_file, drop, make_config, run_cli, start_emulator
from tests.procs import daemon, wait_for

# 10 requests of at most 1,000 output tokens: ~$0.0030 at gpt-4o-mini's batch price
# ($0.30 per million output tokens), so a $0.0065 daily budget holds two such jobs.
BUDGET = 0.0065


def priced_lines(tag: str, n: int = 10) -> bytes:
    """n chat requests with max_tokens 1000 (distinct per `tag`)."""
    out = []
    for i in range(n):
        body = {
            "model": "gpt-4o-mini",
            "max_tokens": 1000,
            "messages": [{"role": "user", "content": f"{tag}: tell me about item {i}"}],
        }
        line = {"custom_id": f"{tag}-{i}", "method": "POST", "url": "/v1/chat/completions"}
        out.append(orjson.dumps({**line, "body": body}))
    return b"\n".join(out) + b"\n"


def jobs(db: Path) -> dict[str, dict[str, Any]]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    con.row_factory = sqlite3.Row
    try:
        return {r["name"]: dict(r) for r in con.execute("SELECT * FROM jobs")}
    except sqlite3.OperationalError:
        return {}
    finally:
        con.close()


def waiting(db: Path) -> list[str]:
    return [n for n, j in jobs(db).items() if j["budget_wait"] and j["admitted_at"] is None]


def batch_jobs(emu: Any) -> set[str]:
    """Ids of the jobs the emulator holds batches of."""
    return {b["metadata"]["batchd_job"] for b in emu.state.batches()}


async def test_third_job_waits_for_its_budget_until_sighup_raises_it(tmp_path: Path) -> None:
    # Batches stay in progress: the first two jobs hold their reservations throughout.
    emu, runner = await start_emulator(
        time_scale=1.0, validating_seconds=0.0, in_progress_seconds=600.0
    )
    try:
        extra = '[intake]\nduplicate_window = "0"\n[budget]\ndaily_usd = {}\n'
        conf = config_file(tmp_path, emu.url, extra=extra.format(BUDGET))
        cfg = make_config(tmp_path, emu.url)
        db = tmp_path / "batchd.db"
        async with daemon(conf) as proc:
            for tag in ("one", "two", "three"):
                drop(cfg, f"{tag}.jsonl", priced_lines(tag))
            await wait_for(lambda: len(emu.state.batches()) == 2 and waiting(db), 30, "a wait")
            [name] = waiting(db)
            held = jobs(db)[name]
            assert held["id"] not in batch_jobs(emu)  # nothing of it was submitted
            assert "left of the total's daily budget of $0.0065" in held["budget_wait"]
            est = orjson.loads(held["estimate"])
            high = est["cost_high_nanousd"]
            assert 2 * high <= BUDGET * 1e9 < 3 * high  # two fit, a third does not

            listing = await asyncio.to_thread(run_cli, "jobs", "-c", str(conf))
            assert (
                f"{name}" in listing.stdout and "submitting (waiting for budget)" in listing.stdout
            )
            show = await asyncio.to_thread(run_cli, "show", name, "-c", str(conf))
            assert "submitting (waiting for budget: up to $" in show.stdout
            status, metrics = await proc.get("/metrics")
            assert status == 200 and "batchd_budget_waiting_jobs 1.0" in metrics

            # Raise the budget and reload: the third job is admitted and submitted.
            conf.write_text(conf.read_text().replace(f"daily_usd = {BUDGET}", "daily_usd = 1.0"))
            proc.popen.send_signal(signal.SIGHUP)
            await wait_for(lambda: len(emu.state.batches()) == 3, 30, "the third batch")
            assert held["id"] in batch_jobs(emu)
            now = jobs(db)[name]
            assert now["admitted_at"] is not None and now["budget_wait"] is None
            assert now["reserved_nanos"] == est["cost_high_nanousd"]
            status, metrics = await proc.get("/metrics")
            assert "batchd_budget_waiting_jobs 0.0" in metrics
        show = await asyncio.to_thread(run_cli, "show", name, "--json", "-c", str(conf))
        kinds = [e["kind"] for e in orjson.loads(show.stdout)["events"]]
        assert kinds.index("budget_wait") < kinds.index("budget_admitted")
    finally:
        await runner.cleanup()
        emu.state.close()


async def test_waiting_job_starts_when_the_day_rolls_over(tmp_path: Path) -> None:
    emu, runner = await start_emulator(
        time_scale=1.0, validating_seconds=0.0, in_progress_seconds=600.0
    )
    # The daemon's clock: a minute before midnight UTC, moving with real time.
    start = time.time()
    t0 = datetime(2026, 3, 31, 23, 59, 0, tzinfo=UTC).timestamp()
    jump = [0.0]

    def clock() -> float:
        return t0 + (time.time() - start) + jump[0]

    try:
        cfg = make_config(tmp_path, emu.url, budget={"daily_usd": BUDGET})
        for tag in ("one", "two", "three"):
            drop(cfg, f"{tag}.jsonl", priced_lines(tag))
        d = Daemon(cfg, clock=clock)
        task = asyncio.create_task(d.run())
        db = cfg.state.database
        await wait_for(lambda: len(emu.state.batches()) == 2 and waiting(db), 30, "a wait")
        assert d.ctx is not None
        # The submit stage is next due at the rollover, by the calendar alone.
        midnight = datetime(2026, 4, 1, tzinfo=UTC).timestamp()
        assert await Submit(d.ctx)._budget() == midnight
        jump[0] = midnight - clock() + 1.0
        d.ctx.wake_submit.set()  # what the stage's timer does at `midnight`
        await wait_for(lambda: len(emu.state.batches()) == 3, 30, "the third batch")
        [third] = [j for j in jobs(db).values() if j["admitted_at"] >= midnight]
        assert third["budget_wait"] is None
        d.request_stop()
        await asyncio.wait_for(task, 20)
        store = await Store.open(db)
        try:  # the new day holds only the third job's reservation
            rows = await store.budget_committed(midnight, t0 - 31 * 86400)
        finally:
            await store.close()
        today = sum(n for _m, _s, is_today, n in rows if is_today)
        assert today == third["reserved_nanos"]
    finally:
        await runner.cleanup()
        emu.state.close()
