"""The seam between the store and a database engine: what a backend does.

The store (facade.py) decides what to read and write, in domain words, and hands a
backend named SQL with `:named` parameters: reads through `fetch`, writes as one
transaction of `Stmt`s through `tx`. SQLite (sqlite.py) is the default; PostgreSQL
(postgres.py) is for several replicas sharing one database.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from batchd.store.queries import Params, Stmt
from batchd.store.rows import RowLike


class Backend(Protocol):
    """Runs the store's statements; knows nothing of what the tables mean."""

    dialect: str  # "sqlite" | "postgresql"

    async def tx(self, statements: Sequence[Stmt], durable: bool = False) -> None:
        """Run statements in one transaction that a cancelled caller cannot cut in half;
        `Conflict` when a `must_change` statement changed nothing, `Duplicate` when a
        unique key was taken. `durable`: on disk before this returns."""
        ...

    async def fetch(self, sql: str, params: Params | None = None) -> list[RowLike]:
        """Every row of one query (rows answer `row[0]` and `row["column"]`)."""
        ...

    async def data_version(self) -> int:
        """A number that changes whenever another process commits."""
        ...

    async def durable(self) -> None:
        """Wait until every commit so far would survive a power cut."""
        ...

    async def vacuum_step(self, pages: int) -> None:
        """Hand some free space back to the file system (where the engine needs telling)."""
        ...

    async def close(self) -> None:
        """Finish transactions in flight, then close."""
        ...


def is_url(target: object) -> bool:
    """True when a [state] database value names a PostgreSQL server, not a SQLite file."""
    return isinstance(target, str) and target.startswith(("postgresql://", "postgres://"))


def redact(url: str) -> str:
    """A database URL fit for a log line or a message (any password replaced)."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in creds:
        return url
    return f"{scheme}://{creds.partition(':')[0]}:***@{host}"


def unique_message(table: str | None, detail: str | None) -> str:
    """SQLite's wording of a unique-key failure from PostgreSQL's table and detail
    (`Key (tenant, idempotency_key)=(…) already exists.`); the values are left out."""
    cols: list[str] = []
    if detail and detail.startswith("Key (") and ")=" in detail:
        cols = [c.strip() for c in detail[5 : detail.index(")=")].split(",")]
    return "UNIQUE constraint failed: " + ", ".join(f"{table}.{c}" for c in cols or ["?"])
