"""The outcome message of an ended job: what a producer needs without looking at disk.

One message per job on the source's `results`: job id, name, the source message id,
state, request counts, usage and cost, result paths, and for a failed job the error
summary. Its cost is the job's recorded charges (what `batchd show` and `batchd cost`
say, each result line billed once, priced at the job's provider); `null` with a reason
when unknown.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

from batchd.config import NANOS_PER_USD
from batchd.prices import Price, Unknown
from batchd.spool import Spool
from batchd.store import Job
from batchd.usage import AttemptTally

OBJECT = "batchd.job.outcome"
_MAX_ERRORS = 5


def usd(nanos: int) -> str:
    """Nano-dollars as an exact decimal string of USD ("0.000123")."""
    return format(Decimal(nanos) / NANOS_PER_USD, "f")


def cost_of(result: Path | None, price: Price | Unknown) -> dict[str, Any]:
    """Cost of the billed lines in a result dir's output.jsonl and errors.jsonl."""
    tally = AttemptTally(price)
    if result is not None:
        for fname in ("output.jsonl", "errors.jsonl"):
            try:
                with (result / fname).open("rb") as f:
                    for line in f:
                        if line.strip():
                            tally.add_raw(line)
            except FileNotFoundError:
                continue
    charge = tally.charge()
    if isinstance(charge.cost, Unknown):
        return {"usd": None, "unknown_reason": charge.cost.reason, "requests": charge.requests}
    return {"usd": usd(charge.cost), "requests": charge.requests}


def recorded_cost(charges: Mapping[str, Any]) -> dict[str, Any]:
    """The outcome's cost from the job's charges (`Store.job_cost`)."""
    if charges.get("cost_unknown"):
        return {
            "usd": None,
            "unknown_reason": charges["cost_unknown"],
            "requests": charges["requests"],
        }
    return {"usd": usd(charges["cost_nanos"]), "requests": charges["requests"]}


def error_summary(reason: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Why a job failed, short: reason, code, message, the first errors (with lines)."""
    if not reason:
        return None
    out: dict[str, Any] = {"reason": reason.get("reason"), "message": reason.get("message")}
    if reason.get("code"):
        out["code"] = reason["code"]
    errors = reason.get("errors")
    if isinstance(errors, list) and errors:
        out["errors"] = errors[:_MAX_ERRORS]
        first = errors[0]
        if out["message"] is None and isinstance(first, dict):
            out["message"] = first.get("message")
    return out


def _paths(spool: Spool, job: Job) -> dict[str, str | None]:
    result = spool.path(job.result_dir) if job.result_dir else None
    if result is None or not result.is_dir():
        return {"result_dir": None}
    out: dict[str, str | None] = {"result_dir": str(result)}
    for key, fname in (
        ("input", "input.jsonl"),
        ("output", "output.jsonl"),
        ("errors", "errors.jsonl"),
        ("job", "job.json"),
        ("report", "report.json"),
    ):
        out[key] = str(result / fname) if (result / fname).is_file() else None
    return out


def build(spool: Spool, job: Job, cost: Price | Unknown | Mapping[str, Any]) -> dict[str, Any]:
    """The outcome message's body (looks at the result files: run it in a thread). `cost`
    is the job's (`recorded_cost`), or a price its result lines are billed at."""
    from batchd.queue_api import iso

    paths = _paths(spool, job)
    result = Path(paths["result_dir"]) if paths["result_dir"] else None
    body: dict[str, Any] = {
        "object": OBJECT,
        "job_id": job.id,
        "name": job.name,
        "source": job.source,
        "source_message_id": job.source_msg,
        "state": str(job.state),
        "endpoint": job.endpoint,
        "model": job.model,
        "request_counts": {
            "total": job.requests or 0,
            "completed": job.completed,
            "failed": job.failed,
        },
        "usage": job.usage,
        "cost": dict(cost) if isinstance(cost, Mapping) else cost_of(result, cost),
        "paths": paths,
        "created_at": iso(job.created_at),
        "finished_at": iso(job.finished_at),
    }
    if job.reason:
        body["error"] = error_summary(job.reason)
    return body
