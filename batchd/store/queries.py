"""Named SQL: every statement in queries.sql, every migration in migrations/NNNN_*.sql."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from types import MappingProxyType
from typing import Any

_NAME = re.compile(r"^--\s*name:\s*([a-z_0-9]+)(.*)$", re.MULTILINE)
_MIGRATION = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")

Params = dict[str, Any]


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
    text = resources.files("batchd.store").joinpath("queries.sql").read_text("utf-8")
    return MappingProxyType(_parse(text))


def q(name: str) -> str:
    """The SQL of one named statement (KeyError names it)."""
    return queries()[name]


@cache
def hot() -> frozenset[str]:
    """Names of the statements marked `(hot: …)`: run on recurring passes, so they must
    read through an index (tests/test_store.py checks their query plans)."""
    text = resources.files("batchd.store").joinpath("queries.sql").read_text("utf-8")
    return frozenset(m.group(1) for m in _NAME.finditer(text) if "(hot" in m.group(2))


@cache
def migrations() -> tuple[str, ...]:
    """Migration scripts in order; migration i (1-based) brings user_version to i."""
    folder = resources.files("batchd.store").joinpath("migrations")
    found = sorted(
        (int(m.group(1)), f.name)
        for f in folder.iterdir()
        if (m := _MIGRATION.match(f.name)) is not None
    )
    numbers = [n for n, _ in found]
    if numbers != list(range(1, len(found) + 1)):
        raise ValueError(f"migrations must be numbered 0001.. without gaps, got {numbers}")
    return tuple(folder.joinpath(name).read_text("utf-8") for _, name in found)
