"""The store: migrations, transitions with events, cancellation-safe transactions."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import threading
from pathlib import Path

import pytest

from batchd.states import IllegalTransition, JobState
from batchd.store import Store, migrations
from batchd.store.queries import hot, queries
from batchd.store.sqlite_file import prepare


async def test_migrations_versioned_and_reopen(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    store = await Store.open(db)
    await store.close()
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA user_version").fetchone() == (len(migrations()),)
    assert con.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    con.execute(f"PRAGMA user_version = {len(migrations()) + 1}")
    con.commit()
    con.close()
    with pytest.raises(RuntimeError, match="newer than this batchd"):
        await Store.open(db)


async def test_transition_writes_event_in_same_tx_and_checks_table(
    db_target: Path | str,
) -> None:
    store = await Store.open(db_target)
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


async def test_cancelled_callers_never_leave_a_transaction_open(db_target: Path | str) -> None:
    # Before the fix, cancelling a caller mid-transaction left BEGIN open or made the
    # ROLLBACK of a committed transaction raise "no transaction is active".
    store = await Store.open(db_target)
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
        ticks = [e for e in await store.events("j1") if e.kind == "tick"]
        assert len({e.detail["i"] for e in ticks if e.detail}) == len(ticks)  # none twice
    finally:
        await store.close()
    if not isinstance(db_target, Path):
        return
    con = sqlite3.connect(db_target)
    assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    con.close()


def _plan(con: sqlite3.Connection, sql: str) -> list[str]:
    params = {n: 0 for n in re.findall(r":([a-z_0-9]+)", sql)}
    return [r[3] for r in con.execute(f"EXPLAIN QUERY PLAN {sql}", params)]


def test_no_statement_scans_jobs_attempts_or_events(tmp_path: Path) -> None:
    """Cost follows due work: every statement reads jobs, attempts and events through an
    index; a full index walk is allowed only where a LIMIT stops it (newest first)."""

    async def create() -> None:
        await (await Store.open(tmp_path / "s.db")).close()

    asyncio.run(create())
    con = sqlite3.connect(tmp_path / "s.db")
    partial = {  # an index of only live rows: walking it costs what is in flight
        r[0]
        for r in con.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index'")
        if r[1] and " WHERE " in r[1]
    }
    bad = {}
    for name, sql in queries().items():
        for step in _plan(con, sql):
            table = re.match(r"SCAN (\w+)(?: USING (?:COVERING )?INDEX (\w+))?", step)
            if not table or table.group(1) not in ("jobs", "attempts", "events", "a", "j", "p"):
                continue
            if table.group(2) and ("LIMIT" in sql.upper() or table.group(2) in partial):
                continue
            bad[name] = step
        if name in hot() and "LIMIT" in sql.upper():
            # A LIMIT must stop an index walk, not cut a sorted copy of every candidate.
            sorts = [step for step in _plan(con, sql) if "TEMP B-TREE" in step]
            if sorts:
                bad[name] = sorts[0]
    con.close()
    startup_only = {"settled_jobs", "jobs_missing_attempts"}  # once per start, O(live)
    assert set(bad) <= startup_only, bad
    assert hot() <= set(queries())


def test_migrations_are_numbered_without_gaps() -> None:
    assert len(migrations()) >= 4  # migrations() itself refuses gaps and duplicates


async def test_an_old_database_is_migrated_with_names_kept(tmp_path: Path) -> None:
    """A version-3 database (two jobs that both used the name `nightly`) opens: the
    newer keeps `nightly`, the result dir tells the name the older one got."""
    db = tmp_path / "old.db"
    con = sqlite3.connect(db)
    for script in migrations()[:3]:
        con.executescript(script)
    con.execute("PRAGMA user_version = 3")
    for i, rd in (("01A", "done/nightly"), ("01B", None)):
        con.execute(
            "INSERT INTO jobs (id, name, state, source, input_path, created_at, updated_at,"
            " result_dir) VALUES (?, 'nightly', 'done', 'inbox', 'p', 1, 1, ?)",
            (i, rd),
        )
    con.commit()
    con.close()
    async with Store.connect(db) as store:
        a, b = await store.job("01A"), await store.job("01B")
        assert (b.name, b.stem) == ("nightly", "nightly")
        assert a.name.startswith("nightly~") and a.stem == "nightly"
        assert await store.count_by_state() == {"done": 2}
        assert [j.id for j in await store.find_jobs("nightly")] == ["01B"]


def test_switching_a_new_database_to_wal_waits_for_another_writer(tmp_path: Path) -> None:
    """Before: when another connection began writing to a new file just before batchd
    switched it to WAL (a daemon and a CLI starting together), the switch failed at once
    with "database is locked" (SQLite calls no busy handler there) and the daemon died at
    start-up. The other writer starts at exactly that moment here, from the trace hook."""
    path = tmp_path / "new.db"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn = sqlite3.connect(path, isolation_level=None)
    started: list[bool] = []

    def just_before(sql: str) -> None:
        if "journal_mode = WAL" in sql and not started:
            started.append(True)
            other.execute("BEGIN IMMEDIATE")
            other.execute("CREATE TABLE someone_elses (a)")
            threading.Timer(0.3, other.execute, ["COMMIT"]).start()

    conn.set_trace_callback(just_before)
    prepare(conn)
    conn.set_trace_callback(None)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(migrations())
    conn.close()
    other.close()
