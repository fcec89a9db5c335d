"""OpenAI-shaped objects (batch, file, upload, list page) from batchd's records. Pure: no I/O.

A facade batch is one job; its status is derived from the job, its attempts and its
history, mapped honestly onto OpenAI's eight statuses:

- queued, validating, or submitting before any of its batches started -> `validating`
  (admission holds it there: never a 429);
- a batch of it started (in_progress_at) and the job is submitting or tracking -> `in_progress`
  (a follow-up attempt for expired or retryable requests stays `in_progress`);
- collecting, or ended but not yet settled by the facade stage -> `finalizing`;
- a cancel asked and the job not ended -> `cancelling`;
- done -> `completed`, or `expired` when a piece's last attempt expired (retries exhausted);
  failed -> `failed`; cancelled -> `cancelled`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from ulid import ULID

from batchd.stages.collect import sum_usage
from batchd.states import JobState
from batchd.store import Attempt, Event, Job
from batchd.store.objects import FacadeBatch, FacadeFile, FacadeUpload

DAY = 86400
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})


def new_id(prefix: str) -> str:
    """A short opaque id: the prefix and a ULID (sortable by creation time), <= 64 chars."""
    return prefix + str(ULID()).lower()


def _int(t: float | None) -> int | None:
    return None if t is None else int(t)


def page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """A list page as OpenAI pages: `after` the last id; `has_more` only when there is more."""
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more and bool(data),
    }


def file_object(f: FacadeFile) -> dict[str, Any]:
    """The File object."""
    return {
        "id": f.id,
        "object": "file",
        "bytes": f.bytes,
        "created_at": int(f.created_at),
        "filename": f.filename,
        "purpose": f.purpose,
        "status": "processed",
        "expires_at": _int(f.expires_at),
        "status_details": None,
    }


def upload_object(u: FacadeUpload, file: FacadeFile | None) -> dict[str, Any]:
    """The Upload object (with its File once completed)."""
    return {
        "id": u.id,
        "object": "upload",
        "bytes": u.bytes,
        "created_at": int(u.created_at),
        "filename": u.filename,
        "purpose": u.purpose,
        "status": u.status,
        "expires_at": int(u.expires_at),
        "file": file_object(file) if file is not None else None,
    }


def _counted(atts: Iterable[Attempt]) -> list[Attempt]:
    """Attempts whose results count (a token-limit refusal or a discarded upload does not)."""
    return [a for a in atts if not a.abandoned and a.outcome != "requeue"]


def _in_progress_at(atts: Sequence[Attempt]) -> int | None:
    starts = [
        int(v)
        for a in _counted(atts)
        if isinstance(v := (a.batch or {}).get("in_progress_at"), int | float)
    ]
    return min(starts, default=None)


def _last_attempts(atts: Sequence[Attempt]) -> list[Attempt]:
    """The last attempt of each piece."""
    last: dict[int, Attempt] = {}
    for a in sorted(_counted(atts), key=lambda a: (a.created_at, a.id)):
        last[a.piece] = a
    return list(last.values())


def live_status(job: Job | None, atts: Sequence[Attempt]) -> str:
    """The status of a batch whose job has not been settled by the facade yet."""
    if job is None:
        return "validating"  # its job is being recorded (a create in flight)
    if job.ended or job.state == JobState.COLLECTING:
        return "finalizing"
    if job.cancel_requested:
        return "cancelling"
    if job.state in (JobState.SUBMITTING, JobState.TRACKING) and _in_progress_at(atts):
        return "in_progress"
    return "validating"


def final_status(job: Job, atts: Sequence[Attempt]) -> str:
    """The terminal status of a batch whose job has ended."""
    if job.state == JobState.FAILED:
        return "failed"
    if job.state == JobState.CANCELLED:
        return "cancelled"
    if any(a.outcome == "expired" for a in _last_attempts(atts)):
        return "expired"  # resubmitted as often as allowed, still requests without a result
    return "completed"


def _error(code: Any, message: Any, line: Any = None, param: Any = None) -> dict[str, Any]:
    return {
        "code": str(code) if code else None,
        "message": str(message or ""),
        "param": param,
        "line": line if isinstance(line, int) and line > 0 else None,
    }


def errors_of(job: Job) -> dict[str, Any] | None:
    """`errors` of a failed batch: the validation problems (line-numbered), the errors the
    API failed a batch with, or why batchd gave up."""
    if job.state != JobState.FAILED:
        return None
    reason = job.reason or {}
    kind = reason.get("reason")
    if kind == "invalid_input":
        data = [
            _error(p.get("code"), p.get("message"), p.get("line"))
            for p in reason.get("problems") or []
            if isinstance(p, dict)
        ]
    elif kind == "batch_failed":
        data = [
            _error(e.get("code"), e.get("message"), e.get("line"), e.get("param"))
            for e in reason.get("errors") or []
            if isinstance(e, dict)
        ]
    else:
        data = []
    if not data:
        data = [_error(kind or "failed", reason.get("message") or "the batch failed")]
    return {"object": "list", "data": data}


def _first(
    events: Iterable[Event], kind: str | None = None, state: str | None = None
) -> int | None:
    for e in events:
        if (kind is None or e.kind == kind) and (state is None or e.new_state == state):
            return int(e.at)
    return None


def batch_object(
    b: FacadeBatch,
    job: Job | None,
    atts: Sequence[Attempt],
    events: Sequence[Event],
    status: str | None = None,
) -> dict[str, Any]:
    """The Batch object of a batch not yet frozen (`status`: the final one, when settling)."""
    status = status or live_status(job, atts)
    counted = _counted(atts)
    ended = job is not None and job.ended
    if ended and job is not None:
        completed, failed = job.completed, job.failed
        usage = job.usage or sum_usage([a.batch or {} for a in counted])
    else:
        completed = sum(a.completed for a in counted)
        # A resubmitted attempt's failures were tried again: its successes stay counted.
        failed = sum(a.failed for a in counted if a.outcome != "resubmit")
        usage = sum_usage([a.batch or {} for a in counted])
    finished = _int(job.finished_at) if job is not None and status in TERMINAL else None
    return {
        "id": b.id,
        "object": "batch",
        "endpoint": b.endpoint,
        "model": job.model if job is not None else None,
        "errors": errors_of(job) if job is not None and status == "failed" else None,
        "input_file_id": b.input_file_id,
        "completion_window": b.completion_window,
        "status": status,
        "output_file_id": b.output_file_id,
        "error_file_id": b.error_file_id,
        "created_at": int(b.created_at),
        "in_progress_at": _in_progress_at(atts),
        "expires_at": int(b.created_at) + DAY,
        "finalizing_at": _first(events, state="collecting"),
        "completed_at": finished if status == "completed" else None,
        "failed_at": finished if status == "failed" else None,
        "expired_at": finished if status == "expired" else None,
        "cancelling_at": _first(events, kind="cancel_requested"),
        "cancelled_at": finished if status == "cancelled" else None,
        "request_counts": {
            "total": (job.requests or 0) if job is not None else 0,
            "completed": completed,
            "failed": failed,
        },
        "metadata": b.metadata,
        "usage": usage,
    }
