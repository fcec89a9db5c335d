"""Many jobs from a few genuine ones: a real daemon's rows, cloned with SQL.

The database given holds a few template jobs that a real daemon wrote. `clone` adds
n jobs, each a copy of one template's rows in every table, where

- every id-like token is rewritten: ULIDs (a new time and a counter, so they stay
  unique and sort by time), API ids (`batch_<hex>`, `file-<hex>`), the job's NAME,
  and a value of a UNIQUE column that holds none of these;
- every time column is shifted (a numeric column whose template values are all Unix
  times of the past week), spreading the clones over `span` seconds before `end`;
- every other value is copied verbatim.

Only `jobs(id, name)` is named here (to find the templates); which rows belong to a
job is found by following its tokens through every table. A column or a table the
schema gains later is cloned without edits to this module.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ULID_RE = re.compile(r"\b[0-9A-HJKMNP-TV-Z]{26}\b")
API_ID_RE = re.compile(r"\b[a-z][a-z0-9]*[_-][0-9a-f]{16,}\b")
_HEX_RE = re.compile(r"([a-z][a-z0-9]*[_-])?([0-9a-f]{16,})")
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_MAX_SLOTS = 256  # tokens per template job; slot numbers are mixed into new ids
_TIME_WINDOW = (-7 * 86400.0, 86400.0)  # "a Unix time": within a week before / a day after now
WORDS = (
    "invoices",
    "tickets",
    "reviews",
    "contracts",
    "translations",
    "summaries",
    "eval",
    "nightly",
    "embeddings",
    "support",
    "catalogue",
    "transcripts",
)


@dataclass
class _Table:
    name: str
    cols: list[str]
    insert: list[str]  # the columns given values (an INTEGER PRIMARY KEY is SQLite's)
    unique: set[str]  # columns that are on their own a primary key or UNIQUE
    has_rowid: bool
    referenced: bool = False  # another table's foreign key points at it


@dataclass
class Template:
    """One genuine job: its id, its tokens (slot order) and its rows per table."""

    job_id: str
    name: str
    tokens: list[str] = field(default_factory=list)
    rows: dict[str, list[tuple[Any, ...]]] = field(default_factory=dict)
    rowids: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class CloneReport:
    """What `clone` added."""

    jobs: int
    rows: dict[str, int]
    seconds: float
    templates: list[Template]
    time_columns: dict[str, list[str]]


def name_of(i: int) -> str:
    """The NAME clone i gets (as the SQL in _new_token_sql spells it)."""
    return f"{WORDS[i % len(WORDS)]}-{i:07d}"


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _lit(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _tables(con: sqlite3.Connection) -> list[_Table]:
    out = []
    for name, sql in con.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        " ORDER BY name"
    ):
        # table_info leaves out generated columns: they are derived, never copied
        info = con.execute(f"PRAGMA table_info({_q(name)})").fetchall()
        cols = [r[1] for r in info]
        pk = [r for r in info if r[5]]
        without_rowid = "WITHOUT ROWID" in (sql or "").upper()
        alias = len(pk) == 1 and str(pk[0][2]).upper() == "INTEGER" and not without_rowid
        unique = {r[1] for r in pk} if len(pk) == 1 else set()
        for idx in con.execute(f"PRAGMA index_list({_q(name)})").fetchall():
            cols_of = [r[2] for r in con.execute(f"PRAGMA index_info({_q(idx[1])})")]
            if idx[2] and len(cols_of) == 1:  # unique on its own (with more columns, the
                unique |= set(cols_of)  # others, e.g. a job id, already differ per clone)
        insert = [c for c in cols if not (alias and c == pk[0][1])]
        out.append(_Table(name, cols, insert, unique, not without_rowid))
    for t in out:
        for fk in con.execute(f"PRAGMA foreign_key_list({_q(t.name)})").fetchall():
            for other in out:
                other.referenced |= other.name == fk[2] and other.name != t.name
    return out


def _tokens_of(table: _Table, row: tuple[Any, ...], known: list[str]) -> list[str]:
    """Id-like tokens in a row's text; a UNIQUE value holding none is a token itself."""
    found: list[str] = []
    for col, v in zip(table.cols, row, strict=True):
        if isinstance(v, str):
            ids = ULID_RE.findall(v) + API_ID_RE.findall(v)
            found += ids
            if col in table.unique and not ids and not any(k in v for k in known):
                found.append(v)
    return found


def _follow(
    tables: list[_Table],
    rows: Mapping[str, list[tuple[Any, ...]]],
    seeds: list[str],
    shared: set[str],
) -> tuple[list[str], set[tuple[str, int]]]:
    """Tokens reachable from `seeds` (a row holding one lends all of its own), and the rows
    holding any of them. Tokens in `shared` are neither followed nor returned."""
    tokens = list(seeds)
    owned: set[tuple[str, int]] = set()
    changed = True
    while changed:
        changed = False
        for t in tables:
            for k, row in enumerate(rows[t.name]):
                if (t.name, k) in owned:
                    continue
                texts = [v for v in row if isinstance(v, str)]
                if not any(tok in v for v in texts for tok in tokens):
                    continue
                owned.add((t.name, k))
                changed = True
                for tok in _tokens_of(t, row, tokens):
                    if tok not in tokens and tok not in shared:
                        tokens.append(tok)
    return tokens, owned


def templates(con: sqlite3.Connection, tables: list[_Table] | None = None) -> list[Template]:
    """The jobs in the database with their tokens and rows (a token found under two
    jobs, e.g. a daemon-wide id, is left as it is)."""
    tables = tables or _tables(con)
    raw = {
        t.name: con.execute(
            f"SELECT {'rowid' if t.has_rowid else 'NULL'}, {', '.join(map(_q, t.cols))}"
            f" FROM {_q(t.name)}"
        ).fetchall()
        for t in tables
    }
    rows = {name: [r[1:] for r in rs] for name, rs in raw.items()}
    jobs = con.execute("SELECT id, name FROM jobs ORDER BY rowid").fetchall()
    for jid, name in jobs:
        if name is not None and len(name) < 8:  # it is rewritten wherever it appears
            raise ValueError(f"template job {jid}: NAME {name!r} is too short to be distinct")
    seeds = [[jid, name] if name else [jid] for jid, name in jobs]
    first = [_follow(tables, rows, s, set())[0] for s in seeds]
    seen: dict[str, int] = {}
    for toks in first:
        for tok in toks:
            seen[tok] = seen.get(tok, 0) + 1
    shared = {tok for tok, k in seen.items() if k > 1}
    out: list[Template] = []
    owner: dict[tuple[str, int], str] = {}
    for (jid, name), s in zip(jobs, seeds, strict=True):
        if shared & set(s):
            raise ValueError(f"template job {jid}: its id or NAME {name!r} appears in another")
        tokens, owned = _follow(tables, rows, s, shared)
        if len(tokens) > _MAX_SLOTS:
            raise ValueError(f"template job {jid} has {len(tokens)} tokens (> {_MAX_SLOTS})")
        for key in owned:
            if owner.setdefault(key, jid) != jid:
                raise ValueError(f"a row of {key[0]} belongs to jobs {owner[key]} and {jid}")
        tpl = Template(jid, name or "", tokens)
        for t in tables:
            mine = [k for k in range(len(rows[t.name])) if (t.name, k) in owned]
            tpl.rows[t.name] = [rows[t.name][k] for k in mine]
            tpl.rowids[t.name] = [raw[t.name][k][0] for k in mine]
        out.append(tpl)
    return out


def _time_columns(tables: list[_Table], tpls: list[Template], now: float) -> dict[str, list[str]]:
    lo, hi = now + _TIME_WINDOW[0], now + _TIME_WINDOW[1]
    out: dict[str, list[str]] = {}
    for t in tables:
        for k, col in enumerate(t.cols):
            if col not in t.insert:
                continue
            vals = [r[k] for tpl in tpls for r in tpl.rows[t.name] if r[k] is not None]
            nums = [v for v in vals if isinstance(v, int | float) and not isinstance(v, bool)]
            if vals and len(nums) == len(vals) and all(lo <= v <= hi for v in nums):
                out.setdefault(t.name, []).append(col)
    return out


def _ulid_sql(ms: str, rand: str) -> str:
    """A ULID from an integer millisecond expression and 16 Crockford characters."""
    parts = [f"substr('{_CROCKFORD}', (({ms}) >> {5 * (9 - k)}) % 32 + 1, 1)" for k in range(10)]
    return " || ".join(parts) + f" || {rand}"


def _new_token_sql(tok: str, slot: int, name: str) -> str:
    """SQL for clone `s.i`'s replacement of `tok` (same shape, unique per clone and slot)."""
    serial = f"(s.i * {_MAX_SLOTS} + {slot})"
    if tok == name:
        words = " ".join(f"WHEN {k} THEN {_lit(w)}" for k, w in enumerate(WORDS))
        return f"(CASE s.i % {len(WORDS)} {words} END) || '-' || printf('%07d', s.i)"
    if ULID_RE.fullmatch(tok):
        ms = 0
        for ch in tok[:10]:
            ms = ms * 32 + _CROCKFORD.index(ch)
        return _ulid_sql(f"{ms} + s.sms", f"printf('%016X', {serial})")
    m = _HEX_RE.fullmatch(tok)
    if m:
        return f"{_lit(m.group(1) or '')} || printf('%0{len(m.group(2))}x', {serial})"
    return f"{_lit(tok)} || '-' || s.i"


def clone(
    db: Path,
    n: int,
    *,
    end: float,
    span: float,
    pattern: Sequence[str] | None = None,
    fixed: Mapping[str, Sequence[str]] | None = None,
) -> CloneReport:
    """Add n clones of the template jobs in `db` (in place): clone i copies the template
    NAMEd pattern[i % len(pattern)] (default: each in turn), its times shifted into
    [end - span, end) in order of i, its NAME `name_of(i)`. `fixed` maps a token prefix
    (e.g. "batch_") to the values to use, in order, instead of generated ones (e.g. the
    ids of batches that exist). The templates stay, as the newest jobs."""
    t_start = time.perf_counter()
    con = sqlite3.connect(db, isolation_level=None)
    try:
        con.execute("PRAGMA journal_mode = DELETE")
        con.execute("PRAGMA journal_mode = OFF")  # a failed build is thrown away
        con.execute("PRAGMA synchronous = OFF")
        con.execute("PRAGMA cache_size = -262144")
        con.execute("PRAGMA foreign_keys = OFF")
        tables = _tables(con)
        tpls = templates(con, tables)
        if not tpls:
            raise ValueError(f"{db}: no template jobs")
        index = {t.name: j for j, t in enumerate(tpls)}
        order = [index[name] for name in pattern] if pattern else list(range(len(tpls)))
        times = _time_columns(tables, tpls, time.time())
        base = min(
            (
                r[t.cols.index(c)]
                for t in tables
                for c in times.get(t.name, [])
                for tpl in tpls
                for r in tpl.rows[t.name]
                if r[t.cols.index(c)] is not None
            ),
            default=end,
        )
        slots = max(len(t.tokens) for t in tpls)
        con.execute("BEGIN")
        _fill_map(con, tpls, order, n, slots, end - span, span, base, fixed or {})
        added = {t.name: _copy_rows(con, t, tpls, times.get(t.name, [])) for t in tables}
        for t in tables:
            _move_last(con, t, tpls)
            con.execute(f"DROP TABLE temp.{_q('src_' + t.name)}")
        con.execute("DROP TABLE temp.m")
        con.execute("COMMIT")
        con.execute("PRAGMA journal_mode = WAL")
    finally:
        con.close()
    return CloneReport(n, added, time.perf_counter() - t_start, tpls, times)


def _fill_map(
    con: sqlite3.Connection,
    tpls: list[Template],
    order: list[int],
    n: int,
    slots: int,
    start: float,
    span: float,
    base: float,
    fixed: Mapping[str, Sequence[str]],
) -> None:
    """temp.m: one row per clone (i, template, time shift, new value of each token slot)."""
    vcols = ", ".join(f"v{k} TEXT" for k in range(slots))
    con.execute(f"CREATE TEMP TABLE m (i INTEGER PRIMARY KEY, tpl INTEGER, shift REAL, {vcols})")
    con.execute("CREATE TEMP TABLE fx (i INTEGER, slot INTEGER, val TEXT, PRIMARY KEY (i, slot))")
    given = {prefix: iter(values) for prefix, values in fixed.items()}
    fx: list[tuple[int, int, str]] = []
    for i in range(n) if given else ():
        for slot, tok in enumerate(tpls[order[i % len(order)]].tokens):
            for prefix, values in given.items():
                if tok.startswith(prefix):
                    val = next(values, None)
                    if val is None:
                        raise ValueError(f"fixed[{prefix!r}]: too few values for {n} clones")
                    fx.append((i, slot, val))
    con.executemany("INSERT INTO fx VALUES (?, ?, ?)", fx)
    for j, tpl in enumerate(tpls):
        where = [k for k, t in enumerate(order) if t == j]
        if not where:
            continue
        exprs = []
        for slot, tok in enumerate(tpl.tokens):
            if any(tok.startswith(p) for p in fixed):
                exprs.append(f"(SELECT val FROM fx WHERE fx.i = s.i AND fx.slot = {slot})")
            else:
                exprs.append(_new_token_sql(tok, slot, tpl.name))
        cols = ", ".join(f"v{k}" for k in range(len(exprs)))
        shift = f"{start} + {span} * value / {n}.0 - {base}"
        con.execute(
            f"WITH RECURSIVE c(value) AS (SELECT 0 UNION ALL SELECT value + 1 FROM c"
            f" WHERE value + 1 < {n}),"
            f" s AS MATERIALIZED (SELECT value AS i, {shift} AS shift,"
            f" CAST(round(({shift}) * 1000) AS INTEGER) AS sms FROM c"
            f" WHERE value % {len(order)} IN ({', '.join(map(str, where))}))"
            f" INSERT INTO temp.m (i, tpl, shift{', ' if exprs else ''}{cols})"
            f" SELECT i, {j}, shift{', ' if exprs else ''}{', '.join(exprs)} FROM s"
        )


def _copy_rows(con: sqlite3.Connection, t: _Table, tpls: list[Template], times: list[str]) -> int:
    """INSERT … SELECT every clone's copy of this table's template rows; returns the count."""
    src = _q("src_" + t.name)
    marker = "bench_tpl_"
    con.execute(
        f"CREATE TEMP TABLE {src} AS SELECT 0 AS {marker}, {', '.join(map(_q, t.cols))}"
        f" FROM main.{_q(t.name)} WHERE 0"
    )
    ph = ", ".join("?" * (len(t.cols) + 1))
    con.executemany(
        f"INSERT INTO temp.{src} VALUES ({ph})",
        [(j, *r) for j, tpl in enumerate(tpls) for r in tpl.rows[t.name]],
    )
    if not any(tpl.rows[t.name] for tpl in tpls):
        return 0
    con.execute(f"CREATE INDEX temp.{_q('i_src_' + t.name)} ON {src} ({marker})")
    exprs = []
    for col in t.insert:
        k = t.cols.index(col)
        c = f"s.{_q(col)}"
        if col in times:
            exprs.append(f"{c} + m.shift")
            continue
        cases = []
        for j, tpl in enumerate(tpls):
            vals = [r[k] for r in tpl.rows[t.name] if isinstance(r[k], str)]
            used = [
                (slot, tok) for slot, tok in enumerate(tpl.tokens) if any(tok in v for v in vals)
            ]
            if not used:
                continue
            exact = {tok: slot for slot, tok in used}
            if all(v in exact for v in vals):  # an id column: look up, don't search
                whens = " ".join(f"WHEN {_lit(tok)} THEN m.v{slot}" for tok, slot in exact.items())
                expr = f"CASE {c} {whens} ELSE {c} END"
            else:
                expr = c
                for slot, tok in sorted(used, key=lambda st: -len(st[1])):  # longest first
                    expr = f"replace({expr}, {_lit(tok)}, m.v{slot})"
            cases.append(f"WHEN {j} THEN {expr}")
        exprs.append(f"CASE m.tpl {' '.join(cases)} ELSE {c} END" if cases else c)
    cur = con.execute(
        f"INSERT INTO main.{_q(t.name)} ({', '.join(map(_q, t.insert))})"
        f" SELECT {', '.join(exprs)} FROM temp.m AS m CROSS JOIN temp.{src} AS s"
        f" ON s.{marker} = m.tpl ORDER BY m.i, s.rowid"
    )
    return int(cur.rowcount)


def _move_last(con: sqlite3.Connection, t: _Table, tpls: list[Template]) -> None:
    """Re-insert the template rows after the clones, so rowids and INTEGER PRIMARY KEYs
    (e.g. event ids) keep following time: the templates are the newest jobs. Skipped
    where another table's foreign key could point at a renumbered row."""
    rowids = [r for tpl in tpls for r in tpl.rowids[t.name]]
    renumbered = len(t.insert) < len(t.cols)  # an INTEGER PRIMARY KEY gets new values
    if not rowids or not t.has_rowid or (renumbered and t.referenced):
        return
    src = _q("src_" + t.name)
    for k in range(0, len(rowids), 500):
        chunk = rowids[k : k + 500]
        con.execute(
            f"DELETE FROM main.{_q(t.name)} WHERE rowid IN ({', '.join('?' * len(chunk))})", chunk
        )
    cols = ", ".join(map(_q, t.insert))
    con.execute(
        f"INSERT INTO main.{_q(t.name)} ({cols}) SELECT {cols} FROM temp.{src} ORDER BY rowid"
    )
