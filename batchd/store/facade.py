"""The store's one interface: what the stages ask and record, in domain words.

The SQL is in queries.sql and migrations/; the engine behind it is a backend
(backend.py: sqlite.py by default, postgres.py for replicas sharing one database).
Every job state change and its event row are written in one transaction; a state
change is guarded (`WHERE state = old`), so two writers (the daemon and a CLI
command, or two replicas) can never both move a job.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from batchd.states import TERMINAL_JOB_STATES, JobState, check_transition
from batchd.store.backend import Backend, is_url
from batchd.store.queries import Conflict, Duplicate, Params, Stmt, migrations, q
from batchd.store.rows import (
    Attempt,
    Event,
    Job,
    LiveBatch,
    Piece,
    RowLike,
    decode,
    dump_detail,
    encode,
)

Clock = Callable[[], float]

LIVE_STATES: tuple[JobState, ...] = tuple(s for s in JobState if s not in TERMINAL_JOB_STATES)
_JOB_COLS = frozenset(
    {
        "source",
        "input_path",
        "sha256",
        "endpoint",
        "model",
        "requests",
        "bytes",
        "est_tokens",
        "completed",
        "failed",
        "usage",
        "reason",
        "result_dir",
        "cancel_requested",
        "allow_duplicate",
        "input_fp",
        "provider",
        "estimate",
        "cost_nanos",
        "cost_unknown",
        "admitted_at",
        "reserved_nanos",
        "budget_wait",
    }
)
_ATTEMPT_COLS = frozenset(
    {
        "input_path",
        "file_id",
        "batch_id",
        "create_sent_at",
        "status",
        "batch",
        "collected",
        "model",
        "requests",
        "est_tokens",
        "not_before",
        "abandoned",
        "outcome",
        "upload_started_at",
        "completed",
        "failed",
        "total",
        "batch_created_at",
        "raw_status",
        "usage",
        "refusals",
    }
)
_FAR = 1e18  # "no upper bound" for time cursors
HOLD_SETTING = "api_hold"  # stages/health.py records why the API refuses access here


@dataclass(frozen=True)
class NewJob:
    """A file just claimed, to be recorded as a queued job."""

    id: str
    stem: str  # the NAME as dropped; the name actually used may get a -N suffix
    input_path: str
    source: str
    retry_of: str | None = None
    allow_duplicate: bool = False
    provider: str | None = None  # the configured provider NAME (None: the default)
    # A queue source's message id (unique per source: a redelivery is refused), and a
    # reason the job fails for at once (an invalid message), set in the same transaction.
    source_msg: str | None = None
    reason: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Pending:
    """An attempt waiting for its batch: what admission decides on."""

    id: str
    model: str
    tokens: int
    waiting_since: float
    not_before: float
    requests: int
    job_id: str
    provider: str | None = None


def _update(table: str, values: Mapping[str, Any], key: str = "id") -> str:
    """UPDATE of checked column names (the one statement shape built in Python)."""
    sets = ", ".join(f"{k} = :{k}" for k in values)
    return f"UPDATE {table} SET {sets} WHERE {key} = :_key"


def _event(
    job_id: str,
    at: float,
    kind: str,
    old: str | None = None,
    new: str | None = None,
    detail: Mapping[str, Any] | None = None,
) -> Stmt:
    return Stmt(
        q("insert_event"),
        {
            "job_id": job_id,
            "at": at,
            "kind": kind,
            "old_state": old,
            "new_state": new,
            "detail": dump_detail(detail),
        },
    )


def _attempt_row(a: Mapping[str, Any], now: float) -> Params:
    return {
        "id": a["id"],
        "job_id": a["job_id"],
        "piece": a["piece"],
        "input_path": a["input_path"],
        "model": a.get("model"),
        "requests": a.get("requests"),
        "est_tokens": a.get("est_tokens") or 0,
        "not_before": a.get("not_before") or 0.0,
        "upload_started_at": a.get("upload_started_at"),
        "now": now,
    }


def _attempt_stmts(a: Mapping[str, Any], now: float) -> list[Stmt]:
    detail = {"attempt": a["id"], "piece": a["piece"], "requests": a.get("requests")}
    return [
        Stmt(q("insert_attempt"), _attempt_row(a, now)),
        _event(a["job_id"], now, "attempt", detail=detail),
    ]


class Store:
    """Jobs, pieces, attempts and their history; opened with `async with Store.connect()`."""

    def __init__(self, backend: Backend, clock: Clock = time.time) -> None:
        self._b = backend
        self._clock = clock

    # --- lifecycle --------------------------------------------------------------------

    @classmethod
    async def open(cls, target: Path | str, clock: Clock = time.time) -> Store:
        """Open (creating and migrating if needed) the database: a SQLite file's path, or
        a `postgresql://` URL."""
        if is_url(target):
            from batchd.store.postgres import PgBackend

            return cls(await PgBackend.open(str(target)), clock)
        from batchd.store.sqlite import SqliteBackend

        return cls(await SqliteBackend.open(Path(target)), clock)

    @classmethod
    async def open_read_only(cls, target: Path | str, clock: Clock = time.time) -> Store:
        """Open for reads alone: a SQLite file through one plain connection whose reads
        never wait (run without an event loop: the CLI's jobs and show); PostgreSQL as
        `open`. Writing through it raises."""
        if is_url(target):
            return await cls.open(target, clock)
        from batchd.store.sqlite_file import SqliteReader

        return cls(SqliteReader.open(Path(target)), clock)

    @classmethod
    @asynccontextmanager
    async def connect(cls, target: Path | str, clock: Clock = time.time) -> AsyncIterator[Store]:
        """`async with Store.connect(path) as store:` — closed (transactions finished) after."""
        store = await cls.open(target, clock)
        try:
            yield store
        finally:
            await store.close()

    async def close(self) -> None:
        """Finish transactions in flight, then close."""
        await self._b.close()

    @staticmethod
    def schema_version() -> int:
        """The schema version this batchd writes."""
        return len(migrations())

    async def data_version(self) -> int:
        """Changes whenever another process commits (a CLI retry, cancel, …)."""
        return await self._b.data_version()

    @property
    def dialect(self) -> str:
        """The engine behind the store: "sqlite" or "postgresql"."""
        return self._b.dialect

    @property
    def shared(self) -> bool:
        """True when several daemons may share this store (PostgreSQL): per-item work is
        then claimed with leases (see batchd/leases.py)."""
        return self._b.dialect == "postgresql"

    async def _rows(self, query: str, /, **params: Any) -> list[RowLike]:
        return await self._b.fetch(q(query), params)

    async def _scalar(self, query: str, /, **params: Any) -> Any:
        rows = await self._rows(query, **params)
        return rows[0][0] if rows else None

    # --- jobs -------------------------------------------------------------------------

    async def _family(self, stem: str) -> set[str]:
        """Names in use that a job dropped as `stem` could collide with."""
        rows = await self._rows("job_name_family", stem=stem, lo=stem + "-", hi=stem + ".")
        return {r[0] for r in rows}

    async def _names(
        self, new: Sequence[NewJob], dir_taken: Callable[[str], bool]
    ) -> dict[str, str]:
        """The name actually used by each new job: its stem, else stem-2, stem-3, …

        One query finds which stems are in use at all (a burst of new names costs that);
        only a stem in use costs a look at its family (stem, stem-2, …)."""
        stems = sorted({j.stem for j in new})
        rows = await self._rows("job_names_in", names=orjson.dumps(stems).decode())
        in_use = {r[0] for r in rows}
        used: dict[str, set[str]] = {}
        assigned: set[str] = set()
        out: dict[str, str] = {}
        for j in new:
            taken = used.get(j.stem)
            if taken is None:
                taken = used[j.stem] = await self._family(j.stem) if j.stem in in_use else set()
            n = 1
            while True:
                name = j.stem if n == 1 else f"{j.stem}-{n}"
                if name not in taken and name not in assigned and not dir_taken(name):
                    break
                n += 1
            assigned.add(name)
            out[j.id] = name
        return out

    async def create_jobs(
        self,
        new: Sequence[NewJob],
        dir_taken: Callable[[str], bool] = lambda _n: False,
        skip_recorded: bool = False,
    ) -> dict[str, str]:
        """Record claimed files as queued jobs, all in one transaction; returns the name
        each job got, by id.

        Each gets a unique name (`nightly`, `nightly-2`, …) not used by another job nor
        by a result dir on disk (`dir_taken`); that name is its result dir's name too.
        `skip_recorded`: a job another process recorded meanwhile (a replica adopting the
        same claimed file) is left out instead of failing the whole transaction.
        """
        if not new:
            return {}
        for _ in range(5):  # a name taken by another process meanwhile: choose again
            names = await self._names(new, dir_taken)
            now = self._clock()
            rows = [
                {
                    "id": j.id,
                    "name": names[j.id],
                    "stem": j.stem,
                    "source": j.source,
                    "input_path": j.input_path,
                    "retry_of": j.retry_of,
                    "allow_duplicate": int(j.allow_duplicate),
                    "provider": j.provider,
                    "now": now,
                }
                for j in new
            ]
            events = [
                {
                    "job_id": j.id,
                    "at": now,
                    "kind": "claimed",
                    "old_state": None,
                    "new_state": JobState.QUEUED.value,
                    "detail": dump_detail(
                        {"source": j.source, "file": j.stem}
                        | ({"provider": j.provider} if j.provider else {})
                    ),
                }
                for j in new
            ]
            stmts = [Stmt(q("insert_job"), rows), Stmt(q("insert_event"), events)]
            tagged = [
                {
                    "id": j.id,
                    "source_msg": j.source_msg,
                    "reason": encode({"reason": j.reason})["reason"],
                }
                for j in new
                if j.source_msg is not None or j.reason is not None
            ]
            if tagged:  # a second job for one message fails on jobs_source_msg
                stmts.append(Stmt(q("set_source_msg"), tagged))
            try:
                await self._b.tx(stmts)
                break
            except Duplicate as e:
                if skip_recorded and "jobs.id" in str(e):
                    recorded = {j.id for j in new if await self._rows("job_by_id", id=j.id)}
                    new = [j for j in new if j.id not in recorded]
                    if not new:
                        return {}
                elif "jobs.name" not in str(e):
                    raise
        else:
            raise RuntimeError("could not find free job names")
        return names

    async def create_job(
        self, job_id: str, name: str, input_path: str, source: str, **kw: Any
    ) -> Job:
        """Record one claimed file (see create_jobs)."""
        await self.create_jobs([NewJob(job_id, name, input_path, source, **kw)])
        return await self.job(job_id)

    async def job(self, job_id: str) -> Job:
        """The job with this exact id (KeyError when absent)."""
        rows = await self._rows("job_by_id", id=job_id)
        if not rows:
            raise KeyError(job_id)
        return decode(Job, rows[0])

    async def find_jobs(self, ref: str) -> list[Job]:
        """Jobs a reference names: an exact id; else the job using that name, or the newest
        job dropped under that NAME; else jobs whose id starts with it (several = ambiguous)."""
        rows = await self._rows("job_by_id", id=ref)
        if rows:
            return [decode(Job, rows[0])]
        by_name = await self._rows("job_by_name", name=ref)
        by_stem = await self._rows("jobs_by_stem_newest", stem=ref)
        named = [decode(Job, r) for r in (*by_name, *by_stem)]
        if named:
            return [max(named, key=lambda j: (j.created_at, j.id))]
        prefix = ref.upper()
        if len(prefix) >= 4:
            rows = await self._rows("jobs_by_id_prefix", lo=prefix, hi=prefix + "\U0010ffff")
            return [decode(Job, r) for r in rows]
        return []

    async def list_jobs(
        self,
        states: Iterable[JobState] | None = None,
        since: float | None = None,
        limit: int = 50,
        before: tuple[float, str] | None = None,
    ) -> list[Job]:
        """Jobs newest first (at most `limit`), optionally by state, claimed since `since`,
        strictly older than the `before` cursor (created_at, id)."""
        cur_t, cur_id = before or (_FAR, "")
        if before is None:
            cur_id = "\U0010ffff"
        since_t = float("-inf") if since is None else since
        if states is None:
            rows = await self._rows(
                "jobs_newest", before=cur_t, before_id=cur_id, since=since_t, limit=limit
            )
            return [decode(Job, r) for r in rows]
        out: list[Job] = []
        for s in set(states):
            rows = await self._rows(
                "jobs_newest_in_state",
                state=s.value,
                before=cur_t,
                before_id=cur_id,
                since=since_t,
                limit=limit,
            )
            out += [decode(Job, r) for r in rows]
        out.sort(key=lambda j: (j.created_at, j.id), reverse=True)
        return out[:limit]

    async def oldest_job_at(self) -> float | None:
        """Claim time of the oldest job still stored (how far back `jobs` sees)."""
        v = await self._scalar("oldest_job_created_at")
        return None if v is None else float(v)

    async def count_by_state(self) -> dict[str, int]:
        """Number of jobs in each state (kept by triggers: one small read)."""
        return {r[0]: int(r[1]) for r in await self._rows("job_counts") if r[1]}

    async def live_count(self) -> int:
        """Jobs not yet ended."""
        counts = await self.count_by_state()
        return sum(counts.get(s.value, 0) for s in LIVE_STATES)

    async def live_providers(self) -> set[str | None]:
        """The provider NAMEs of jobs not yet ended (None: the default)."""
        out: set[str | None] = set()
        for s in LIVE_STATES:
            out |= {r[0] for r in await self._rows("live_providers", state=s.value)}
        return out

    async def oldest_live_created_at(self) -> float | None:
        """Claim time of the oldest job not yet ended."""
        found = [
            float(v)
            for s in LIVE_STATES
            if (v := await self._scalar("oldest_live_created_at", state=s.value)) is not None
        ]
        return min(found, default=None)

    async def due_new_jobs(self, limit: int) -> list[str]:
        """Ids of queued or validating jobs, oldest first (at most `limit`)."""
        out: list[str] = []
        for s in (JobState.QUEUED, JobState.VALIDATING):
            out += [r[0] for r in await self._rows("due_new_jobs", state=s.value, limit=limit)]
        return out[:limit]

    async def transition(
        self,
        job_id: str,
        new: JobState,
        kind: str | None = None,
        detail: Mapping[str, Any] | None = None,
        current: Job | None = None,
        **values: Any,
    ) -> Job:
        """Move a job to `new` (checked against the table), updating columns, with an event.

        The write is guarded by the state it was read in (`current`, if the caller has
        just read it); if another writer moved the job meanwhile, the move is decided
        again on the state it now has.
        """
        job = current
        for _ in range(10):
            job = job if job is not None else await self.job(job_id)
            if job.state == new:  # two stages decided the same move at once
                return job
            check_transition(job.state, new)
            stmts = self._job_update(job, kind or str(new), detail, new, values)
            try:
                await self._b.tx(stmts)
            except Conflict:
                job = None
                continue
            now = stmts[0].params["updated_at"]  # type: ignore[call-overload]
            ended = {"finished_at": now} if new in TERMINAL_JOB_STATES else {}
            return dataclasses.replace(job, **values, state=new, updated_at=now, **ended)
        raise RuntimeError(f"job {job_id}: state keeps changing under us")

    def _job_update(
        self,
        job: Job,
        kind: str | None,
        detail: Mapping[str, Any] | None,
        new: JobState | None,
        values: Mapping[str, Any],
    ) -> list[Stmt]:
        bad = set(values) - _JOB_COLS
        if bad:
            raise ValueError(f"unknown job columns: {sorted(bad)}")
        now = self._clock()
        vals = encode({**values, "updated_at": now})
        guard = ""
        if new is not None:
            vals["state"] = new.value
            if new in TERMINAL_JOB_STATES:
                vals["finished_at"] = now
            guard = " AND state = :_old"
        stmts = [
            Stmt(
                _update("jobs", vals) + guard,
                {**vals, "_key": job.id, "_old": job.state.value},
                must_change=new is not None,
            )
        ]
        if kind:
            old = job.state.value if new is not None else None
            stmts.append(_event(job.id, now, kind, old, new.value if new else None, detail))
        return stmts

    async def update_job(
        self,
        job_id: str,
        kind: str | None = None,
        detail: Mapping[str, Any] | None = None,
        **values: Any,
    ) -> None:
        """Update job columns (not the state: see transition); with `kind`, an event too."""
        job = await self.job(job_id)
        await self._b.tx(self._job_update(job, kind, detail, None, values))

    async def request_cancel(self, job_id: str) -> bool:
        """Mark a live job for cancellation (the stages act on it); False if it has ended."""
        job = await self.job(job_id)
        if job.ended:
            return False
        if not job.cancel_requested:
            now = self._clock()
            await self._b.tx(
                [
                    Stmt(q("set_cancel_requested"), {"id": job_id, "now": now}),
                    _event(job_id, now, "cancel_requested"),
                ]
            )
        return True

    async def add_event(self, job_id: str, kind: str, detail: Mapping[str, Any] | None) -> None:
        """Append an event without changing the job."""
        await self._b.tx([_event(job_id, self._clock(), kind, detail=detail)])

    async def events(self, job_id: str) -> list[Event]:
        """A job's history, oldest first."""
        return [decode(Event, r) for r in await self._rows("events_of", job_id=job_id)]

    async def duplicate_of(self, job: Job, sha256: str, since: float) -> Job | None:
        """An earlier job (not failed or cancelled) with the same content since `since`."""
        rows = await self._rows("duplicate_of", sha256=sha256, since=since, id=job.id)
        return decode(Job, rows[0]) if rows else None

    async def retries_of(self, job_id: str) -> list[Job]:
        """Jobs made by `batchd retry` of this job, newest first."""
        return [decode(Job, r) for r in await self._rows("retries_of", job_id=job_id)]

    async def failing_jobs(self, limit: int = 100) -> list[Job]:
        """Jobs whose failure was decided (a reason recorded) but not yet published."""
        return [decode(Job, r) for r in await self._rows("failing_jobs", limit=limit)]

    async def cancelling_jobs(self, limit: int = 100) -> list[Job]:
        """Live jobs a cancel was asked for."""
        rows = await self._rows("cancelling_jobs", limit=limit)
        return [j for j in (decode(Job, r) for r in rows) if j.state in _SUBMITTED]

    async def collecting_jobs(self, limit: int = 100) -> list[Job]:
        """Jobs whose every piece has ended, waiting to be published."""
        return [decode(Job, r) for r in await self._rows("collecting_jobs", limit=limit)]

    async def settled_jobs(self) -> list[Job]:
        """Submitted jobs whose pieces are all done but which have not moved on (a crash
        between the two); checked at start-up."""
        out: list[Job] = []
        for s in _SUBMITTED:
            out += [decode(Job, r) for r in await self._rows("settled_jobs", state=s.value)]
        return out

    async def result_dir_taken(self, rel: str) -> bool:
        """True when a job already has this result dir."""
        return bool(await self._rows("result_dir_taken", result_dir=rel))

    # --- pieces -----------------------------------------------------------------------

    async def validated(
        self,
        job_id: str,
        pieces: Sequence[Piece],
        attempts: Sequence[Mapping[str, Any]],
        detail: Mapping[str, Any],
        reused: tuple[str, Mapping[str, Any]] | None = None,
        current: Job | None = None,
        **values: Any,
    ) -> None:
        """Record a job's pieces and their first attempts and move it to SUBMITTING, in one
        transaction (so no piece is ever left without an attempt). `reused`: (attempt id,
        columns) of an attempt made while validating that becomes piece 0's."""
        job = current or await self.job(job_id)
        check_transition(job.state, JobState.SUBMITTING)
        now = self._clock()
        stmts = [Stmt(q("delete_pieces"), {"job_id": job_id})]
        if reused is not None:
            vals = encode({**reused[1], "updated_at": now})
            stmts.append(Stmt(_update("attempts", vals), {**vals, "_key": reused[0]}))
        if pieces:
            stmts.append(
                Stmt(
                    q("insert_piece"),
                    [
                        {
                            "job_id": job_id,
                            "idx": p.idx,
                            "input_path": p.input_path,
                            "requests": p.requests,
                            "bytes": p.bytes,
                            "est_tokens": p.est_tokens,
                        }
                        for p in pieces
                    ],
                )
            )
        for a in attempts:
            stmts += _attempt_stmts(a, now)
        stmts += self._job_update(job, "validated", detail, JobState.SUBMITTING, values)
        await self._b.tx(stmts)

    async def revalidate(self, job_id: str, detail: Mapping[str, Any]) -> None:
        """Start a submitting job over (its input changed before any batch was made): its
        pieces go, its attempts are given up, and it is validated again."""
        job = await self.job(job_id)
        check_transition(job.state, JobState.VALIDATING)
        stmts = [
            Stmt(q("delete_pieces"), {"job_id": job_id}),
            Stmt(q("abandon_open_attempts"), {"job_id": job_id, "now": self._clock()}),
        ]
        stmts += self._job_update(job, "input_changed", detail, JobState.VALIDATING, {})
        await self._b.tx(stmts)

    async def pieces(self, job_id: str) -> list[Piece]:
        """A job's pieces in order."""
        return [decode(Piece, r) for r in await self._rows("pieces_of", job_id=job_id)]

    # --- attempts ---------------------------------------------------------------------

    async def add_attempt(
        self,
        attempt_id: str,
        job_id: str,
        piece: int,
        input_path: str,
        durable: bool = False,
        **extra: Any,
    ) -> None:
        """Record an attempt before anything is sent for it (`durable`: see update_attempt)."""
        a = {"id": attempt_id, "job_id": job_id, "piece": piece, "input_path": input_path, **extra}
        await self._b.tx(_attempt_stmts(a, self._clock()), durable)

    async def settle_attempt(
        self,
        attempt_id: str,
        outcome: str,
        batch: Mapping[str, Any] | None,
        next_attempt: Mapping[str, Any] | None = None,
        piece_done: bool = False,
        detail: Mapping[str, Any] | None = None,
        reason: Mapping[str, Any] | None = None,
        remote_files: Sequence[tuple[str, str]] = (),
        usage: Mapping[str, Any] | None = None,
        charge: Mapping[str, Any] | None = None,
    ) -> None:
        """Mark an ended attempt collected with its outcome (and the `usage` its result
        lines report, where the batch reports none), and in the same transaction
        either queue the next attempt for its piece or mark the piece done (and, with
        `reason`, record that the job fails, so a crash cannot forget it). The
        provider's copies listed in `remote_files` ((file_id, kind)) become due for
        deletion. `charge` (the put_charge columns but attempt_id, job_id and at) is what
        the attempt's results billed: stored by attempt id, replacing any earlier tally,
        so settling again after a crash can never charge twice."""
        att = await self.attempt(attempt_id)
        now = self._clock()
        stmts = []
        if charge is not None:
            row = {"attempt_id": attempt_id, "job_id": att.job_id, "at": now, **charge}
            stmts.append(Stmt(q("put_charge"), row))
        stmts += [
            Stmt(
                q("settle_attempt"),
                {
                    "id": attempt_id,
                    "outcome": outcome,
                    "batch": encode({"batch": batch})["batch"],
                    "usage": encode({"usage": usage})["usage"],
                    "now": now,
                },
            ),
            _event(
                att.job_id,
                now,
                "attempt_settled",
                detail={"attempt": attempt_id, "outcome": outcome, **(detail or {})},
            ),
        ]
        if next_attempt is not None:
            stmts += _attempt_stmts(next_attempt, now)
        if piece_done:
            stmts.append(Stmt(q("piece_done"), {"job_id": att.job_id, "idx": att.piece}))
        if reason is not None:
            stmts.append(
                Stmt(
                    q("set_job_reason"),
                    {"id": att.job_id, "reason": encode({"reason": reason})["reason"], "now": now},
                )
            )
        stmts += self._remote_file_stmts(att.job_id, remote_files, now)
        await self._b.tx(stmts)

    @staticmethod
    def _remote_file_stmts(job_id: str, files: Sequence[tuple[str, str]], now: float) -> list[Stmt]:
        if not files:
            return []
        rows = [{"file_id": f, "job_id": job_id, "kind": k, "due_at": now} for f, k in files]
        return [Stmt(q("add_remote_file"), rows)]

    async def forget_remote_files(self, job_id: str, files: Sequence[tuple[str, str]]) -> None:
        """Make the provider's copies of these files due for deletion."""
        await self._b.tx(self._remote_file_stmts(job_id, files, self._clock()))

    async def update_attempt(
        self,
        attempt_id: str,
        event: str | None = None,
        durable: bool = False,
        job_id: str | None = None,
        **values: Any,
    ) -> None:
        """Update attempt columns; with `event`, also append a job event in the same tx.
        `durable`: on disk before this returns, even across a power cut (write it before
        acting on the world: the record that a create or an upload is being sent)."""
        bad = set(values) - _ATTEMPT_COLS
        if bad:
            raise ValueError(f"unknown attempt columns: {sorted(bad)}")
        now = self._clock()
        if "batch" in values and values["batch"] and "batch_created_at" not in values:
            values = {**values, "batch_created_at": values["batch"].get("created_at")}
        vals = encode({**values, "updated_at": now})
        stmts = [Stmt(_update("attempts", vals), {**vals, "_key": attempt_id})]
        if event:
            job_id = job_id or (await self.attempt(attempt_id)).job_id
            detail = {"attempt": attempt_id, **{k: v for k, v in values.items() if k != "batch"}}
            stmts.append(_event(job_id, now, event, detail=detail))
        await self._b.tx(stmts, durable)

    async def record_batch(
        self,
        att: LiveBatch,
        batch: Mapping[str, Any],
        status: str | None,
        counts: tuple[int, int, int],
        raw_status: str | None = None,
    ) -> None:
        """A tracked batch changed (status or request_counts): one transaction writes the
        attempt, an event when the status moved, and the job's progress."""
        now = self._clock()
        completed, failed, total = counts
        vals = encode(
            {
                "status": status,
                "raw_status": raw_status,
                "batch": batch,
                "completed": completed,
                "failed": failed,
                "total": total,
                "updated_at": now,
            }
        )
        stmts = [Stmt(_update("attempts", vals), {**vals, "_key": att.attempt_id})]
        if status != att.status:
            detail = {"attempt": att.attempt_id, "status": status}
            stmts.append(_event(att.job_id, now, "batch_status", detail=detail))
        stmts.append(Stmt(q("job_progress"), {"id": att.job_id, "now": now}))
        await self._b.tx(stmts)

    async def attempt(self, attempt_id: str) -> Attempt:
        """One attempt by id."""
        rows = await self._rows("attempt_by_id", id=attempt_id)
        if not rows:
            raise KeyError(attempt_id)
        return decode(Attempt, rows[0])

    async def batch_owned(self, batch_id: str) -> bool:
        """True when an attempt already has this remote batch (a provider without tags is
        reconciled by time and size: a batch another attempt owns is not a candidate)."""
        return bool(await self._rows("batch_owned", batch_id=batch_id))

    async def attempts(self, job_id: str) -> list[Attempt]:
        """A job's attempts in creation order."""
        return [decode(Attempt, r) for r in await self._rows("attempts_of", job_id=job_id)]

    async def due_pending(self, now: float, limit: int) -> list[Pending]:
        """Attempts of submitted jobs (no cancel asked) waiting for their batch and due by
        `now`, in the order they became due (at most `limit`)."""
        rows = await self._rows("due_pending", now=now, limit=limit)
        return [
            Pending(r[0], r[1], int(r[2]), float(r[3]), float(r[4]), int(r[5]), r[6], r[7])
            for r in rows
        ]

    async def next_pending_at(self, now: float) -> float | None:
        """When the next pending attempt that is not due yet becomes due."""
        v = await self._scalar("next_pending_at", now=now)
        return None if v is None else float(v)

    async def in_flight(self) -> dict[str, tuple[int, int]]:
        """(estimated tokens, requests) of live batches per model ('' = unknown)."""
        return {r[0]: (int(r[1] or 0), int(r[2] or 0)) for r in await self._rows("live_in_flight")}

    async def live_batches(self) -> list[LiveBatch]:
        """Batches in flight, with what the tracker compares (nothing decoded)."""
        return [
            LiveBatch(r[0], r[1], r[2], r[3], int(r[4]), int(r[5]), int(r[6]), float(r[7]), r[8])
            for r in await self._rows("live_batches")
        ]

    async def live_batches_changed(self, since: float) -> list[LiveBatch]:
        """Batches in flight whose record changed at or after `since` (the tracker learns
        of batches another replica created)."""
        return [
            LiveBatch(r[0], r[1], r[2], r[3], int(r[4]), int(r[5]), int(r[6]), float(r[7]), r[8])
            for r in await self._rows("live_batches_changed", since=since)
        ]

    async def live_attempts(self) -> list[Attempt]:
        """Attempts whose batch is in flight (whole rows; for tools and tests)."""
        out = []
        for b in await self.live_batches():
            out.append(await self.attempt(b.attempt_id))
        return out

    async def ended_attempts(self, limit: int = 100) -> list[Attempt]:
        """Attempts whose batch ended but whose results are not collected yet."""
        return [decode(Attempt, r) for r in await self._rows("ended_attempts", limit=limit)]

    async def jobs_missing_attempts(self) -> list[str]:
        """Submitting jobs with an unfinished piece that has no open attempt (start-up)."""
        return [r[0] for r in await self._rows("jobs_missing_attempts")]

    # --- learned limits ---------------------------------------------------------------

    async def learn_limit(self, model: str, limit: int) -> None:
        """Remember the enqueued-token limit an API error stated for a model."""
        await self._b.tx(
            [Stmt(q("learn_limit"), {"model": model, "limit": limit, "now": self._clock()})]
        )

    async def learned_limits(self) -> dict[str, int]:
        """Every learned per-model token limit."""
        return {r[0]: int(r[1]) for r in await self._rows("learned_limits")}

    async def learn_request_limit(self, model: str, limit: int) -> None:
        """Remember the enqueued-request limit an API refusal stated for a model."""
        await self._b.tx(
            [Stmt(q("learn_request_limit"), {"model": model, "limit": limit, "now": self._clock()})]
        )

    async def learned_request_limits(self) -> dict[str, int]:
        """Every learned per-model enqueued-request limit."""
        return {r[0]: int(r[1]) for r in await self._rows("learned_request_limits")}

    # --- cost and budgets ---------------------------------------------------------------

    async def unadmitted_jobs(self, limit: int) -> list[Job]:
        """Validated jobs the budget has not admitted yet, oldest first."""
        return [decode(Job, r) for r in await self._rows("unadmitted_jobs", limit=limit)]

    async def budget_waiting_count(self) -> int:
        """Jobs held back by a budget."""
        return int(await self._scalar("budget_waiting_count") or 0)

    async def admit_job(
        self, job_id: str, reserved: int | None, detail: Mapping[str, Any] | None = None
    ) -> bool:
        """Admit a job (its attempts may now be submitted), reserving `reserved` nano-dollars
        in the current periods; False when it was admitted already."""
        now = self._clock()
        try:
            await self._b.tx(
                [
                    Stmt(
                        q("admit_job"),
                        {"id": job_id, "reserved": reserved, "now": now},
                        must_change=True,
                    ),
                    _event(job_id, now, "budget_admitted", detail=detail),
                ]
            )
        except Conflict:
            return False
        return True

    async def set_budget_wait(self, job_id: str, reason: str) -> None:
        """Record why a job waits for its budget (with an event; call it on change only)."""
        now = self._clock()
        await self._b.tx(
            [
                Stmt(q("set_budget_wait"), {"id": job_id, "reason": reason, "now": now}),
                _event(job_id, now, "budget_wait", detail={"reason": reason}),
            ]
        )

    async def budget_committed(
        self, day0: float, month0: float
    ) -> list[tuple[str, str, bool, int]]:
        """(model, source, admitted today, nano-dollars) held by jobs admitted this month:
        the actual cost of ended jobs, the reservation of the others."""
        rows = await self._rows("budget_committed", day0=day0, month0=month0)
        return [(r[0], r[1], bool(r[2]), int(r[3] or 0)) for r in rows]

    async def job_cost(self, job_id: str) -> dict[str, Any]:
        """The sum of a job's charges: attempts charged, requests, tokens, cost (nano-dollars)
        and why part of it could not be priced (None when all could)."""
        r = (await self._rows("job_cost", job_id=job_id))[0]
        keys = (
            "attempts",
            "requests",
            "input_tokens",
            "cached_tokens",
            "cache_write_tokens",
            "output_tokens",
            "reasoning_tokens",
            "cost_nanos",
        )
        out: dict[str, Any] = {k: int(r[i]) for i, k in enumerate(keys)}
        out["cost_unknown"] = r[8]
        return out

    async def charges_since(self, since: float) -> list[RowLike]:
        """Every charge collected since `since` (at, model, source, requests, input, cached,
        output tokens, cost_nanos, cost_unknown), oldest first."""
        return await self._rows("charges_since", since=since)

    # --- settings ---------------------------------------------------------------------

    async def hold(self) -> dict[str, Any] | None:
        """The API hold a daemon recorded (reason, message, since), or None."""
        row = await self.setting(HOLD_SETTING)
        if row is None:
            return None
        data = orjson.loads(row[0])
        return data if isinstance(data, dict) else None

    async def holds(self) -> dict[str, dict[str, Any]]:
        """Every provider's recorded hold by provider NAME (the default's as "openai")."""
        out: dict[str, dict[str, Any]] = {}
        for row in await self._rows("hold_settings"):
            key, data = str(row[0]), orjson.loads(row[1])
            if isinstance(data, dict):
                name = key.partition(":")[2] or str(data.get("provider") or "openai")
                out[name] = data
        return out

    async def setting(self, key: str) -> tuple[str, float] | None:
        """A daemon-wide fact (value, since) other processes can read."""
        rows = await self._rows("get_setting", key=key)
        return (rows[0][0], float(rows[0][1])) if rows else None

    async def set_setting(self, key: str, value: str | None) -> None:
        """Set (or, with None, clear) a daemon-wide fact."""
        if value is None:
            await self._b.tx([Stmt(q("delete_setting"), {"key": key})])
        else:
            await self._b.tx(
                [Stmt(q("set_setting"), {"key": key, "value": value, "now": self._clock()})]
            )

    # --- retention --------------------------------------------------------------------

    async def due_remote_files(
        self, now: float, limit: int
    ) -> list[tuple[str, str, str, int, str | None]]:
        """(file_id, job_id, kind, tries, provider) of the provider's copies due for
        deletion (`file_id` is a batch id for kind "batch")."""
        rows = await self._rows("due_remote_files", now=now, limit=limit)
        return [(r[0], r[1], r[2], int(r[3]), r[4]) for r in rows]

    async def next_remote_file_at(self) -> float | None:
        """When the next deletion of a provider's copy is due."""
        v = await self._scalar("next_remote_file_at")
        return None if v is None else float(v)

    async def remote_file_deleted(self, file_id: str, job_id: str, kind: str) -> None:
        """A provider's copy is gone: forget it, with an event on its job."""
        now = self._clock()
        stmts = [Stmt(q("remote_file_done"), {"file_id": file_id})]
        if await self._rows("job_by_id", id=job_id):
            stmts.append(
                _event(
                    job_id, now, "remote_file_deleted", detail={"file_id": file_id, "kind": kind}
                )
            )
        await self._b.tx(stmts)

    async def remote_file_later(self, file_id: str, due_at: float) -> None:
        """A deletion failed: try again at `due_at`."""
        await self._b.tx([Stmt(q("remote_file_later"), {"file_id": file_id, "due_at": due_at})])

    async def expired_jobs(self, before: float, limit: int) -> list[str]:
        """Ids of jobs that ended before `before`, oldest first."""
        return [r[0] for r in await self._rows("expired_jobs", before=before, limit=limit)]

    async def delete_jobs(self, ids: Sequence[str]) -> None:
        """Delete finished jobs with their events, attempts and pieces (one transaction)."""
        rows = [{"id": i} for i in ids]
        if rows:
            await self._b.tx(
                [
                    Stmt(q(name), rows)
                    for name in (
                        "delete_job_charges",
                        "delete_job_events",
                        "delete_job_attempts",
                        "delete_job_pieces",
                        "delete_job",
                    )
                ]
            )

    async def expired_results(self, before: float, limit: int) -> list[tuple[str, str]]:
        """(job id, result dir) of published results older than `before`."""
        rows = await self._rows("expired_results", before=before, limit=limit)
        return [(r[0], r[1]) for r in rows]

    async def results_deleted(self, job_id: str) -> None:
        """A job's result dir was deleted by retention."""
        now = self._clock()
        await self._b.tx(
            [
                Stmt(q("results_deleted"), {"id": job_id, "now": now}),
                _event(job_id, now, "results_deleted"),
            ]
        )

    # --- queue sources ----------------------------------------------------------------

    async def job_by_source_msg(self, source: str, source_msg: str) -> Job | None:
        """The job recorded for this message of this source, if any."""
        rows = await self._rows("job_by_source_msg", source=source, source_msg=source_msg)
        return decode(Job, rows[0]) if rows else None

    async def source_live_count(self, source: str) -> int:
        """Jobs of a queue source not yet ended (its back-pressure)."""
        return int(await self._scalar("source_live_count", source=source) or 0)

    async def unannounced(self, source: str, limit: int = 100) -> list[Job]:
        """Ended jobs of a queue source whose outcome is not published yet, oldest first."""
        rows = await self._rows("unannounced_jobs", source=source, limit=limit)
        return [decode(Job, r) for r in rows]

    async def mark_announced(self, job_id: str, detail: Mapping[str, Any]) -> None:
        """The job's outcome was published to its source (with an event)."""
        now = self._clock()
        await self._b.tx(
            [
                Stmt(q("set_announced"), {"id": job_id, "now": now}),
                _event(job_id, now, "outcome_published", detail=detail),
            ]
        )

    async def durable(self) -> None:
        """Make every commit so far survive a power cut (one fsync of the WAL)."""
        await self._b.durable()

    async def vacuum_step(self, pages: int = 2000) -> None:
        """Hand freed pages back to the file system (bounded)."""
        await self._b.vacuum_step(pages)


_SUBMITTED = (JobState.SUBMITTING, JobState.TRACKING)
