"""The PostgreSQL backend: an asyncpg pool, the same statements and transactions as SQLite.

Statements are the named SQL of queries.sql (`:named` parameters, turned into `$n`
once per statement text) or their PostgreSQL variant in queries.pg.sql. Every
transaction also sends a NOTIFY, so other processes (replicas, a CLI command) notice a
commit as the SQLite backend's `data_version` lets them. A commit is durable when it
returns (synchronous_commit is on), so `durable()` has nothing left to do.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Awaitable, Callable, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any, TypeVar

from batchd.store.backend import redact, unique_message
from batchd.store.queries import Conflict, Duplicate, Params, Stmt, migrations, pg_variant
from batchd.store.rows import RowLike

if TYPE_CHECKING:
    import asyncpg

T = TypeVar("T")
CHANNEL = "batchd_commits"
POOL_SIZE = 10  # submits and downloads in flight, the stages' reads, HTTP handlers
_MIGRATE_LOCK = 0x62617463  # pg_advisory_xact_lock key: one migrator at a time
_RETRIES = 5  # a deadlock or serialization failure: the whole transaction again
_TOKEN = re.compile(r"'(?:[^']|'')*'|\"[^\"]*\"|--[^\n]*|::|:([A-Za-z_][A-Za-z0-9_]*)")


@lru_cache(maxsize=4096)
def convert(sql: str) -> tuple[str, tuple[str, ...]]:
    """PostgreSQL's text of a statement with `$n` for each `:name` (its variant from
    queries.pg.sql when it has one), and the parameter names in `$n` order."""
    names: list[str] = []

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name is None:
            return "" if m.group(0).startswith("--") else m.group(0)
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    return _TOKEN.sub(sub, pg_variant(sql)), tuple(names)


def _args(names: tuple[str, ...], params: Params | None) -> list[Any]:
    p = params or {}
    try:
        return [p[n] for n in names]
    except KeyError as e:
        raise KeyError(f"statement parameter :{e.args[0]} not given") from None


def _rowcount(status: str) -> int:
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


class Session:
    """One open transaction (see PgBackend.atomic): reads and writes inside it."""

    def __init__(self, conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy) -> None:
        self.conn = conn

    async def fetch(self, sql: str, params: Params | None = None) -> list[RowLike]:
        """Rows of one statement (a SELECT, or a write with RETURNING)."""
        text, names = convert(sql)
        return list(await self.conn.fetch(text, *_args(names, params)))

    async def execute(self, st: Stmt) -> int:
        """Run one statement (many, with a list of params); returns the rows changed.
        `Conflict` when a `must_change` statement changed none."""
        text, names = convert(st.sql)
        if isinstance(st.params, list):
            await self.conn.executemany(text, [_args(names, p) for p in st.params])
            return len(st.params)
        n = _rowcount(await self.conn.execute(text, *_args(names, st.params)))
        if st.must_change and n == 0:
            raise Conflict(st.sql.split("\n", 1)[0])
        return n


class PgBackend:
    """Runs statements for the store on a PostgreSQL server (see module doc)."""

    dialect = "postgresql"

    def __init__(self, pool: asyncpg.Pool, url: str) -> None:
        self._pool = pool
        self._url = url
        self.origin = f"{os.getpid()}:{id(self):x}"  # this process's NOTIFY payload
        self._pending: set[asyncio.Task[Any]] = set()
        self._listener: asyncpg.Connection | None = None
        self._version = 0  # commits of other processes seen

    @classmethod
    async def open(cls, url: str, pool_size: int = POOL_SIZE) -> PgBackend:
        """Connect (a pool), bring the schema to the newest version, listen for commits."""
        import asyncpg

        try:
            pool = await asyncpg.create_pool(
                url,
                min_size=1,
                max_size=pool_size,
                statement_cache_size=1024,
                server_settings={"application_name": "batchd"},
            )
        except (OSError, asyncpg.PostgresError) as e:
            raise ConnectionError(f"{redact(url)}: {e}") from None
        backend = cls(pool, url)
        try:
            async with pool.acquire() as conn:
                await _migrate(conn)
            await backend._listen()
        except BaseException:
            await pool.close()
            raise
        return backend

    async def _listen(self) -> None:
        import asyncpg

        def seen(_c: object, _pid: int, _channel: str, payload: object) -> None:
            if payload != self.origin:
                self._version += 1

        conn = await asyncpg.connect(self._url)
        await conn.add_listener(CHANNEL, seen)
        self._listener = conn

    async def close(self) -> None:
        """Finish transactions in flight, then close the pool."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        if self._listener is not None:
            await self._listener.close()
        await self._pool.close()

    def _shielded(self, coro: Awaitable[T]) -> Awaitable[T]:
        task: asyncio.Task[T] = asyncio.ensure_future(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return asyncio.shield(task)

    async def tx(self, statements: Sequence[Stmt], durable: bool = False) -> None:
        """Run statements in one transaction that a cancelled caller cannot cut in half
        (it runs in a task of its own; close() waits for it)."""
        if not statements:
            return
        stmts = list(statements)

        async def run(s: Session) -> None:
            for st in stmts:
                await s.execute(st)

        await self.atomic(run)

    async def atomic(self, fn: Callable[[Session], Awaitable[T]]) -> T:
        """Run `fn` in one transaction (reads and writes, decisions in between), retried
        from the start after a deadlock or a serialization failure; a cancelled caller
        cannot cut it in half. Commits notify the other processes."""
        return await self._shielded(self._atomic(fn))

    async def _atomic(self, fn: Callable[[Session], Awaitable[T]]) -> T:
        import asyncpg

        for attempt in range(_RETRIES):
            try:
                async with self._pool.acquire() as conn, conn.transaction():
                    result = await fn(Session(conn))
                    await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, self.origin)
                    return result
            except asyncpg.UniqueViolationError as e:
                raise Duplicate(unique_message(e.table_name, e.detail)) from None
            except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError):
                if attempt == _RETRIES - 1:
                    raise
                await asyncio.sleep(0.01 * 2**attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    async def fetch(self, sql: str, params: Params | None = None) -> list[RowLike]:
        """Every row of one query, on a pooled connection."""
        text, names = convert(sql)
        return list(await self._pool.fetch(text, *_args(names, params)))

    async def data_version(self) -> int:
        """Changes whenever another process commits (its NOTIFY arrived)."""
        if self._listener is None or self._listener.is_closed():
            # The server went away and came back: reconnect, and count it as a change
            # (commits may have been missed meanwhile).
            try:
                await self._listen()
            except OSError:
                return self._version
            self._version += 1
        return self._version

    async def durable(self) -> None:
        """Nothing to wait for: a commit that returned is on the server's disk."""

    async def vacuum_step(self, pages: int) -> None:
        """Nothing to do: autovacuum hands space back."""


async def _migrate(conn: asyncpg.pool.PoolConnectionProxy) -> None:
    """Bring the schema to the newest version, one transaction per migration; an
    advisory lock makes replicas starting at once apply each migration once."""
    scripts = migrations("postgresql")
    while True:
        async with conn.transaction():
            await conn.execute(f"SELECT pg_advisory_xact_lock({_MIGRATE_LOCK})")
            await conn.execute("CREATE TABLE IF NOT EXISTS batchd_schema (version INTEGER)")
            version = await conn.fetchval("SELECT MAX(version) FROM batchd_schema") or 0
            if version > len(scripts):
                raise RuntimeError(
                    f"database schema version {version} is newer than this batchd "
                    f"({len(scripts)}); refusing to touch it"
                )
            if version == len(scripts):
                return
            await conn.execute(scripts[version])
            await conn.execute("INSERT INTO batchd_schema (version) VALUES ($1)", version + 1)
