"""The store: one SQLite database (WAL) holding jobs, attempts and their event history.

Nothing else in batchd writes SQL. Every job state change and its event row are
written in one transaction; migrations are ordered and tracked by PRAGMA user_version.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import aiosqlite
import orjson

from batchd.states import (
    TERMINAL_BATCH_STATUSES,
    TERMINAL_JOB_STATES,
    JobState,
    check_transition,
)

Clock = Callable[[], float]

MIGRATIONS: Sequence[str] = (
    # 1: jobs, attempts, events
    """
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        state TEXT NOT NULL,
        source TEXT NOT NULL,
        input_path TEXT NOT NULL,
        sha256 TEXT,
        endpoint TEXT,
        model TEXT,
        requests INTEGER,
        bytes INTEGER,
        est_tokens INTEGER,
        completed INTEGER NOT NULL DEFAULT 0,
        failed INTEGER NOT NULL DEFAULT 0,
        usage TEXT,
        reason TEXT,
        result_dir TEXT,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        finished_at REAL
    );
    CREATE INDEX jobs_state ON jobs(state);
    CREATE TABLE attempts (
        id TEXT PRIMARY KEY,
        job_id TEXT NOT NULL REFERENCES jobs(id),
        piece INTEGER NOT NULL,
        input_path TEXT NOT NULL,
        file_id TEXT,
        batch_id TEXT UNIQUE,
        create_sent_at REAL,
        status TEXT,
        batch TEXT,
        collected INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX attempts_job ON attempts(job_id);
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id TEXT NOT NULL,
        at REAL NOT NULL,
        kind TEXT NOT NULL,
        old_state TEXT,
        new_state TEXT,
        detail TEXT
    );
    CREATE INDEX events_job ON events(job_id, id);
    """,
    # 2: pieces, per-attempt admission data, learned per-model token limits
    """
    CREATE TABLE pieces (
        job_id TEXT NOT NULL REFERENCES jobs(id),
        idx INTEGER NOT NULL,
        input_path TEXT NOT NULL,
        requests INTEGER NOT NULL,
        bytes INTEGER NOT NULL,
        est_tokens INTEGER NOT NULL,
        done INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (job_id, idx)
    );
    ALTER TABLE attempts ADD COLUMN model TEXT;
    ALTER TABLE attempts ADD COLUMN requests INTEGER;
    ALTER TABLE attempts ADD COLUMN est_tokens INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE attempts ADD COLUMN not_before REAL NOT NULL DEFAULT 0;
    ALTER TABLE attempts ADD COLUMN abandoned INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE attempts ADD COLUMN outcome TEXT;
    CREATE TABLE model_limits (
        model TEXT PRIMARY KEY,
        token_limit INTEGER NOT NULL,
        learned_at REAL NOT NULL
    );
    """,  # 3: an upload's start is recorded so a file whose id was never seen can be found
    "ALTER TABLE attempts ADD COLUMN upload_started_at REAL",
)


@dataclass(frozen=True)
class Job:
    """One input file as the user dropped it."""

    id: str
    name: str
    state: JobState
    source: str
    input_path: str
    sha256: str | None
    endpoint: str | None
    model: str | None
    requests: int | None
    bytes: int | None
    est_tokens: int | None
    completed: int
    failed: int
    usage: dict[str, Any] | None
    reason: dict[str, Any] | None
    result_dir: str | None
    cancel_requested: bool
    created_at: float
    updated_at: float
    finished_at: float | None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Attempt:
    """One remote batch created (or being created) for a piece of a job."""

    id: str
    job_id: str
    piece: int
    input_path: str
    file_id: str | None
    batch_id: str | None
    create_sent_at: float | None
    status: str | None
    batch: dict[str, Any] | None
    collected: bool
    created_at: float
    updated_at: float
    model: str | None = None
    requests: int | None = None
    est_tokens: int = 0
    not_before: float = 0.0
    abandoned: bool = False
    outcome: str | None = None  # after collection: "done", "resubmit", "requeue", "failed"
    upload_started_at: float | None = None

    @property
    def open(self) -> bool:
        """Still needs work: not yet collected and not given up."""
        return not self.collected and not self.abandoned

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Piece:
    """The part of a job that fits one batch."""

    job_id: str
    idx: int
    input_path: str
    requests: int
    bytes: int
    est_tokens: int
    done: bool


@dataclass(frozen=True)
class Event:
    """One row of a job's append-only history."""

    id: int
    job_id: str
    at: float
    kind: str
    old_state: str | None
    new_state: str | None
    detail: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


_Params = Sequence[Any] | Mapping[str, Any]
_ENDED = ", ".join(f"'{s.value}'" for s in sorted(TERMINAL_JOB_STATES))  # for SQL IN (...)
_JSON_COLS = {"usage", "reason", "batch", "detail"}
_BOOL_COLS = {"cancel_requested", "collected", "abandoned", "done"}


def _load(row: aiosqlite.Row) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in row.keys():
        v = row[k]
        if k in _JSON_COLS and v is not None:
            v = orjson.loads(v)
        elif k in _BOOL_COLS:
            v = bool(v)
        out[k] = v
    return out


def _job(row: aiosqlite.Row) -> Job:
    d = _load(row)
    d["state"] = JobState(d["state"])
    return Job(**d)


def _dump(values: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: (orjson.dumps(v).decode() if k in _JSON_COLS and v is not None else v)
        for k, v in values.items()
    }


_JOB_COLS = {f.name for f in fields(Job)} - {"id", "created_at"}
_ATTEMPT_COLS = {f.name for f in fields(Attempt)} - {"id", "job_id", "created_at"}


class Store:
    """Async access to the database; one connection, transactions serialised by a lock."""

    def __init__(self, db: aiosqlite.Connection, clock: Clock) -> None:
        self._db = db
        self._clock = clock
        self._lock = asyncio.Lock()
        self._pending: set[asyncio.Task[None]] = set()
        self._transitions = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path, clock: Clock = time.time) -> Store:
        """Open (creating and migrating if needed) the database at `path`."""
        path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(path, isolation_level=None)
        db.row_factory = aiosqlite.Row
        try:
            await db.execute("PRAGMA busy_timeout = 10000")
            await db.execute("PRAGMA journal_mode = WAL")
            await db.execute("PRAGMA synchronous = FULL")
            await db.execute("PRAGMA foreign_keys = ON")
            await cls._migrate(db)
        except BaseException:
            await db.close()
            raise
        return cls(db, clock)

    @staticmethod
    async def _migrate(db: aiosqlite.Connection) -> None:
        async with db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        version = int(row[0]) if row else 0
        if version > len(MIGRATIONS):
            raise RuntimeError(
                f"database schema version {version} is newer than this batchd "
                f"({len(MIGRATIONS)}); refusing to touch it"
            )
        for i, script in enumerate(MIGRATIONS[version:], start=version + 1):
            await db.execute("BEGIN IMMEDIATE")
            try:
                for stmt in filter(str.strip, script.split(";")):
                    await db.execute(stmt)
                await db.execute(f"PRAGMA user_version = {i}")
                await db.execute("COMMIT")
            except BaseException:
                await db.execute("ROLLBACK")
                raise

    async def close(self) -> None:
        """Finish transactions in flight, then close the connection."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        await self._db.close()

    async def _tx(self, statements: Iterable[tuple[str, _Params]]) -> None:
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

    async def _run_tx(self, statements: list[tuple[str, _Params]]) -> None:
        async with self._lock:
            # The whole transaction is one call into aiosqlite's thread: one hop instead
            # of one per statement (a job takes ~10 transactions on its way to a batch).
            await self._db._execute(self._tx_in_thread, statements)  # type: ignore[no-untyped-call]

    def _tx_in_thread(self, statements: list[tuple[str, _Params]]) -> None:
        """BEGIN … COMMIT on the connection; runs in aiosqlite's thread."""
        conn = self._db._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            for sql, params in statements:
                conn.execute(sql, params)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    async def _all(self, sql: str, params: _Params = ()) -> list[aiosqlite.Row]:
        """Every row of one query, in one hop to aiosqlite's thread (not three)."""
        return list(await self._db.execute_fetchall(sql, params))

    @staticmethod
    def _event(
        job_id: str,
        at: float,
        kind: str,
        old: str | None,
        new: str | None,
        detail: Mapping[str, Any] | None,
    ) -> tuple[str, Sequence[Any]]:
        return (
            "INSERT INTO events (job_id, at, kind, old_state, new_state, detail)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (job_id, at, kind, old, new, orjson.dumps(detail).decode() if detail else None),
        )

    # --- jobs -------------------------------------------------------------------------

    async def create_job(self, job_id: str, name: str, input_path: str, source: str) -> Job:
        """Insert a queued job and its `claimed` event."""
        now = self._clock()
        await self._tx(
            [
                (
                    "INSERT INTO jobs (id, name, state, source, input_path, created_at,"
                    " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (job_id, name, JobState.QUEUED.value, source, input_path, now, now),
                ),
                self._event(job_id, now, "claimed", None, JobState.QUEUED, {"source": source}),
            ]
        )
        return await self.job(job_id)

    async def job(self, job_id: str) -> Job:
        """The job with this exact id (KeyError when absent)."""
        rows = await self._all("SELECT * FROM jobs WHERE id = ?", (job_id,))
        row = rows[0] if rows else None
        if row is None:
            raise KeyError(job_id)
        return _job(row)

    async def find_jobs(self, ref: str) -> list[Job]:
        """Jobs matching an id, a unique id prefix, or a NAME (newest first)."""
        rows = await self._all(
            "SELECT * FROM jobs WHERE id = ? OR id LIKE ? OR name = ? OR result_dir IN (?, ?)"
            " ORDER BY created_at DESC",
            (ref, ref.replace("%", "") + "%", ref, f"done/{ref}", f"failed/{ref}"),
        )
        jobs = [_job(r) for r in rows]
        exact = [j for j in jobs if j.id == ref]
        return exact or jobs

    async def jobs(
        self, states: Iterable[JobState] | None = None, since: float | None = None
    ) -> list[Job]:
        """Jobs, oldest first, optionally filtered by state and creation time."""
        sql, params = "SELECT * FROM jobs WHERE 1=1", list[Any]()
        if states is not None:
            st = [s.value for s in states]
            sql += f" AND state IN ({','.join('?' * len(st))})"
            params += st
        if since is not None:
            sql += " AND created_at >= ?"
            params.append(since)
        rows = await self._all(sql + " ORDER BY created_at, id", params)
        return [_job(r) for r in rows]

    async def job_ids(self, states: Iterable[JobState]) -> list[str]:
        """Ids of the jobs in these states, oldest first (cheaper than jobs())."""
        st = [s.value for s in states]
        rows = await self._all(
            f"SELECT id FROM jobs WHERE state IN ({','.join('?' * len(st))})"
            " ORDER BY created_at, id",
            st,
        )
        return [r[0] for r in rows]

    async def count_by_state(self) -> dict[str, int]:
        """Number of jobs in each state."""
        rows = await self._all("SELECT state, COUNT(*) FROM jobs GROUP BY state")
        return {r[0]: int(r[1]) for r in rows}

    async def input_paths(self) -> set[str]:
        """Spool-relative input paths of every job (to adopt orphans after a crash)."""
        rows = await self._all("SELECT input_path FROM jobs")
        return {r[0] for r in rows}

    async def transition(
        self,
        job_id: str,
        new: JobState,
        kind: str | None = None,
        detail: Mapping[str, Any] | None = None,
        **values: Any,
    ) -> Job:
        """Move a job to `new` (checked against the table), updating columns, with an event."""
        async with self._transitions:  # read, check and write as one step
            job = await self.job(job_id)
            if job.state == new:  # two stages decided the same move at once
                return job
            check_transition(job.state, new)
            await self.update_job(
                job_id, kind or str(new), detail, _old=job.state, state=new, **values
            )
            return await self.job(job_id)

    async def update_job(
        self,
        job_id: str,
        kind: str | None = None,
        detail: Mapping[str, Any] | None = None,
        _old: JobState | None = None,
        **values: Any,
    ) -> None:
        """Update job columns; when `kind` is given an event row is written in the same tx."""
        bad = set(values) - _JOB_COLS
        if bad:
            raise ValueError(f"unknown job columns: {sorted(bad)}")
        now = self._clock()
        values = {**values, "updated_at": now}
        if values.get("state") in (JobState.DONE, JobState.FAILED, JobState.CANCELLED):
            values.setdefault("finished_at", now)
        vals = _dump({k: (v.value if isinstance(v, JobState) else v) for k, v in values.items()})
        stmts: list[tuple[str, Sequence[Any] | Mapping[str, Any]]] = [
            (
                f"UPDATE jobs SET {', '.join(f'{k} = :{k}' for k in vals)} WHERE id = :_id",
                {**vals, "_id": job_id},
            )
        ]
        if kind:
            new = values.get("state")
            stmts.append(
                self._event(
                    job_id,
                    now,
                    kind,
                    _old.value if _old else None,
                    new.value if isinstance(new, JobState) else None,
                    detail,
                )
            )
        await self._tx(stmts)

    async def request_cancel(self, job_id: str) -> bool:
        """Mark a live job for cancellation (the tracker acts on it); False if it has ended."""
        job = await self.job(job_id)
        if job.state in (JobState.DONE, JobState.FAILED, JobState.CANCELLED):
            return False
        if not job.cancel_requested:
            await self.update_job(job_id, "cancel_requested", None, cancel_requested=1)
        return True

    async def add_event(self, job_id: str, kind: str, detail: Mapping[str, Any] | None) -> None:
        """Append an event without changing the job."""
        await self._tx([self._event(job_id, self._clock(), kind, None, None, detail)])

    async def events(self, job_id: str) -> list[Event]:
        """A job's history, oldest first."""
        rows = await self._all("SELECT * FROM events WHERE job_id = ? ORDER BY id", (job_id,))
        return [Event(**_load(r)) for r in rows]

    # --- pieces -----------------------------------------------------------------------

    async def validated(
        self, job_id: str, pieces: Sequence[Piece], detail: Mapping[str, Any], **values: Any
    ) -> None:
        """Record a job's pieces and move it to SUBMITTING, in one transaction."""
        job = await self.job(job_id)
        check_transition(job.state, JobState.SUBMITTING)
        now = self._clock()
        stmts: list[tuple[str, _Params]] = [("DELETE FROM pieces WHERE job_id = ?", (job_id,))]
        stmts += [
            (
                "INSERT INTO pieces (job_id, idx, input_path, requests, bytes, est_tokens)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (job_id, p.idx, p.input_path, p.requests, p.bytes, p.est_tokens),
            )
            for p in pieces
        ]
        vals = _dump({**values, "state": JobState.SUBMITTING.value, "updated_at": now})
        stmts.append(
            (
                f"UPDATE jobs SET {', '.join(f'{k} = :{k}' for k in vals)} WHERE id = :_id",
                {**vals, "_id": job_id},
            )
        )
        stmts.append(
            self._event(job_id, now, "validated", job.state, JobState.SUBMITTING.value, detail)
        )
        await self._tx(stmts)

    async def pieces(self, job_id: str) -> list[Piece]:
        """A job's pieces in order."""
        rows = await self._all("SELECT * FROM pieces WHERE job_id = ? ORDER BY idx", (job_id,))
        return [Piece(**_load(r)) for r in rows]

    # --- attempts ---------------------------------------------------------------------

    def _insert_attempt(self, a: Mapping[str, Any], now: float) -> list[tuple[str, _Params]]:
        cols = [
            "id",
            "job_id",
            "piece",
            "input_path",
            "model",
            "requests",
            "est_tokens",
            "not_before",
        ]
        return [
            (
                f"INSERT INTO attempts ({', '.join(cols)}, created_at, updated_at)"
                f" VALUES ({', '.join('?' * len(cols))}, ?, ?)",
                (
                    *[a.get(c, 0 if c in ("est_tokens", "not_before") else None) for c in cols],
                    now,
                    now,
                ),
            ),
            self._event(
                a["job_id"],
                now,
                "attempt",
                None,
                None,
                {"attempt": a["id"], "piece": a["piece"], "requests": a.get("requests")},
            ),
        ]

    async def add_attempt(
        self, attempt_id: str, job_id: str, piece: int, input_path: str, **extra: Any
    ) -> None:
        """Record an attempt before anything is sent for it."""
        a = {"id": attempt_id, "job_id": job_id, "piece": piece, "input_path": input_path, **extra}
        await self._tx(self._insert_attempt(a, self._clock()))

    async def settle_attempt(
        self,
        attempt_id: str,
        outcome: str,
        batch: Mapping[str, Any] | None,
        next_attempt: Mapping[str, Any] | None = None,
        piece_done: bool = False,
        detail: Mapping[str, Any] | None = None,
        reason: Mapping[str, Any] | None = None,
    ) -> None:
        """Mark an ended attempt collected with its outcome, and in the same transaction
        either queue the next attempt for its piece or mark the piece done (and, with
        `reason`, record that the job fails, so a crash cannot forget it)."""
        att = await self.attempt(attempt_id)
        now = self._clock()
        stmts: list[tuple[str, _Params]] = [
            (
                "UPDATE attempts SET collected = 1, outcome = ?, batch = COALESCE(?, batch),"
                " updated_at = ? WHERE id = ?",
                (outcome, orjson.dumps(batch).decode() if batch else None, now, attempt_id),
            ),
            self._event(
                att.job_id,
                now,
                "attempt_settled",
                None,
                None,
                {"attempt": attempt_id, "outcome": outcome, **(detail or {})},
            ),
        ]
        if next_attempt is not None:
            stmts += self._insert_attempt(next_attempt, now)
        if piece_done:
            stmts.append(
                ("UPDATE pieces SET done = 1 WHERE job_id = ? AND idx = ?", (att.job_id, att.piece))
            )
        if reason is not None:
            stmts.append(
                (
                    "UPDATE jobs SET reason = ?, updated_at = ? WHERE id = ?",
                    (orjson.dumps(reason).decode(), now, att.job_id),
                )
            )
        await self._tx(stmts)

    async def pending_keys(self) -> list[tuple[str, str, int, float, float]]:
        """(id, model or '', est_tokens, created_at, not_before) of every open attempt with
        no batch yet, across jobs, oldest first: what admission decides on, without
        decoding whole rows on every submit wake-up."""
        rows = await self._all(
            "SELECT a.id, COALESCE(a.model, ''), a.est_tokens, a.created_at, a.not_before"
            " FROM attempts a JOIN jobs j ON j.id = a.job_id WHERE a.batch_id IS NULL"
            " AND a.collected = 0 AND a.abandoned = 0 AND j.state IN ('submitting', 'tracking')"
            " AND j.cancel_requested = 0 ORDER BY a.created_at, a.id"
        )
        return [(r[0], r[1], int(r[2]), float(r[3]), float(r[4])) for r in rows]

    async def ended_attempts(self) -> list[Attempt]:
        """Attempts whose batch reached a terminal status but are not collected yet."""
        terminal = [st.value for st in TERMINAL_BATCH_STATUSES]
        rows = await self._all(
            "SELECT a.* FROM attempts a JOIN jobs j ON j.id = a.job_id"
            " WHERE a.batch_id IS NOT NULL AND a.collected = 0 AND a.abandoned = 0"
            f" AND a.status IN ({','.join('?' * len(terminal))})"
            f" AND j.state NOT IN ({_ENDED}) ORDER BY a.updated_at",
            terminal,
        )
        return [Attempt(**_load(r)) for r in rows]

    async def cancelling_jobs(self) -> list[Job]:
        """Submitted jobs a cancel was asked for."""
        rows = await self._all(
            "SELECT * FROM jobs WHERE cancel_requested = 1 AND state IN ('submitting', 'tracking')"
            " ORDER BY created_at"
        )
        return [_job(r) for r in rows]

    async def failing_jobs(self) -> list[Job]:
        """Jobs whose failure was decided (a reason recorded) but not yet published."""
        rows = await self._all(
            f"SELECT * FROM jobs WHERE reason IS NOT NULL AND state NOT IN ({_ENDED})"
            " ORDER BY created_at"
        )
        return [_job(r) for r in rows]

    async def settled_jobs(self) -> list[Job]:
        """Submitted jobs whose pieces are all done but which have not moved on yet."""
        rows = await self._all(
            "SELECT * FROM jobs j WHERE state IN ('submitting', 'tracking')"
            " AND EXISTS (SELECT 1 FROM pieces p WHERE p.job_id = j.id)"
            " AND NOT EXISTS (SELECT 1 FROM pieces p WHERE p.job_id = j.id AND p.done = 0)"
        )
        return [_job(r) for r in rows]

    async def result_dirs(self, prefix: str) -> set[str]:
        """Result dirs already given to jobs that start with `prefix` (to pick a free NAME)."""
        esc = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        rows = await self._all(
            "SELECT result_dir FROM jobs WHERE result_dir LIKE ? ESCAPE '\\'", (esc + "%",)
        )
        return {r[0] for r in rows}

    async def oldest_live_created_at(self) -> float | None:
        """Claim time of the oldest job not yet ended."""
        rows = await self._all(f"SELECT MIN(created_at) FROM jobs WHERE state NOT IN ({_ENDED})")
        return float(rows[0][0]) if rows and rows[0][0] is not None else None

    # --- learned limits ---------------------------------------------------------------

    async def learn_limit(self, model: str, limit: int) -> None:
        """Remember the enqueued-token limit an API error stated for a model."""
        await self._tx(
            [
                (
                    "INSERT INTO model_limits (model, token_limit, learned_at) VALUES (?, ?, ?)"
                    " ON CONFLICT(model) DO UPDATE SET token_limit = excluded.token_limit,"
                    " learned_at = excluded.learned_at",
                    (model, limit, self._clock()),
                )
            ]
        )

    async def learned_limits(self) -> dict[str, int]:
        """Every learned per-model token limit."""
        rows = await self._all("SELECT model, token_limit FROM model_limits")
        return {r[0]: int(r[1]) for r in rows}

    async def update_attempt(
        self, attempt_id: str, event: str | None = None, **values: Any
    ) -> None:
        """Update attempt columns; with `event`, also append a job event in the same tx."""
        bad = set(values) - _ATTEMPT_COLS
        if bad:
            raise ValueError(f"unknown attempt columns: {sorted(bad)}")
        now = self._clock()
        vals = _dump({**values, "updated_at": now})
        stmts: list[tuple[str, Sequence[Any] | Mapping[str, Any]]] = [
            (
                f"UPDATE attempts SET {', '.join(f'{k} = :{k}' for k in vals)} WHERE id = :_id",
                {**vals, "_id": attempt_id},
            )
        ]
        if event:
            att = await self.attempt(attempt_id)
            detail = {"attempt": attempt_id, **{k: v for k, v in values.items() if k != "batch"}}
            stmts.append(self._event(att.job_id, now, event, None, None, detail))
        await self._tx(stmts)

    async def attempt(self, attempt_id: str) -> Attempt:
        """One attempt by id."""
        rows = await self._all("SELECT * FROM attempts WHERE id = ?", (attempt_id,))
        row = rows[0] if rows else None
        if row is None:
            raise KeyError(attempt_id)
        return Attempt(**_load(row))

    async def attempts(self, job_id: str) -> list[Attempt]:
        """A job's attempts in creation order."""
        rows = await self._all(
            "SELECT * FROM attempts WHERE job_id = ? ORDER BY created_at, id", (job_id,)
        )
        return [Attempt(**_load(r)) for r in rows]

    async def live_tokens(self) -> dict[str, int]:
        """Estimated tokens of live attempts (see live_attempts) per model ('' = unknown)."""
        terminal = [s.value for s in TERMINAL_BATCH_STATUSES]
        rows = await self._all(
            "SELECT COALESCE(model, ''), SUM(est_tokens) FROM attempts WHERE batch_id IS NOT NULL"
            f" AND (status IS NULL OR status NOT IN ({','.join('?' * len(terminal))}))"
            " GROUP BY 1",
            terminal,
        )
        return {r[0]: int(r[1]) for r in rows}

    async def jobs_missing_attempts(self) -> list[str]:
        """Ids of submitting jobs (no cancel asked) with an unfinished piece that has no
        open attempt, oldest first."""
        rows = await self._all(
            "SELECT DISTINCT j.id, j.created_at FROM jobs j JOIN pieces p ON p.job_id = j.id"
            " WHERE j.state = 'submitting' AND j.cancel_requested = 0 AND p.done = 0"
            " AND NOT EXISTS (SELECT 1 FROM attempts a WHERE a.job_id = p.job_id"
            " AND a.piece = p.idx AND a.collected = 0 AND a.abandoned = 0)"
            " ORDER BY j.created_at, j.id"
        )
        return [r[0] for r in rows]

    async def live_attempts(self) -> list[Attempt]:
        """Attempts whose remote batch exists and has not reached a terminal status."""
        terminal = [s.value for s in TERMINAL_BATCH_STATUSES]
        rows = await self._all(
            "SELECT * FROM attempts WHERE batch_id IS NOT NULL AND"
            f" (status IS NULL OR status NOT IN ({','.join('?' * len(terminal))}))"
            " ORDER BY created_at",
            terminal,
        )
        return [Attempt(**_load(r)) for r in rows]
