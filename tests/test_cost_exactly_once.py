"""Charged exactly once: a job that is split, has expired requests resubmitted and is
killed while its results are collected is charged exactly the usage of its result lines.

An attempt's charge is tallied from its result files as they arrive and written in the
transaction that settles the attempt, keyed by the attempt: reading the files again
after a crash replaces the tally, never adds to it. Checked at chosen crash points (in
process: before the settle, after it, in the middle of a download) and with real
SIGKILLs of a daemon process while results download from a throttled emulator.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchd import config
from batchd.config import Config
from batchd.stages import collect
from batchd.store import Store
from tests.conftest import chat_lines, config_file, drop, make_config, run_once, start_emulator
from tests.costcheck import charges, expected_nanos
from tests.test_crash import Crash, crash_once

SEED = int(os.environ.get("BATCHD_CRASH_SEED", "20240611"))
EXPIRING = {1: {"expire": True}, 6: {"expire": True}, 9: {"expire": True}}


def crash_on_call(n: int, real: Callable[..., Any]) -> Callable[..., Any]:
    """`real`, except that its n-th call raises Crash (stands in for SIGKILL there)."""
    calls = 0

    async def wrapper(*a: Any, **kw: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == n:
            raise Crash
        return await real(*a, **kw)

    return wrapper


def crash_on_line(n: int) -> Callable[..., None]:
    """collect's per-line hook (`_Sink._line`) for output lines, crashing at the n-th
    output line it sees."""
    real = collect._Sink._line
    seen = 0

    def hook(sink: Any, line: bytes) -> None:
        nonlocal seen
        if sink.key == "output":
            seen += 1
            if seen == n:
                raise Crash
        real(sink, line)

    return hook


def check_charged_once(cfg: Config, name: str, requests: int) -> None:
    """The job's cost, its charges and the result lines agree, each request once."""
    done = cfg.spool.dir / "done" / name
    info = orjson.loads((done / "job.json").read_bytes())
    billed, nanos = expected_nanos(done, "gpt-4o-mini")
    rows = [c for c in charges(cfg.state.database) if c["job_id"] == info["job_id"]]
    assert billed == requests
    assert sum(c["requests"] for c in rows) == billed
    assert sum(c["cost_nanos"] for c in rows) == info["cost"]["nanousd"] == nanos > 0
    con = sqlite3.connect(cfg.state.database)
    try:
        # one row per attempt whose results billed something, for attempts that exist
        with_batch = {
            r[0]
            for r in con.execute(
                "SELECT id FROM attempts"
                " WHERE job_id = ? AND collected = 1 AND batch_id IS NOT NULL",
                (info["job_id"],),
            )
        }
        (cost,) = con.execute(
            "SELECT cost_nanos FROM jobs WHERE id = ?", (info["job_id"],)
        ).fetchone()
    finally:
        con.close()
    assert {c["attempt_id"] for c in rows} <= with_batch
    assert cost == nanos


@pytest.mark.parametrize("point", ["before_settle", "after_settle", "mid_download"])
async def test_crash_in_collect_charges_each_result_once(tmp_path: Path, point: str) -> None:
    emu, runner = await start_emulator(time_scale=0.01, expire_after_seconds=1.0)
    try:
        cfg = make_config(tmp_path, emu.url, limits={"max_requests_per_batch": 4})
        drop(cfg, "split.jsonl", chat_lines(12, hooks=EXPIRING))
        if point == "before_settle":  # results downloaded and tallied, nothing recorded
            await crash_once(cfg, Store, "settle_attempt", crash_on_call(2, Store.settle_attempt))
        elif point == "after_settle":  # charge and settle committed, the job not moved on
            await crash_once(cfg, collect, "sync_job", crash_on_call(2, collect.sync_job))
        else:  # the third output line of a download: a partial file, a partial tally
            await crash_once(cfg, collect._Sink, "_line", crash_on_line(3))
        # Every piece expired with its marked requests unanswered; those were resubmitted
        # (expiring again) until the attempts ran out: 9 of 12 requests billed.
        check_charged_once(cfg, "split", requests=9)
        assert {b["status"] for b in emu.state.batches()} == {"expired"}
        assert len(emu.state.batches()) == 3 + 2 * 3  # 3 pieces, each tried 3 times
    finally:
        await runner.cleanup()
        emu.state.close()


async def test_sigkill_while_collecting_charges_each_result_once(tmp_path: Path) -> None:
    """A real daemon process SIGKILLed while results download (throttled, padded), again
    and again; then it runs to the end."""
    rng = random.Random(SEED)
    emu, runner = await start_emulator(
        time_scale=0.01,
        expire_after_seconds=1.0,
        output_pad_bytes=60_000,
        bandwidth_bytes_per_s=1_500_000.0,  # an attempt's output: ~0.15 s
    )
    try:
        conf = config_file(
            tmp_path,
            emu.url,
            extra='[limits]\nmax_requests_per_batch = 4\n[intake]\nduplicate_window = "0"\n'
            '[retry]\nmax_attempts_per_piece = 4\n[log]\nformat = "json"\n',
        )
        cfg = config.load(conf)
        drop(cfg, "a.jsonl", chat_lines(12, hooks=EXPIRING))
        drop(cfg, "b.jsonl", chat_lines(8, hooks={2: {"expire": True}}))
        db = cfg.state.database
        cut_short = 0
        for rnd in range(6):
            if rnd == 3:  # from now on follow-ups run in time: later attempts complete
                emu.state.config.expire_after_seconds = None
            log = (tmp_path / f"daemon-{rnd}.log").open("wb")
            proc = await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "batchd", "run", "-c", str(conf)),
                stdout=log,
                stderr=log,
            )
            try:
                ended = await _until_collecting(db, proc, 30)
                if ended is None:
                    break  # every job has ended: nothing left to cut short
                await asyncio.sleep(rng.uniform(0.0, 0.3))
            finally:
                if proc.returncode is None:
                    proc.send_signal(signal.SIGKILL)
                await proc.wait()
                log.close()
            cut_short += not await asyncio.to_thread(_settled, db, ended)
        print(f"\nSIGKILLs that cut a collect short: {cut_short} of {rnd + 1} rounds")
        assert cut_short >= 1, "no kill landed before an ended attempt was settled"
        await run_once(cfg, timeout=60)
        check_charged_once(cfg, "a", requests=12)
        check_charged_once(cfg, "b", requests=8)
    finally:
        await runner.cleanup()
        emu.state.close()


def _query(db: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    if not db.exists():
        return []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute(sql, params).fetchall()
    except sqlite3.OperationalError:  # not migrated yet
        return []
    finally:
        con.close()


def _settled(db: Path, attempt_id: str) -> bool:
    return bool(_query(db, "SELECT 1 FROM attempts WHERE id = ? AND collected = 1", attempt_id))


async def _until_collecting(
    db: Path, proc: asyncio.subprocess.Process, timeout: float
) -> str | None:
    """The id of an attempt whose batch has ended and whose results are being collected;
    None once every job has ended."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        assert proc.returncode is None, "the daemon exited"
        rows = await asyncio.to_thread(
            _query, db, "SELECT id FROM attempts WHERE phase = 'ended' LIMIT 1"
        )
        if rows:
            return str(rows[0][0])
        # One read: two would race with a claim in between (0 live, then 2 jobs).
        counts = await asyncio.to_thread(
            _query, db, "SELECT COUNT(*), COUNT(*) - COUNT(finished_at) FROM jobs"
        )
        if counts and counts[0] == (2, 0):
            return None
        await asyncio.sleep(0.005)
    raise AssertionError("no attempt reached collection")
