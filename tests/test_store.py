"""The store: migrations, transitions with events, cancellation-safe transactions."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from batchd.states import IllegalTransition, JobState
from batchd.store import MIGRATIONS, Store


async def test_migrations_versioned_and_reopen(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    store = await Store.open(db)
    await store.close()
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA user_version").fetchone() == (len(MIGRATIONS),)
    assert con.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    con.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    con.commit()
    con.close()
    with pytest.raises(RuntimeError, match="newer than this batchd"):
        await Store.open(db)


async def test_transition_writes_event_in_same_tx_and_checks_table(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "s.db")
    try:
        await store.create_job("j1", "n", "processing/j1--n.jsonl", "inbox")
        await store.transition("j1", JobState.VALIDATING)
        with pytest.raises(IllegalTransition):
            await store.transition("j1", JobState.DONE)
        events = await store.events("j1")
        assert [(e.old_state, e.new_state) for e in events] == [
            (None, "queued"),
            ("queued", "validating"),
        ]
        assert (await store.job("j1")).state == JobState.VALIDATING
    finally:
        await store.close()


async def test_cancelled_callers_never_leave_a_transaction_open(tmp_path: Path) -> None:
    # Before the fix, cancelling a caller mid-transaction left BEGIN open or made the
    # ROLLBACK of a committed transaction raise "no transaction is active".
    store = await Store.open(tmp_path / "s.db")
    try:
        await store.create_job("j1", "n", "processing/j1--n.jsonl", "inbox")
        for i in range(60):
            task = asyncio.create_task(store.update_job("j1", "tick", {"i": i}, completed=i))
            for _ in range(i % 6):
                await asyncio.sleep(0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await store.update_job("j1", "final", None, completed=999)  # still usable
        assert (await store.job("j1")).completed == 999
    finally:
        await store.close()
    con = sqlite3.connect(tmp_path / "s.db")
    assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    con.close()
