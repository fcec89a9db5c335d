"""The facade's records: tenants' files, uploads, batches and webhook deliveries.

A facade batch is an ordinary job (its `job_id`); these tables hold only what the
OpenAI-compatible API adds: who owns what, the client's parameters, the ids it was
given, and the batch object frozen when its job ended. The SQL is in queries.sql
(`facade_*`), the schema in migrations/0005_facade.sql.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from batchd.store.facade import NewJob, Store
from batchd.store.queries import Conflict, Stmt, q
from batchd.store.rows import RowLike

_TOP = "\U0010ffff"  # above every id: the cursor of a first page, newest first


@dataclass(frozen=True)
class FacadeFile:
    """A tenant's file: an upload (spool/files/ID) or a batch's output or error file."""

    id: str
    tenant: str
    filename: str
    purpose: str
    bytes: int
    path: str  # spool-relative
    created_at: float
    expires_at: float | None
    batch_id: str | None


@dataclass(frozen=True)
class FacadeUpload:
    """A multi-part upload (parts under spool/uploads/ID/)."""

    id: str
    tenant: str
    filename: str
    purpose: str
    bytes: int
    mime_type: str
    file_expires_after: float | None
    created_at: float
    expires_at: float
    status: str
    file_id: str | None


@dataclass(frozen=True)
class UploadPart:
    """One part of an upload."""

    id: str
    upload_id: str
    bytes: int
    created_at: float


@dataclass(frozen=True)
class FacadeBatch:
    """One logical batch: the client's parameters and the job that does the work."""

    id: str
    tenant: str
    job_id: str
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None
    output_expires_after: float | None
    dedupe_key: str
    idempotency_key: str | None
    created_at: float
    status: str | None  # None while its job runs; the final status once settled
    output_file_id: str | None
    error_file_id: str | None
    final: dict[str, Any] | None  # the batch object, frozen when it was settled
    ended_at: float | None


@dataclass(frozen=True)
class FacadeEvent:
    """A webhook delivery still owed to a tenant."""

    id: str
    tenant: str
    batch_id: str
    type: str
    created_at: float
    due_at: float
    tries: int


def _row(cls: type[Any], row: RowLike, json_cols: tuple[str, ...] = ()) -> Any:
    values = {k: row[k] for k in row.keys()}
    for k in json_cols:
        if values.get(k) is not None:
            values[k] = orjson.loads(values[k])
    return cls(**values)


def _batch(row: RowLike) -> FacadeBatch:
    b: FacadeBatch = _row(FacadeBatch, row, ("metadata", "final"))
    return b


def _json(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


class Objects:
    """Reads and writes of the facade's tables, through the store's backend."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._b = store._b  # the same connection and transaction discipline as the store

    async def _rows(self, name: str, /, **params: Any) -> list[RowLike]:
        return await self._b.fetch(q(name), params)

    async def _scalar(self, name: str, /, **params: Any) -> float | None:
        rows = await self._rows(name, **params)
        return None if not rows or rows[0][0] is None else float(rows[0][0])

    # --- files --------------------------------------------------------------------------

    @staticmethod
    def file_stmt(f: FacadeFile) -> Stmt:
        """The insert of one file row (to go into a larger transaction)."""
        return Stmt(q("facade_insert_file"), dict(f.__dict__))

    async def add_file(self, f: FacadeFile, durable: bool = True) -> None:
        """Record a file whose bytes are already on disk."""
        await self._b.tx([self.file_stmt(f)], durable)

    async def file(self, file_id: str) -> FacadeFile | None:
        """A file by id (any tenant: callers check ownership)."""
        rows = await self._rows("facade_file", id=file_id)
        return _row(FacadeFile, rows[0]) if rows else None

    async def files(
        self, tenant: str, purpose: str | None, limit: int, after: str | None, ascending: bool
    ) -> list[FacadeFile]:
        """A tenant's files by id (creation order), after the cursor, at most `limit`."""
        name = "facade_files_asc" if ascending else "facade_files_desc"
        cursor = after if after is not None else ("" if ascending else _TOP)
        rows = await self._rows(name, tenant=tenant, cursor=cursor, purpose=purpose, limit=limit)
        return [_row(FacadeFile, r) for r in rows]

    async def delete_file(self, file_id: str) -> None:
        """Forget a file (its bytes are the caller's)."""
        await self._b.tx([Stmt(q("facade_delete_file"), {"id": file_id})])

    async def expired_files(self, now: float, limit: int) -> list[FacadeFile]:
        """Files whose expires_at has passed."""
        rows = await self._rows("facade_expired_files", now=now, limit=limit)
        return [_row(FacadeFile, r) for r in rows]

    async def next_file_expiry(self) -> float | None:
        """When the next file expires."""
        return await self._scalar("facade_next_file_expiry")

    async def files_of_batch(self, batch_id: str) -> list[FacadeFile]:
        """A batch's output and error files."""
        rows = await self._rows("facade_files_of_batch", batch_id=batch_id)
        return [_row(FacadeFile, r) for r in rows]

    # --- uploads ------------------------------------------------------------------------

    async def add_upload(self, u: FacadeUpload) -> None:
        """Record a new (pending) upload."""
        row = {k: v for k, v in u.__dict__.items() if k not in ("status", "file_id")}
        await self._b.tx([Stmt(q("facade_insert_upload"), row)])

    async def upload(self, upload_id: str) -> FacadeUpload | None:
        """An upload by id (any tenant)."""
        rows = await self._rows("facade_upload", id=upload_id)
        return _row(FacadeUpload, rows[0]) if rows else None

    async def add_part(self, p: UploadPart) -> None:
        """Record a part whose bytes are on disk."""
        await self._b.tx([Stmt(q("facade_insert_part"), dict(p.__dict__))], durable=True)

    async def parts(self, upload_id: str) -> list[UploadPart]:
        """An upload's parts."""
        rows = await self._rows("facade_parts_of", upload_id=upload_id)
        return [_row(UploadPart, r) for r in rows]

    async def end_upload(self, upload_id: str, status: str, file: FacadeFile | None) -> bool:
        """Complete (with its file), cancel or expire a pending upload, forgetting its parts;
        False when it was no longer pending."""
        stmts = [
            Stmt(
                q("facade_upload_ended"),
                {"id": upload_id, "status": status, "file_id": file.id if file else None},
                must_change=True,
            ),
            Stmt(q("facade_delete_parts"), {"upload_id": upload_id}),
        ]
        if file is not None:
            stmts.append(self.file_stmt(file))
        try:
            await self._b.tx(stmts, durable=file is not None)
        except Conflict:
            return False
        return True

    async def expired_uploads(self, now: float, limit: int) -> list[FacadeUpload]:
        """Pending uploads older than their hour."""
        rows = await self._rows("facade_expired_uploads", now=now, limit=limit)
        return [_row(FacadeUpload, r) for r in rows]

    async def next_upload_expiry(self) -> float | None:
        """When the next pending upload expires."""
        return await self._scalar("facade_next_upload_expiry")

    # --- batches ------------------------------------------------------------------------

    async def add_batch(self, b: FacadeBatch) -> None:
        """Record a batch (before its job: see create_job), durably."""
        row = {
            k: v
            for k, v in b.__dict__.items()
            if k not in ("status", "output_file_id", "error_file_id", "final", "ended_at")
        }
        row["metadata"] = _json(b.metadata)
        await self._b.tx([Stmt(q("facade_insert_batch"), row)], durable=True)

    async def create_job(self, job: NewJob, dir_taken: Any) -> str:
        """Record the batch's job (queued); returns the job's name."""
        names = await self.store.create_jobs([job], dir_taken)
        await self.store.durable()
        return names[job.id]

    async def batch(self, batch_id: str) -> FacadeBatch | None:
        """A batch by id (any tenant)."""
        rows = await self._rows("facade_batch", id=batch_id)
        return _batch(rows[0]) if rows else None

    async def batches(self, tenant: str, limit: int, after: str | None) -> list[FacadeBatch]:
        """A tenant's batches, newest first, strictly after the cursor."""
        rows = await self._rows(
            "facade_batches_desc", tenant=tenant, cursor=after or _TOP, limit=limit
        )
        return [_batch(r) for r in rows]

    async def by_dedupe(self, tenant: str, key: str, since: float) -> FacadeBatch | None:
        """The newest batch made without an Idempotency-Key from the same parameters (one
        that failed or was cancelled does not count: creating it again is a new try)."""
        rows = await self._rows(
            "facade_batch_by_dedupe", tenant=tenant, dedupe_key=key, since=since
        )
        return _batch(rows[0]) if rows else None

    async def by_key(self, tenant: str, key: str) -> FacadeBatch | None:
        """The batch made under this Idempotency-Key."""
        rows = await self._rows("facade_batch_by_key", tenant=tenant, key=key)
        return _batch(rows[0]) if rows else None

    async def to_settle(self, limit: int) -> list[FacadeBatch]:
        """Live batches whose job has ended (walks every live batch: start-up and sweeps)."""
        return [_batch(r) for r in await self._rows("facade_batches_to_settle", limit=limit)]

    async def ended_since(self, since: float, limit: int) -> list[tuple[FacadeBatch, float]]:
        """Live batches whose job ended at or after `since`, with when, in that order (walks
        only the jobs that ended since then)."""
        rows = await self._rows("facade_batches_ended_since", since=since, limit=limit)
        out = []
        for r in rows:
            values = {k: r[k] for k in r.keys() if k != "job_finished_at"}
            for k in ("metadata", "final"):
                if values[k] is not None:
                    values[k] = orjson.loads(values[k])
            out.append((FacadeBatch(**values), float(r["job_finished_at"])))
        return out

    async def without_job(self) -> list[FacadeBatch]:
        """Live batches whose job was never recorded (a crash mid-create; start-up)."""
        return [_batch(r) for r in await self._rows("facade_batches_without_job")]

    async def settle(
        self,
        b: FacadeBatch,
        final: Mapping[str, Any],
        files: Sequence[FacadeFile],
        event: FacadeEvent | None,
        now: float,
    ) -> bool:
        """Freeze an ended batch's object, record its result files and the webhook owed, in
        one transaction; False when it was already settled."""
        stmts = [
            Stmt(
                q("facade_settle_batch"),
                {
                    "id": b.id,
                    "status": final["status"],
                    "output_file_id": final.get("output_file_id"),
                    "error_file_id": final.get("error_file_id"),
                    "final": _json(dict(final)),
                    "ended_at": now,
                },
                must_change=True,
            ),
            *(self.file_stmt(f) for f in files),
        ]
        if event is not None:
            row = {k: v for k, v in event.__dict__.items() if k not in ("due_at", "tries")}
            stmts.append(Stmt(q("facade_insert_event"), row))
        try:
            await self._b.tx(stmts)
        except Conflict:
            return False
        return True

    async def expired_batches(self, before: float, limit: int) -> list[str]:
        """Ids of batches that ended before `before` (retention)."""
        rows = await self._rows("facade_expired_batches", before=before, limit=limit)
        return [r[0] for r in rows]

    async def delete_batches(self, ids: Sequence[str]) -> None:
        """Forget ended batches and their result files' records."""
        rows = [{"id": i} for i in ids]
        if rows:
            await self._b.tx(
                [Stmt(q("facade_delete_batch_files"), rows), Stmt(q("facade_delete_batch"), rows)]
            )

    # --- webhook deliveries -------------------------------------------------------------

    async def due_events(self, now: float, limit: int) -> list[FacadeEvent]:
        """Deliveries due now, oldest first."""
        rows = await self._rows("facade_due_events", now=now, limit=limit)
        return [_row(FacadeEvent, r) for r in rows]

    async def next_event_at(self) -> float | None:
        """When the next delivery is due."""
        return await self._scalar("facade_next_event_at")

    async def event_done(self, event_id: str) -> None:
        """Delivered (or given up): forget it."""
        await self._b.tx([Stmt(q("facade_event_done"), {"id": event_id})])

    async def event_later(self, event_id: str, due_at: float) -> None:
        """A delivery failed: try again at `due_at`."""
        await self._b.tx([Stmt(q("facade_event_later"), {"id": event_id, "due_at": due_at})])
