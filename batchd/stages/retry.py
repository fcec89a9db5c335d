"""`batchd retry JOB`: the requests of an ended job that did not succeed, as a new job.

The new job is recorded with `retry_of`, and the store allows one retry per job
unless that one failed or was cancelled, so retrying twice never pays twice. Its
input is written (fsynced) under a `.part` name in processing/ before the job is
recorded; a crash in between leaves only that file, which the daemon removes.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from ulid import ULID

from batchd import pieces
from batchd.spool import Spool, fsync_dir
from batchd.states import JobState
from batchd.store import Duplicate, Job, Store


class RetryRefused(Exception):
    """This job cannot be retried (the message says why)."""


class AlreadyRetried(RetryRefused):
    """A retry of this job exists already (and has not failed)."""

    def __init__(self, retry: Job) -> None:
        super().__init__(f"already retried as job {retry.id} ({retry.name}, {retry.state})")
        self.retry = retry


def _todo(result: Path, key: str) -> set[str]:
    done: set[str] = set()
    if (result / "output.jsonl").exists():
        done = pieces.read_outcome(result / "output.jsonl", None, key).succeeded
    return set(pieces.custom_ids(result / "input.jsonl", key)) - done


async def retry_job(
    store: Store, spool: Spool, job: Job, key: str = "custom_id"
) -> tuple[Job, int]:
    """Queue the failed and missing requests of an ended job as a new job (for the same
    provider; `key` names a request in its lines); returns it and how many requests it
    holds."""
    if not job.ended:
        raise RetryRefused(f"job {job.id} is {job.state}: it has not ended yet")
    for r in await store.retries_of(job.id):
        if r.state not in (JobState.FAILED, JobState.CANCELLED):
            raise AlreadyRetried(r)
    result = spool.path(job.result_dir) if job.result_dir else None
    if result is None or not (result / "input.jsonl").exists():
        raise RetryRefused(f"job {job.id} has no input.jsonl in its result dir to retry from")
    todo = await asyncio.to_thread(_todo, result, key)
    if not todo:
        raise RetryRefused(f"every request of job {job.id} already succeeded")
    new_id = str(ULID())
    stem = f"{job.name}-retry"
    tag = f"~{job.provider}" if job.provider else ""  # as spool.claim names it
    rel = f"processing/{new_id}{tag}--{stem}.jsonl.part"
    sub = await asyncio.to_thread(
        pieces.write_subset, result / "input.jsonl", todo, spool.path(rel), key
    )
    fsync_dir(spool.processing)
    try:
        new = await store.create_job(
            new_id,
            stem,
            rel,
            "retry",
            retry_of=job.id,
            allow_duplicate=True,
            provider=job.provider,
        )
    except Duplicate:  # another `batchd retry` was quicker
        spool.path(rel).unlink(missing_ok=True)
        for r in await store.retries_of(job.id):
            if r.state not in (JobState.FAILED, JobState.CANCELLED):
                raise AlreadyRetried(r) from None
        raise
    return new, sub.requests
