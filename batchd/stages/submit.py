"""Submit stage: validate a claimed file, upload it, create its batch (idempotently).

An attempt's id is recorded before anything is sent and travels in the batch
metadata, so when a create's outcome is unknown (timeout, 5xx, crash) the stage
first looks for a batch carrying that id and adopts it instead of creating again.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
from pathlib import Path
from typing import Any

from ulid import ULID

from batchd import jsonl
from batchd.api import ATTEMPT_KEY, ApiError, InvalidRequest, Transient
from batchd.stages import Context, wait_for
from batchd.stages.collect import fail_job, publish
from batchd.states import JobState
from batchd.store import Attempt, Job

JOB_KEY = "batchd_job"
_LIVE = (JobState.QUEUED, JobState.VALIDATING, JobState.SUBMITTING)


def _validate(path: Path) -> tuple[jsonl.Summary, str]:
    """Validate and hash in one streaming pass; never follows a symlink."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        v = jsonl.Validator()
        h = hashlib.sha256()
        while chunk := f.read(1 << 20):
            v.feed(chunk)
            h.update(chunk)
    return v.finish(), h.hexdigest()


def _not_regular(path: Path) -> str | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "the file disappeared from processing/"
    if stat.S_ISLNK(st.st_mode):
        return "a symbolic link, not a regular file (never followed)"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    return None


async def _validate_job(ctx: Context, job: Job) -> None:
    path = ctx.spool.path(job.input_path)
    why = _not_regular(path)
    if why:
        problem = {"line": 0, "code": "not_a_file", "message": why}
        await fail_job(ctx, job, {"reason": "invalid_input", "message": why, "problems": [problem]})
        return
    try:
        summary, sha = await asyncio.to_thread(_validate, path)
    except OSError as e:
        problem = {"line": 0, "code": "unreadable", "message": e.strerror or str(e)}
        await fail_job(
            ctx,
            job,
            {"reason": "invalid_input", "message": str(problem["message"]), "problems": [problem]},
        )
        return
    if not summary.ok:
        ctx.metrics.validation_failures.inc()
        problems = [
            {"line": p.line, "code": p.code, "message": p.message} for p in summary.problems
        ]
        await fail_job(
            ctx,
            job,
            {
                "reason": "invalid_input",
                "message": f"{len(problems)} problem(s); first: line {problems[0]['line']}: "
                f"{problems[0]['code']}: {problems[0]['message']}",
                "problems": problems,
            },
        )
        return
    await ctx.store.transition(
        job.id,
        JobState.SUBMITTING,
        "validated",
        {"requests": summary.requests, "bytes": summary.bytes},
        sha256=sha,
        endpoint=summary.endpoint,
        model=summary.model,
        requests=summary.requests,
        bytes=summary.bytes,
        est_tokens=summary.est_tokens,
    )


async def _current_attempt(ctx: Context, job: Job) -> Attempt:
    attempts = await ctx.store.attempts(job.id)
    pending = [a for a in attempts if a.batch_id is None]
    if pending:
        return pending[-1]
    attempt_id = str(ULID())
    await ctx.store.add_attempt(attempt_id, job.id, 0, job.input_path)
    return await ctx.store.attempt(attempt_id)


async def _adopt(ctx: Context, job: Job, att: Attempt, batch: dict[str, Any], how: str) -> None:
    await ctx.store.update_attempt(
        att.id, how, batch_id=batch["id"], status=batch.get("status"), batch=batch
    )
    await ctx.store.transition(job.id, JobState.TRACKING, "submitted", {"batch_id": batch["id"]})
    ctx.metrics.batches_created.inc()
    ctx.metrics.drop_to_created.observe(max(0.0, ctx.clock() - job.created_at))
    ctx.log.info("batch_created", job_id=job.id, batch_id=batch["id"], how=how)
    ctx.wake_track.set()


async def _submit(ctx: Context, job: Job) -> None:
    att = await _current_attempt(ctx, job)
    assert job.endpoint is not None
    if att.create_sent_at is not None:
        found = await ctx.api.find_batch(att.id, not_before=att.create_sent_at - 600)
        if found:
            await _adopt(ctx, job, att, found, "adopted")
            return
    if att.file_id is None:
        f = await ctx.api.upload_file(ctx.spool.path(att.input_path), f"batchd-{att.id}.jsonl")
        await ctx.store.update_attempt(att.id, "uploaded", file_id=f["id"])
        att = await ctx.store.attempt(att.id)
    assert att.file_id is not None
    metadata = {**ctx.cfg.batch.metadata, JOB_KEY: job.id, ATTEMPT_KEY: att.id}
    await ctx.store.update_attempt(att.id, create_sent_at=ctx.clock())
    try:
        batch = await ctx.api.create_batch(
            att.file_id,
            job.endpoint,
            ctx.cfg.batch.completion_window,
            metadata,
            ctx.cfg.batch.output_expires_after_seconds,
        )
    except Transient:
        # The batch may exist although we never saw the answer: look before retrying.
        ctx.metrics.retries.labels("create_unknown").inc()
        found = await ctx.api.find_batch(att.id, not_before=ctx.clock() - 600)
        if found is None:
            raise
        batch = found
    await _adopt(ctx, job, att, batch, "created")


async def advance(ctx: Context, job: Job) -> None:
    """Take one job as far as it can go in this stage."""
    if job.reason and job.result_dir and job.result_dir.startswith("failed/"):
        await publish(ctx, job, "failed", JobState.FAILED, {"report.json": job.reason})
        return
    if job.state == JobState.QUEUED:
        job = await ctx.store.transition(job.id, JobState.VALIDATING)
    if job.state == JobState.VALIDATING:
        await _validate_job(ctx, job)
        job = await ctx.store.job(job.id)
    if job.state == JobState.SUBMITTING:
        try:
            await _submit(ctx, job)
        except InvalidRequest as e:
            await fail_job(
                ctx,
                job,
                {"reason": "api_rejected", "message": e.message, "api_error": e.to_dict()},
            )


async def run(ctx: Context) -> None:
    """Loop: advance every job in queued/validating/submitting, a few at a time."""
    busy: set[str] = set()
    failures: dict[str, int] = {}
    sem = asyncio.Semaphore(ctx.cfg.batch.max_concurrent_submits)

    async def one(job: Job) -> None:
        async with sem:
            try:
                await advance(ctx, job)
                failures.pop(job.id, None)
            except (ApiError, OSError) as e:
                n = failures[job.id] = failures.get(job.id, 0) + 1
                ctx.log.warning("submit_retry", job_id=job.id, error=str(e), failures=n)
                await asyncio.sleep(min(60.0, 0.5 * 2 ** min(n, 7)))
            finally:
                busy.discard(job.id)
                ctx.wake_submit.set()

    async with asyncio.TaskGroup() as tg:
        while True:
            for job in await ctx.store.jobs(_LIVE):
                if job.id not in busy:
                    busy.add(job.id)
                    tg.create_task(one(job))
            await wait_for(ctx.wake_submit, ctx.cfg.batch.poll_interval_seconds)
