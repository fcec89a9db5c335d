"""Named SQL: every statement in queries.sql, every migration in migrations/NNNN_*.sql."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import MappingProxyType
from typing import Any

_NAME = re.compile(r"^--\s*name:\s*([a-z_0-9]+)(.*)$", re.MULTILINE)
_MIGRATION = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")

Params = dict[str, Any]
# The SQL files sit next to this module (read as files: importlib.resources costs the
# CLI's start-up more than it reads).
_HERE = Path(__file__).parent


@dataclass(frozen=True)
class Stmt:
    """One statement of a transaction: params, or a list of params (executemany).

    With `must_change`, a statement that changes no row aborts (rolls back) the whole
    transaction with `Conflict`: how a read-check-write stays correct across processes.
    """

    sql: str
    params: Params | list[Params]
    must_change: bool = False


class Conflict(Exception):
    """A guarded statement changed no row: someone else moved first."""


class Duplicate(Exception):
    """A unique key was taken (by another process, or a retry). Whatever the backend, the
    message names the columns SQLite's way: `UNIQUE constraint failed: jobs.name`."""


def _parse(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    marks = list(_NAME.finditer(text))
    for m, nxt in zip(marks, [*marks[1:], None], strict=True):
        body = text[m.end() : nxt.start() if nxt else len(text)]
        lines = [ln for ln in body.splitlines()[1:] if not ln.lstrip().startswith("--")]
        sql = "\n".join(lines).strip().rstrip(";").strip()
        if m.group(1) in out:
            raise ValueError(f"queries.sql: {m.group(1)} defined twice")
        out[m.group(1)] = sql
    return out


@cache
def queries() -> MappingProxyType[str, str]:
    """Every named statement of queries.sql."""
    text = (_HERE / "queries.sql").read_text("utf-8")
    return MappingProxyType(_parse(text))


def q(name: str) -> str:
    """The SQL of one named statement (KeyError names it)."""
    return queries()[name]


@cache
def hot() -> frozenset[str]:
    """Names of the statements marked `(hot: …)`: run on recurring passes, so they must
    read through an index (tests/test_store.py checks their query plans)."""
    text = (_HERE / "queries.sql").read_text("utf-8")
    return frozenset(m.group(1) for m in _NAME.finditer(text) if "(hot" in m.group(2))


@cache
def pg_queries() -> MappingProxyType[str, str]:
    """queries.pg.sql: PostgreSQL's text of a statement of queries.sql where the dialects
    differ (same name), and the statements only PostgreSQL runs (leases, claims)."""
    text = (_HERE / "queries.pg.sql").read_text("utf-8")
    return MappingProxyType(_parse(text))


@cache
def _pg_by_text() -> dict[str, str]:
    common = queries()
    return {common[name]: sql for name, sql in pg_queries().items() if name in common}


def pg_variant(sql: str) -> str:
    """PostgreSQL's text of a statement: its queries.pg.sql variant when `sql` is a named
    statement that has one, else `sql` itself (the dialects agree)."""
    return _pg_by_text().get(sql, sql)


def migration_files(dialect: str = "sqlite") -> list[str]:
    """File names of the migrations in order (sqlite: migrations/; postgresql:
    migrations/postgresql/), checked to be numbered 0001.. without gaps."""
    folder = _HERE / "migrations"
    if dialect != "sqlite":
        folder = folder / dialect
    found = sorted(
        (int(m.group(1)), f.name)
        for f in folder.iterdir()
        if (m := _MIGRATION.match(f.name)) is not None
    )
    numbers = [n for n, _ in found]
    if numbers != list(range(1, len(found) + 1)):
        raise ValueError(f"migrations must be numbered 0001.. without gaps, got {numbers}")
    return [name for _, name in found]


@cache
def migrations(dialect: str = "sqlite") -> tuple[str, ...]:
    """Migration scripts in order; migration i (1-based) brings the schema to version i.
    PostgreSQL's (migrations/postgresql/) are numbered as SQLite's, one for one."""
    folder = _HERE / "migrations"
    if dialect != "sqlite":
        folder = folder / dialect
    return tuple((folder / name).read_text("utf-8") for name in migration_files(dialect))
