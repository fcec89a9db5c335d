"""The SQLite backend: one aiosqlite connection (WAL), transactions in one thread hop."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from batchd.store.queries import Conflict, Duplicate, Params, Stmt
from batchd.store.rows import RowLike
from batchd.store.sqlite_file import prepare


class SqliteBackend:
    """Runs statements for the store; nothing here knows what the tables mean."""

    dialect = "sqlite"

    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self._db = db
        # Reads run on the event loop through a connection of their own: an indexed
        # lookup takes microseconds, a hop to the writer's thread (and back through
        # the GIL) a fraction of a millisecond. WAL lets them read while the writer
        # writes; a read after an awaited write sees it (it is committed).
        self._reader = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._reader.row_factory = sqlite3.Row
        self._reader.execute("PRAGMA busy_timeout = 10000")
        self._reader.execute("PRAGMA query_only = 1")
        self._wal = Path(f"{path}-wal")
        self._lock = asyncio.Lock()
        self._pending: set[asyncio.Task[Any]] = set()
        # Group commit: `durable` callers share fsyncs of the WAL, made off the database
        # thread, so one writer waiting for the disk never holds up the others.
        self._synced = 0  # commits known to be on disk
        self._committed = 0  # commits made so far
        self._syncing: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, path: Path) -> SqliteBackend:
        """Open (creating and migrating if needed) the database at `path`."""
        path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(path, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            await db._execute(prepare, db._conn)  # type: ignore[no-untyped-call]
        except BaseException:
            await db.close()
            raise
        return cls(db, path)

    async def close(self) -> None:
        """Finish transactions in flight, then close the connection."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        self._reader.close()
        await self._db.close()

    async def _sync_wal(self) -> None:
        """fsync the WAL (every commit made before it started is then on disk)."""
        upto = self._committed

        def sync() -> None:
            try:
                fd = os.open(self._wal, os.O_RDONLY)
            except FileNotFoundError:  # checkpointed away: the database file holds it
                return
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

        await asyncio.to_thread(sync)
        self._synced = max(self._synced, upto)

    async def durable(self) -> None:
        """Wait until every commit so far would survive a power cut."""
        mine = self._committed
        while self._synced < mine:
            if self._syncing is None or self._syncing.done():
                self._syncing = asyncio.create_task(self._sync_wal())
                self._pending.add(self._syncing)
                self._syncing.add_done_callback(self._pending.discard)
            await asyncio.shield(self._syncing)

    async def tx(self, statements: Sequence[Stmt], durable: bool = False) -> None:
        """Run statements in one transaction that a cancelled caller cannot cut in half.

        aiosqlite runs each statement in its thread even when the awaiting task is
        cancelled, so a cancellation mid-way would leave a transaction open or roll
        back one already committed; the transaction therefore runs in its own task
        that the caller's cancellation does not reach (close() waits for it).
        """
        task = asyncio.create_task(self._run_tx(list(statements)))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        await asyncio.shield(task)
        if durable:
            await self.durable()

    async def _run_tx(self, statements: list[Stmt]) -> None:
        async with self._lock:
            # The whole transaction is one call into aiosqlite's thread: one hop instead
            # of one per statement.
            await self._db._execute(_tx_in_thread, self._db._conn, statements)  # type: ignore[no-untyped-call]
            self._committed += 1

    async def fetch(self, sql: str, params: Params | None = None) -> list[RowLike]:
        """Every row of one query (on the reading connection, see __init__)."""
        rows: list[RowLike] = self._reader.execute(sql, params or {}).fetchall()
        return rows

    async def data_version(self) -> int:
        """Changes whenever another process (a CLI command) commits: asked of the writing
        connection, for which the daemon's own commits do not count."""
        rows = await self._db.execute_fetchall("PRAGMA data_version")
        return int(next(iter(rows))[0])

    async def vacuum_step(self, pages: int) -> None:
        """Hand up to `pages` free pages back to the file system."""
        async with self._lock:
            await self._db.execute(f"PRAGMA incremental_vacuum({int(pages)})")


def _tx_in_thread(conn: sqlite3.Connection, statements: list[Stmt]) -> None:
    """BEGIN … COMMIT on the connection; runs in aiosqlite's thread."""
    if not statements:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        for st in statements:
            if isinstance(st.params, list):
                cur = conn.executemany(st.sql, st.params)
            else:
                cur = conn.execute(st.sql, st.params)
            if st.must_change and cur.rowcount == 0:
                raise Conflict(st.sql.split("\n", 1)[0])
        conn.execute("COMMIT")
    except BaseException as e:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        if isinstance(e, sqlite3.IntegrityError) and str(e).startswith("UNIQUE"):
            raise Duplicate(str(e)) from None
        raise
