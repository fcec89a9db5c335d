"""Row types of the store and their encoding (JSON columns, booleans)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Protocol, TypeVar

import orjson

from batchd.states import JobState

JSON_COLS = frozenset({"usage", "reason", "batch", "detail", "estimate"})
_BOOL_COLS = frozenset({"cancel_requested", "collected", "abandoned", "done", "allow_duplicate"})


@dataclass(frozen=True)
class Job:
    """One input file as the user dropped it."""

    id: str
    name: str  # the name actually used (unique: nightly, nightly-2, …)
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
    stem: str | None = None  # the NAME as dropped (nightly for nightly-2)
    retry_of: str | None = None
    allow_duplicate: bool = False
    results_deleted_at: float | None = None
    input_fp: str | None = None  # the input's fingerprint when it was validated
    provider: str | None = None  # the configured provider NAME (None: the default)
    estimate: dict[str, Any] | None = None  # estimate.Estimate.as_dict() made at intake
    cost_nanos: int | None = None  # actual cost once ended (sum of its charges)
    cost_unknown: str | None = None  # why part of the cost could not be priced
    admitted_at: float | None = None  # when the budget let it be submitted
    reserved_nanos: int | None = None  # the high estimate it holds while it runs
    budget_wait: str | None = None  # why it waits for its budget (not admitted yet)

    @property
    def ended(self) -> bool:
        """Done, failed or cancelled."""
        return self.finished_at is not None

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
    completed: int = 0
    failed: int = 0
    total: int = 0
    batch_created_at: float | None = None
    phase: str = "pending"  # pending | live | ended | settled (derived by the database)
    provider: str | None = None  # the job's provider NAME (None: the default)
    raw_status: str | None = None  # the status as the provider wrote it
    usage: dict[str, Any] | None = None  # tallied from result lines (no batch usage)
    refusals: int = 0  # creates refused for a quota (requeued by admission)

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


@dataclass(frozen=True)
class LiveBatch:
    """What the tracker keeps of a batch in flight (no JSON decoded)."""

    attempt_id: str
    job_id: str
    batch_id: str
    status: str | None
    completed: int
    failed: int
    total: int
    created: float
    provider: str | None = None


class RowLike(Protocol):
    """A database row: sqlite3.Row, asyncpg.Record, a dict."""

    def keys(self) -> Any: ...

    def __getitem__(self, key: Any) -> Any: ...


T = TypeVar("T")
_FIELDS: dict[type, frozenset[str]] = {}


def decode(cls: type[T], row: RowLike) -> T:
    """A row as `cls`: JSON columns parsed, flags as bools, unknown columns ignored."""
    names = _FIELDS.get(cls)
    if names is None:
        names = _FIELDS[cls] = frozenset(f.name for f in fields(cls))  # type: ignore[arg-type]
    out: dict[str, Any] = {}
    for k in row.keys():
        if k not in names:
            continue
        v = row[k]
        if k in JSON_COLS and v is not None:
            v = orjson.loads(v)
        elif k in _BOOL_COLS:
            v = bool(v)
        out[k] = v
    if "state" in out:
        out["state"] = JobState(out["state"])
    return cls(**out)


def encode(values: Mapping[str, Any]) -> dict[str, Any]:
    """Column values ready to bind: JSON columns serialised, enums as their value."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        if k in JSON_COLS and v is not None:
            v = orjson.dumps(v).decode()
        elif isinstance(v, JobState):
            v = v.value
        elif isinstance(v, bool):
            v = int(v)
        out[k] = v
    return out


def dump_detail(detail: Mapping[str, Any] | None) -> str | None:
    """An event's detail as JSON text (None when empty)."""
    return orjson.dumps(detail).decode() if detail else None
