"""Submit stage: validate a claimed file, split it into pieces, and create one batch per
piece attempt as token admission allows (upload, then an idempotent create).

An attempt's id is recorded before anything is sent and travels in the batch
metadata, so when a create's outcome is unknown (timeout, 5xx, crash) the stage
first looks for a batch carrying that id and adopts it instead of creating again.
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Callable, Container, Coroutine
from pathlib import Path
from typing import Any

from ulid import ULID

from batchd import jobmeta, jsonl, pieces
from batchd.admission import Candidate, admit
from batchd.api import ATTEMPT_KEY, ApiError, InvalidRequest, Tap, Transient
from batchd.stages import Backoff, Context, sync_job, wait_for
from batchd.stages.collect import fail_job
from batchd.states import TERMINAL_JOB_STATES, JobState
from batchd.store import Attempt, Job, Piece

JOB_KEY = "batchd_job"


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


async def _reject(ctx: Context, job: Job, problems: list[dict[str, Any]]) -> None:
    first = problems[0]
    await fail_job(
        ctx,
        job,
        {
            "reason": "invalid_input",
            "message": f"{len(problems)} problem(s); first: line {first['line']}: "
            f"{first['code']}: {first['message']}",
            "problems": problems,
        },
    )


async def _upload_while_validating(
    ctx: Context, job: Job, path: Path, consume: Callable[[bytes], None]
) -> Attempt | None:
    """Upload a file that may fit one batch, validating the bytes as they are sent.

    Validation is the slow part on a fast link and the upload on a slow one; doing
    both in one pass costs about the larger of the two. Returns the attempt that now
    holds the uploaded file, or None when the file was not uploaded here.
    """
    size = path.stat().st_size
    if not 0 < size <= ctx.cfg.limits.max_bytes_per_batch:
        return None
    atts = [a for a in await ctx.store.attempts(job.id) if a.open and a.piece == 0]
    if atts and atts[-1].file_id is not None:
        return None  # uploaded before a restart; validate from disk
    if atts:
        att = atts[-1]
        if att.upload_started_at is not None:
            await _adopt_lost_upload(ctx, att)
            if (await ctx.store.attempt(att.id)).file_id is not None:
                return None
    else:
        att = await ctx.store.attempt(await _new_attempt(ctx, job.id, 0, job.input_path))
    await ctx.store.update_attempt(att.id, upload_started_at=ctx.clock())
    up = ctx.cfg.upload
    f = await ctx.api.upload(
        path,
        f"batchd-{att.id}.jsonl",
        up.uploads_api_threshold_bytes,
        up.part_bytes,
        Tap(consume),
    )
    await ctx.store.update_attempt(att.id, "uploaded", file_id=f["id"])
    return await ctx.store.attempt(att.id)


async def _adopt_lost_upload(ctx: Context, att: Attempt) -> None:
    """An upload started before a crash may have finished: find its file, or forget it."""
    assert att.upload_started_at is not None
    found = await ctx.api.find_file(f"batchd-{att.id}.jsonl", att.upload_started_at - 600)
    if found is not None and found.get("bytes") == ctx.spool.path(att.input_path).stat().st_size:
        await ctx.store.update_attempt(att.id, "upload_adopted", file_id=found["id"])
    elif found is not None:  # a partial or foreign file under our name: don't leak it
        await ctx.api.delete_file(found["id"])


async def _discard(ctx: Context, att: Attempt | None) -> None:
    """Drop an upload that will not be used (invalid file, or one that must be split)."""
    if att is None:
        return
    await ctx.store.update_attempt(att.id, "abandoned", abandoned=1)
    if att.file_id:
        try:
            await ctx.api.delete_file(att.file_id)
        except ApiError as e:
            ctx.log.warning("delete_failed", job_id=att.job_id, file_id=att.file_id, error=str(e))


async def _validate_job(ctx: Context, job: Job) -> None:
    path = ctx.spool.path(job.input_path)
    why = _not_regular(path)
    if why:
        await _reject(ctx, job, [{"line": 0, "code": "not_a_file", "message": why}])
        return
    v = jsonl.Validator(jsonl.UNBOUNDED)
    try:
        att = await _upload_while_validating(ctx, job, path, v.feed)
        if att is None:
            summary = await asyncio.to_thread(
                jsonl.validate_path, path, jsonl.UNBOUNDED, nofollow=True
            )
            # The whole file may have been uploaded before a restart: that attempt is
            # settled below like a fresh one (kept as piece 0, or discarded).
            att = next(
                (
                    a
                    for a in await ctx.store.attempts(job.id)
                    if a.open and a.piece == 0 and a.input_path == job.input_path
                ),
                None,
            )
        else:
            summary = v.finish()
    except OSError as e:
        msg = e.strerror or str(e)
        await _reject(ctx, job, [{"line": 0, "code": "unreadable", "message": msg}])
        return
    if not summary.ok:
        ctx.metrics.validation_failures.inc()
        await _discard(ctx, att)
        problems = [
            {"line": p.line, "code": p.code, "message": p.message} for p in summary.problems
        ]
        await _reject(ctx, job, problems)
        return
    lim = ctx.cfg.limits
    piece_limits = jsonl.Limits(
        lim.max_requests_per_batch, lim.max_bytes_per_batch, lim.max_embedding_inputs_per_batch
    )
    if (
        summary.requests <= piece_limits.max_requests
        and summary.bytes <= piece_limits.max_bytes
        and summary.embedding_inputs <= piece_limits.max_embedding_inputs
    ):
        rows = [
            Piece(
                job.id,
                0,
                job.input_path,
                summary.requests,
                summary.bytes,
                summary.est_tokens,
                False,
            )
        ]
        if att is not None:
            await ctx.store.update_attempt(
                att.id,
                model=summary.model,
                requests=summary.requests,
                est_tokens=summary.est_tokens,
            )
    else:
        await _discard(ctx, att)
        out_dir = ctx.spool.processing / f"{job.id}.pieces"
        files = await asyncio.to_thread(
            pieces.split, path, out_dir, piece_limits, summary.endpoint == "/v1/embeddings"
        )
        rows = [
            Piece(
                job.id,
                i,
                str(f.path.relative_to(ctx.spool.root)),
                f.requests,
                f.bytes,
                f.est_tokens,
                False,
            )
            for i, f in enumerate(files)
        ]
    await ctx.store.validated(
        job.id,
        rows,
        {"requests": summary.requests, "bytes": summary.bytes, "pieces": len(rows)},
        endpoint=summary.endpoint,
        model=summary.model,
        requests=summary.requests,
        bytes=summary.bytes,
        est_tokens=summary.est_tokens,
    )
    ctx.log.info("job_validated", job_id=job.id, requests=summary.requests, pieces=len(rows))


async def _new_attempt(ctx: Context, job_id: str, piece: int, input_path: str, **extra: Any) -> str:
    attempt_id = str(ULID())
    await ctx.store.add_attempt(attempt_id, job_id, piece, input_path, **extra)
    return attempt_id


async def ensure_attempts(ctx: Context, job: Job) -> None:
    """Give every unfinished piece without an open attempt a new (pending) attempt."""
    atts = await ctx.store.attempts(job.id)
    open_pieces = {a.piece for a in atts if a.open}
    for p in await ctx.store.pieces(job.id):
        if not p.done and p.idx not in open_pieces:
            await _new_attempt(
                ctx,
                job.id,
                p.idx,
                p.input_path,
                model=job.model,
                requests=p.requests,
                est_tokens=p.est_tokens,
            )


def _unwanted(job: Job, att: Attempt) -> bool:
    """The attempt was given up, or its job cancelled or ended, while it was submitted."""
    return att.abandoned or job.cancel_requested or job.state in TERMINAL_JOB_STATES


async def _adopt(ctx: Context, att: Attempt, batch: dict[str, Any], how: str) -> None:
    job, now = await ctx.store.job(att.job_id), await ctx.store.attempt(att.id)
    late = _unwanted(job, now)
    # A batch created while a cancel (or a failure) was being handled: record it so it
    # is cancelled, and collected with the job's partial results unless the job ended.
    await ctx.store.update_attempt(
        att.id,
        how,
        batch_id=batch["id"],
        status=batch.get("status"),
        batch=batch,
        abandoned=int(job.state in TERMINAL_JOB_STATES),
    )
    if late:
        ctx.log.warning("late_batch_cancelled", job_id=job.id, batch_id=batch["id"])
        try:
            await ctx.api.cancel_batch(batch["id"])
        except ApiError as e:
            ctx.log.warning("cancel_failed", job_id=job.id, batch_id=batch["id"], error=str(e))
    ctx.metrics.batches_created.inc()
    ctx.metrics.drop_to_created.observe(max(0.0, ctx.clock() - job.created_at))
    ctx.log.info("batch_created", job_id=job.id, piece=att.piece, batch_id=batch["id"], how=how)
    await sync_job(ctx, job.id)


async def submit_attempt(ctx: Context, att: Attempt) -> None:
    """Upload (if needed) and create the batch of one attempt, adopting a lost create."""
    job = await ctx.store.job(att.job_id)
    assert job.endpoint is not None
    if att.create_sent_at is not None:
        found = await ctx.api.find_batch(att.id, not_before=att.create_sent_at - 600)
        if found:
            await _adopt(ctx, att, found, "adopted")
            return
    if att.file_id is None and att.upload_started_at is not None:
        await _adopt_lost_upload(ctx, att)
        att = await ctx.store.attempt(att.id)
    if att.file_id is None:
        await ctx.store.update_attempt(att.id, upload_started_at=ctx.clock())
        f = await ctx.api.upload(
            ctx.spool.path(att.input_path),
            f"batchd-{att.id}.jsonl",
            ctx.cfg.upload.uploads_api_threshold_bytes,
            ctx.cfg.upload.part_bytes,
        )
        await ctx.store.update_attempt(att.id, "uploaded", file_id=f["id"])
        att = await ctx.store.attempt(att.id)
    assert att.file_id is not None
    job, att = await ctx.store.job(att.job_id), await ctx.store.attempt(att.id)
    if _unwanted(job, att):  # cancelled or failed while this attempt was uploading
        return
    assert att.file_id is not None and job.endpoint is not None
    extra = jobmeta.read(ctx.spool, job)  # {} unless the job came with metadata (HTTP)
    metadata = {**ctx.cfg.batch.metadata, **extra, JOB_KEY: job.id, ATTEMPT_KEY: att.id}
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
    await _adopt(ctx, att, batch, "created")


async def budgets(ctx: Context) -> dict[str, int]:
    """Per-model token budgets: configured, tightened by limits learned from refusals."""
    out = dict(ctx.cfg.admission.token_budgets)
    for model, limit in (await ctx.store.learned_limits()).items():
        out[model] = min(limit, out.get(model, limit))
    return out


async def in_flight_tokens(ctx: Context) -> dict[str, int]:
    """Estimated prompt tokens of batches still holding the enqueued-token budget."""
    return await ctx.store.live_tokens()  # summed in SQL: no row per batch each wake-up


async def choose(ctx: Context, skip: Container[str] = ()) -> list[Attempt]:
    """The pending attempts admission lets through now (less those in `skip`)."""
    keys = await ctx.store.pending_keys()
    used, limits = await in_flight_tokens(ctx), await budgets(ctx)
    for model, n in limits.items():
        ctx.metrics.token_budget.labels(model).set(n)
    for model in {*used, *limits} - {""}:
        ctx.metrics.tokens_in_flight.labels(model).set(used.get(model, 0))
    now = ctx.clock()
    if limits.keys().isdisjoint(k[1] for k in keys):
        # No budget applies: admit() would take every due one, oldest first. This
        # runs on every wake-up, over every pending attempt (a burst has 1,000).
        ids = [k[0] for k in keys if k[4] <= now and k[0] not in skip]
    else:
        ids = admit([Candidate(*k) for k in keys], used, limits, now)
    return [await ctx.store.attempt(i) for i in ids if i not in skip]


async def advance(ctx: Context, job: Job) -> None:
    """Take one queued/validating job to SUBMITTING with its pieces and first attempts."""
    if job.reason is not None:  # failing was decided before a crash: finish it
        await fail_job(ctx, job, job.reason)
        return
    if job.state == JobState.QUEUED:
        job = await ctx.store.transition(job.id, JobState.VALIDATING)
    if job.state == JobState.VALIDATING:
        await _validate_job(ctx, job)
        job = await ctx.store.job(job.id)
    if job.state == JobState.SUBMITTING:
        await ensure_attempts(ctx, job)


async def run(ctx: Context) -> None:
    """Loop: validate new jobs; submit admitted attempts, a few at a time."""
    busy: set[str] = set()
    backoff = Backoff(ctx.clock)
    sem = asyncio.Semaphore(ctx.cfg.batch.max_concurrent_submits)

    async def guarded(key: str, job_id: str, coro: Coroutine[Any, Any, None]) -> None:
        # Any error stays with its own job or attempt: it backs off (without holding a
        # submit slot) while the rest go on.
        try:
            async with sem:
                try:
                    await coro
                    backoff.ok(key)
                except InvalidRequest as e:
                    job = await ctx.store.job(job_id)
                    report = {
                        "reason": "api_rejected",
                        "message": e.message,
                        "api_error": e.to_dict(),
                    }
                    await fail_job(ctx, job, report)
        except Exception as e:
            n, delay = backoff.failed(key)
            ctx.log.warning(
                "submit_retry",
                job_id=job_id,
                error=f"{type(e).__name__}: {e}",
                failures=n,
                retry_in=round(delay, 2),
                exc_info=not isinstance(e, ApiError | OSError),
            )
        finally:
            busy.discard(key)
            ctx.wake_submit.set()

    async with asyncio.TaskGroup() as tg:
        while True:
            # Each pass costs what is new, not what is already under way (a burst of
            # 1,000 files wakes this loop thousands of times).
            for job_id in await ctx.store.job_ids([JobState.QUEUED, JobState.VALIDATING]):
                if job_id not in busy and backoff.ready(job_id):
                    busy.add(job_id)
                    job = await ctx.store.job(job_id)
                    tg.create_task(guarded(job_id, job_id, advance(ctx, job)))
            # Only jobs that need one (a query, not two per submitting job per wake-up).
            for job_id in await ctx.store.jobs_missing_attempts():
                if job_id not in busy:
                    await ensure_attempts(ctx, await ctx.store.job(job_id))
            for att in await choose(ctx, busy):
                if att.id not in busy and backoff.ready(att.id):
                    busy.add(att.id)
                    tg.create_task(guarded(att.id, att.job_id, submit_attempt(ctx, att)))
            await wait_for(ctx.wake_submit, ctx.cfg.batch.poll_interval_seconds)
