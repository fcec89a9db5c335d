"""SQLite without the event loop: setting a connection up (WAL, migrations), and the
read-only backend of the CLI's read commands (`batchd jobs`, `show`), whose reads never
wait: they run to their end without asyncio or aiosqlite being imported."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

from batchd.store.queries import Params, Stmt, migrations
from batchd.store.rows import RowLike


class SqliteReader:
    """A backend that only reads: one plain connection, every call done before it returns
    (the `async` methods never suspend)."""

    dialect = "sqlite"

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    @classmethod
    def open(cls, path: Path) -> SqliteReader:
        """Open (creating and migrating if needed, as SqliteBackend.open does) the database
        at `path` for reading."""
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            prepare(conn)
            conn.execute("PRAGMA query_only = 1")
        except BaseException:
            conn.close()
            raise
        conn.row_factory = sqlite3.Row
        return cls(conn)

    async def fetch(self, sql: str, params: Params | None = None) -> list[RowLike]:
        """Every row of one query."""
        rows: list[RowLike] = self._conn.execute(sql, params or {}).fetchall()
        return rows

    async def tx(self, statements: Sequence[Stmt], durable: bool = False) -> None:
        """Refused: this backend only reads."""
        raise RuntimeError("this store was opened read-only")

    async def data_version(self) -> int:
        """Changes whenever another process commits."""
        return int(self._conn.execute("PRAGMA data_version").fetchone()[0])

    async def durable(self) -> None:
        """Nothing to wait for: nothing is written."""

    async def vacuum_step(self, pages: int) -> None:
        """Refused: this backend only reads."""
        raise RuntimeError("this store was opened read-only")

    async def close(self) -> None:
        """Close the connection."""
        self._conn.close()


def prepare(conn: sqlite3.Connection) -> None:
    """Set the connection up (WAL, synchronous=NORMAL, foreign keys) and migrate."""
    conn.execute("PRAGMA busy_timeout = 10000")
    # Only takes effect on a new, empty database: retention then hands freed pages back
    # with PRAGMA incremental_vacuum (older files reuse them).
    conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
    # Switching a database to WAL takes an exclusive lock without waiting on the busy
    # handler: a daemon and a CLI opening a new file at once saw "database is locked"
    # (about 1 in 300 races). It is retried, like the busy handler would, for 10 s.
    deadline = time.monotonic() + 10
    delay = 0.005
    while True:
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
        else:
            if mode == "wal":
                break
        time.sleep(delay)
        delay = min(delay * 2, 0.2)
    # WAL with synchronous=NORMAL: a commit is safe from a crash of the process (it is
    # in the OS), not from a power cut until the next fsync. A commit that must outlive
    # a power cut before batchd acts on the world (the record that a create is being
    # sent) asks for `durable`: an fsync of the WAL (shared by whoever waits for one),
    # which makes every earlier commit durable too.
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA foreign_keys = ON")
    _migrate(conn)


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring the schema to the newest version, one transaction per migration. The
    version is read inside each transaction: two processes opening a new database at
    once (a daemon and a CLI) never both apply a migration."""
    scripts = migrations()
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version > len(scripts):
                raise RuntimeError(
                    f"database schema version {version} is newer than this batchd "
                    f"({len(scripts)}); refusing to touch it"
                )
            if version == len(scripts):
                conn.execute("COMMIT")
                return
            for stmt in _statements(scripts[version]):
                conn.execute(stmt)
            conn.execute(f"PRAGMA user_version = {version + 1}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise


def _statements(script: str) -> list[str]:
    """A script's statements, split where SQLite says one is complete (a trigger body
    holds several `;`)."""
    out, buf = [], ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip().strip(";").strip():
                out.append(buf)
            buf = ""
    if buf.strip():
        out.append(buf)
    return out
