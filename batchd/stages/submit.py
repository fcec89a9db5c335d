"""Submit stage: validate a claimed file with its provider's rules, split it into pieces
by that provider's limits, and create one batch per piece attempt as admission allows
(stage the input, then a create that is never made twice).

An attempt's id is recorded before anything is sent and travels with the batch (as
metadata, a display name or its own input file, as the provider allows), so when a
create's outcome is unknown (timeout, 5xx, crash) the stage first looks for a batch
carrying that id and adopts it instead of creating again; a provider that can carry
no tag is matched by creation time and size (see the provider modules).

Each wake-up reads only what is due: the oldest few queued jobs and the due pending
attempts, as many as there are free slots (plus what is running or backing off).
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import hashlib
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from ulid import ULID

from batchd import jobmeta, jsonl, pieces
from batchd.admission import Candidate, admit, limit_from_message
from batchd.budget import Admit, Committed, JobCost, Period, Spend, decide_in_order, period_bounds
from batchd.estimate import Estimate, Estimator, configured
from batchd.prices import NANOS_PER_USD, Unknown, format_usd
from batchd.providers import Provider
from batchd.providers.base import JOB_KEY, Create, Snapshot
from batchd.providers.errors import ApiError, InvalidRequest, QuotaRefused, Transient
from batchd.providers.http import Tap
from batchd.spool import COMPRESSED, SUFFIX, fingerprint
from batchd.stages import Context, Worker, loop, sync_job
from batchd.stages.collect import MAX_REFUSALS, fail_job, refusal_delay
from batchd.states import TERMINAL_JOB_STATES, JobState
from batchd.store import Attempt, Job, LiveBatch, Pending, Piece

__all__ = ["JOB_KEY", "Submit", "advance", "ensure_attempts", "run", "submit_attempt"]
_FLIGHT_TTL = 1.0  # seconds an admission snapshot of what is in flight is reused
_SPEND_TTL = 5.0  # seconds the money committed this day and month is reused
_BUDGET_BATCH = 200  # jobs waiting for admission decided on per step
_BUDGET_ROLE_RETRY = 5.0  # replicas without the budget role look again this often


class InputChanged(Exception):
    """The input changed while it was read: a writer was still at it. Start over."""


def _not_regular(path: Path) -> str | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "the file disappeared from processing/"
    if stat.S_ISLNK(st.st_mode):
        return "a symbolic link, not a regular file (never followed)"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK))
    except OSError as e:
        return f"cannot read file: {(e.strerror or str(e)).lower()}"
    return None


async def _reject(ctx: Context, job: Job, problems: list[dict[str, Any]]) -> None:
    first = problems[0]
    where = f"line {first['line']}: " if first["line"] else ""
    await fail_job(
        ctx,
        job,
        {
            "reason": "invalid_input",
            "message": f"{len(problems)} problem(s); first: {where}"
            f"{first['code']}: {first['message']}",
            "problems": problems,
        },
    )


class _Reader:
    """Sees every byte of the input once, in order: validates (by its provider's rules)
    and hashes it, and the estimator sees each line the validator parsed (no second
    parse)."""

    def __init__(self, provider: Provider, estimator: Estimator) -> None:
        self.estimator = estimator
        self.validator: jsonl.Validator = provider.validator(
            jsonl.UNBOUNDED, on_request=estimator.add
        )
        self.sha = hashlib.sha256()

    def feed(self, chunk: bytes) -> None:
        self.validator.feed(chunk)
        self.sha.update(chunk)

    def read_path(self, path: Path) -> None:
        """Feed a whole file from disk (never following a symlink)."""
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            while chunk := f.read(1 << 20):
                self.feed(chunk)


async def _upload_while_validating(
    ctx: Context, job: Job, path: Path, consume: Callable[[bytes], None]
) -> Attempt | None:
    """Upload a file that may fit one batch, validating the bytes as they are sent.

    Validation is the slow part on a fast link and the upload on a slow one; doing
    both in one pass costs about the larger of the two. Returns the attempt that now
    holds the uploaded file, or None when the file was not uploaded here (too big,
    uploaded before a restart, or the API is on hold: it is then validated from disk).
    """
    size = path.stat().st_size
    provider = ctx.provider(job.provider)
    if not provider.stages_input(size) or ctx.blocked(job.provider):
        return None
    if not 0 < size <= provider.cfg.limits.max_bytes_per_batch:
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
        att = await ctx.store.attempt(
            await _new_attempt(
                ctx, job.id, 0, job.input_path, durable=True, upload_started_at=ctx.clock()
            )
        )
    if att.upload_started_at is None or atts:
        await ctx.store.update_attempt(att.id, durable=True, upload_started_at=ctx.clock())
    file_id = await provider.stage(path, f"batchd-{att.id}.jsonl", Tap(consume))
    await ctx.store.update_attempt(att.id, "uploaded", job_id=job.id, file_id=file_id)
    return dataclasses.replace(att, file_id=file_id)


async def _adopt_lost_upload(ctx: Context, att: Attempt) -> None:
    """An upload started before a crash may have finished: find its file, or forget it."""
    assert att.upload_started_at is not None
    size = ctx.spool.path(att.input_path).stat().st_size
    provider = ctx.provider(att.provider)
    found = await provider.find_staged(f"batchd-{att.id}.jsonl", att.upload_started_at - 600, size)
    if found is not None:
        await ctx.store.update_attempt(att.id, "upload_adopted", file_id=found)


async def _discard(ctx: Context, att: Attempt | None) -> None:
    """Drop an upload that will not be used (invalid file, one that must be split, a
    duplicate, or one whose input changed meanwhile)."""
    if att is None:
        return
    await ctx.store.update_attempt(att.id, "abandoned", abandoned=1)
    if att.file_id:
        try:
            await ctx.provider(att.provider).delete_file(att.file_id)
        except ApiError as e:
            ctx.log.warning("delete_failed", job_id=att.job_id, file_id=att.file_id, error=str(e))


async def _decompress(ctx: Context, job: Job) -> Job:
    """A .jsonl.gz/.jsonl.zst input becomes processing/JOB--NAME.jsonl (streamed, temp
    name, fsync, rename); the compressed file goes once the job points at the new one."""
    src = ctx.spool.path(job.input_path)
    suffix = next(s for s in COMPRESSED if job.input_path.endswith(s))
    rel = job.input_path[: -len(suffix)] + SUFFIX
    dest = ctx.spool.path(rel)
    if not dest.exists():
        size = await asyncio.to_thread(pieces.decompress, src, dest)
        ctx.log.info("input_decompressed", job_id=job.id, bytes=size, format=suffix[7:])
    await ctx.store.update_job(job.id, "decompressed", {"from": job.input_path}, input_path=rel)
    src.unlink(missing_ok=True)
    return await ctx.store.job(job.id)


async def _duplicate(ctx: Context, job: Job, sha: str) -> Job | None:
    """An earlier job with the same content within [intake] duplicate_window, unless this
    one may pass (allowed per job, or a `submit --allow-duplicate` marker)."""
    window = ctx.cfg.intake.duplicate_window_seconds
    if window <= 0 or job.allow_duplicate:
        return None
    marker = ctx.spool.allow_marker(sha)
    if marker.exists():
        marker.unlink(missing_ok=True)
        await ctx.store.update_job(job.id, "duplicate_allowed", None, allow_duplicate=True)
        return None
    return await ctx.store.duplicate_of(job, sha, ctx.clock() - window)


async def _validate_job(ctx: Context, job: Job) -> None:
    if job.input_path.endswith(COMPRESSED):
        try:
            job = await _decompress(ctx, job)
        except ValueError as e:
            await _reject(ctx, job, [{"line": 0, "code": "invalid_compression", "message": str(e)}])
            return
    path = ctx.spool.path(job.input_path)
    why = _not_regular(path)
    if why:
        code = "unreadable" if why.startswith("cannot read") else "not_a_file"
        await _reject(ctx, job, [{"line": 0, "code": code, "message": why}])
        return
    before = fingerprint(path)
    provider = ctx.provider(job.provider)
    reader = _Reader(provider, configured(ctx.cfg.estimate, ctx.prices_of(job.provider).price))
    try:
        att = await _upload_while_validating(ctx, job, path, reader.feed)
        if att is None:
            await asyncio.to_thread(reader.read_path, path)
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
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM):
            msg = f"cannot read file: {(e.strerror or str(e)).lower()}"
            await _reject(ctx, job, [{"line": 0, "code": "unreadable", "message": msg}])
            return
        raise
    summary = reader.validator.finish()
    if not summary.ok:
        _check_unchanged(path, before)  # a truncated view of a file still being written
        ctx.metrics.validation_failures.inc()
        await _discard(ctx, att)
        problems = [
            {"line": p.line, "code": p.code, "message": p.message} for p in summary.problems
        ]
        await _reject(ctx, job, problems)
        return
    sha = reader.sha.hexdigest()
    dup = await _duplicate(ctx, job, sha)
    if dup is not None:
        await _discard(ctx, att)
        await _reject_duplicate(ctx, job, dup, sha)
        return
    rows, attempts, att = await _pieces(ctx, job, path, summary, att)
    try:
        _check_unchanged(path, before)
    except InputChanged:
        await _discard(ctx, att)
        raise
    reused = None
    if att is not None:
        fill = {"model": summary.model, "requests": summary.requests}
        reused = (att.id, {**fill, "est_tokens": summary.est_tokens})
    est = reader.estimator.finish()
    # Without a budget the job is admitted as it is validated; with one, the submit
    # loop decides (Submit._budget) before any of its batches may be created.
    admitted = {} if ctx.cfg.budget.enabled else _admission_values(ctx, est)
    await ctx.store.validated(
        job.id,
        rows,
        attempts,
        reused=reused,
        current=job,
        detail={
            "requests": summary.requests,
            "bytes": summary.bytes,
            "pieces": len(rows),
            "fingerprint": before,
        },
        endpoint=summary.endpoint,
        model=summary.model,
        requests=summary.requests,
        bytes=summary.bytes,
        est_tokens=summary.est_tokens,
        sha256=sha,
        input_fp=before,
        estimate=est.as_dict(),
        **admitted,
    )
    ctx.log.info(
        "job_validated",
        job_id=job.id,
        requests=summary.requests,
        pieces=len(rows),
        estimate_low=format_usd(est.cost_low, 4),
        estimate_high=format_usd(est.cost_high, 4),
        input_tokens=est.input_tokens,
    )
    if admitted:
        count_estimate(ctx, job.source, summary.model, est.cost_high, job.provider)


def _admission_values(ctx: Context, est: Estimate) -> dict[str, Any]:
    """Job columns that admit it now, reserving its high estimate."""
    high = est.cost_high
    return {
        "admitted_at": ctx.clock(),
        "reserved_nanos": None if isinstance(high, Unknown) else high,
    }


def count_estimate(
    ctx: Context,
    source: str,
    model: str | None,
    high: int | Unknown | None,
    provider: str | None = None,
) -> None:
    """An admitted job's high estimate counts in batchd_cost_usd_total{kind="estimated"}
    (`provider`: the job's provider NAME, None: the default)."""
    if isinstance(high, int):
        name = provider or ctx.providers.default_name
        ctx.metrics.cost.labels(name, model or "", source, "estimated").inc(high / NANOS_PER_USD)


def _high(job: Job) -> int | Unknown:
    """A job's high estimate (nano-dollars), or why it is unknown."""
    est = job.estimate or {}
    high = est.get("cost_high_nanousd")
    if isinstance(high, int):
        return high
    return Unknown(str(est.get("cost_unknown_reason") or "the job has no estimate"))


def _check_unchanged(path: Path, before: str) -> None:
    after = fingerprint(path)
    if after != before:
        raise InputChanged(f"{path.name} changed while it was read ({before} -> {after})")


async def _pieces(
    ctx: Context, job: Job, path: Path, summary: jsonl.Summary, att: Attempt | None
) -> tuple[list[Piece], list[dict[str, Any]], Attempt | None]:
    """The job's pieces (by its provider's limits) and the first attempt of each (piece 0
    may reuse `att`, the upload made while validating; otherwise it is discarded)."""
    piece_limits = ctx.provider(job.provider).piece_limits
    first = {"model": summary.model, "job_id": job.id}
    if (
        summary.requests <= piece_limits.max_requests
        and summary.bytes <= piece_limits.max_bytes
        and summary.embedding_inputs <= piece_limits.max_embedding_inputs
    ):
        piece = Piece(
            job.id, 0, job.input_path, summary.requests, summary.bytes, summary.est_tokens, False
        )
        if att is not None:  # piece 0's attempt, recorded by validated() below
            return [piece], [], att
        new = {
            **first,
            "id": str(ULID()),
            "piece": 0,
            "input_path": job.input_path,
            "requests": summary.requests,
            "est_tokens": summary.est_tokens,
        }
        return [piece], [new], None
    await _discard(ctx, att)
    out_dir = ctx.spool.processing / f"{job.id}.pieces"
    files = await asyncio.to_thread(
        pieces.split, path, out_dir, piece_limits, summary.embedding_inputs > 0
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
    attempts = [
        {
            **first,
            "id": str(ULID()),
            "piece": p.idx,
            "input_path": p.input_path,
            "requests": p.requests,
            "est_tokens": p.est_tokens,
        }
        for p in rows
    ]
    return rows, attempts, None


async def _reject_duplicate(ctx: Context, job: Job, dup: Job, sha: str) -> None:
    ctx.metrics.duplicates.inc()
    msg = (
        f"same content as job {dup.id} ({dup.name}, {dup.state}), dropped within "
        "[intake] duplicate_window; to submit it anyway: batchd submit --allow-duplicate"
    )
    await fail_job(
        ctx,
        job,
        {
            "reason": "duplicate_of",
            "duplicate_of": dup.id,
            "duplicate_name": dup.name,
            "sha256": sha,
            "message": msg,
        },
    )


async def _new_attempt(
    ctx: Context, job_id: str, piece: int, input_path: str, durable: bool = False, **extra: Any
) -> str:
    attempt_id = str(ULID())
    await ctx.store.add_attempt(attempt_id, job_id, piece, input_path, durable, **extra)
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


async def adopt(ctx: Context, att: Attempt, snap: Snapshot, how: str) -> None:
    """Record the batch an attempt got (created now, or found after an ambiguous create)."""
    job, now = await ctx.store.job(att.job_id), await ctx.store.attempt(att.id)
    late = _unwanted(job, now)
    provider = ctx.provider(job.provider)
    # A batch created while a cancel (or a failure) was being handled: record it so it
    # is cancelled, and collected with the job's partial results unless the job ended.
    await ctx.store.update_attempt(
        att.id,
        how,
        job_id=job.id,
        batch_id=snap.id,
        status=snap.status,
        raw_status=snap.raw_status,
        batch=snap.raw,
        batch_created_at=snap.created_at or ctx.clock(),
        abandoned=int(job.state in TERMINAL_JOB_STATES),
    )
    if snap.ended:  # found after it had already ended (a lost create, found late)
        ctx.wake_collect.set()
    else:
        ctx.new_batches.append(
            LiveBatch(
                att.id,
                job.id,
                snap.id,
                snap.status,
                0,
                0,
                0,
                snap.created_at or ctx.clock(),
                job.provider,
            )
        )
        ctx.wake_track.set()
    if late:
        ctx.log.warning("late_batch_cancelled", job_id=job.id, batch_id=snap.id)
        try:
            await provider.cancel(snap.id)
        except ApiError as e:
            ctx.log.warning("cancel_failed", job_id=job.id, batch_id=snap.id, error=str(e))
    ctx.metrics.batches_created.labels(provider.name).inc()
    ctx.metrics.drop_to_created.observe(max(0.0, ctx.clock() - job.created_at))
    ctx.log.info(
        "batch_created",
        job_id=job.id,
        piece=att.piece,
        batch_id=snap.id,
        provider=provider.name,
        how=how,
    )
    await sync_job(ctx, job.id)


def create_request(ctx: Context, job: Job, att: Attempt) -> Create:
    """What the provider needs to create (or find) the batch of one attempt."""
    extra = jobmeta.read(ctx.spool, job)  # {} unless the job came with metadata (HTTP)
    return Create(
        attempt_id=att.id,
        job_id=job.id,
        input_path=ctx.spool.path(att.input_path),
        file_id=att.file_id,
        requests=att.requests or 0,
        endpoint=job.endpoint,
        model=att.model or job.model,
        metadata={**ctx.cfg.batch.metadata, **extra, JOB_KEY: job.id},
    )


async def find_lost(ctx: Context, job: Job, att: Attempt, sent_at: float) -> Snapshot | None:
    """The batch an earlier create of this attempt (sent at `sent_at`) made, if the
    provider has it."""
    return await ctx.provider(job.provider).find(
        create_request(ctx, job, att), sent_at, ctx.store.batch_owned
    )


async def submit_attempt(ctx: Context, att: Attempt) -> None:
    """Stage the input (if needed) and create the batch of one attempt, adopting a lost
    create."""
    job = await ctx.store.job(att.job_id)
    assert job.endpoint is not None
    provider = ctx.provider(job.provider)
    if att.create_sent_at is not None:
        async with provider.serial():
            found = await find_lost(ctx, job, att, att.create_sent_at)
            if found:
                await adopt(ctx, att, found, "adopted")
                return
        if ctx.leases.shared and ctx.clock() < _create_answered_by(ctx, job, att.create_sent_at):
            # Another replica sent this create and lost its lease (or died): its request
            # may still be on its way. Wait for it rather than create a second batch.
            raise Transient(f"a create of attempt {att.id} may still be in flight")
    if att.file_id is None and att.upload_started_at is not None:
        await _adopt_lost_upload(ctx, att)
        att = await ctx.store.attempt(att.id)
    path = ctx.spool.path(att.input_path)
    staged = provider.stages_input(path.stat().st_size) if path.exists() else True
    needs_input = att.file_id is None or not staged
    if needs_input and not path.exists():
        what = "input" if att.input_path == job.input_path else f"piece {att.piece}"
        await fail_job(
            ctx,
            job,
            {
                "reason": "input_missing",
                "message": f"the {what} disappeared from processing/ before it was "
                "sent (files under processing/ belong to batchd)",
            },
        )
        return
    if att.file_id is None and staged:
        await ctx.store.update_attempt(att.id, durable=True, upload_started_at=ctx.clock())
        file_id = await provider.stage(path, f"batchd-{att.id}.jsonl")
        await ctx.store.update_attempt(att.id, "uploaded", job_id=job.id, file_id=file_id)
        # Cancelled or failed while this attempt was uploading?
        job, att = await ctx.store.job(att.job_id), await ctx.store.attempt(att.id)
    if _unwanted(job, att):
        return
    assert job.endpoint is not None
    if await _input_changed(ctx, job, att):
        return
    req = create_request(ctx, job, att)
    async with provider.serial():
        await ctx.leases.fence(f"attempt:{att.id}")  # still ours: no other replica creates it
        sent_at = ctx.clock()
        await ctx.store.update_attempt(att.id, durable=True, create_sent_at=sent_at)
        try:
            snap = await provider.create(req)
        except QuotaRefused as e:
            await _refused(ctx, job, att, e)
            return
        except Transient:
            # The batch may exist although we never saw the answer: look before retrying.
            ctx.metrics.retries.labels("create_unknown").inc()
            found = await find_lost(ctx, job, att, sent_at)
            if found is None:
                raise
            snap = found
        await adopt(ctx, att, snap, "created")


async def _refused(ctx: Context, job: Job, att: Attempt, e: QuotaRefused) -> None:
    """A create refused for a quota (Azure's token_limit_exceeded): nothing was created,
    so the same attempt waits (learning the limit) and tries again; admission keeps
    further pieces back meanwhile. After many refusals the job fails."""
    refusals = att.refusals + 1
    limit = e.limit or limit_from_message(e.message)
    if limit and att.model:
        await ctx.store.learn_limit(att.model, limit)
        ctx.admission_version += 1
    too_big = limit is not None and att.est_tokens > limit and refusals >= 3
    if too_big or refusals > MAX_REFUSALS:
        why = (
            f"piece {att.piece} needs ~{att.est_tokens} tokens but the enqueued-token limit "
            f"of {att.model} is {limit}; lower max_requests_per_batch or max_bytes_per_batch"
            if too_big
            else f"refused {refusals} times for the enqueued-token limit"
        )
        await fail_job(ctx, job, {"reason": "token_limit", "message": why})
        return
    delay = refusal_delay(ctx, refusals)
    ctx.metrics.retries.labels("token_limit").inc()
    ctx.log.warning(
        "token_limit_refused",
        job_id=job.id,
        piece=att.piece,
        model=att.model,
        limit=limit,
        at="create",
        retry_in=delay,
    )
    await ctx.store.update_attempt(
        att.id,
        "requeued",
        job_id=job.id,
        create_sent_at=None,
        refusals=refusals,
        not_before=ctx.clock() + delay,
    )
    ctx.wake_submit.set()


def _create_answered_by(ctx: Context, job: Job, sent_at: float) -> float:
    """When a create sent at `sent_at` has surely been answered (or given up)."""
    return sent_at + ctx.provider(job.provider).cfg.api.request_timeout_seconds + 5.0


async def _input_changed(ctx: Context, job: Job, att: Attempt) -> bool:
    """A writer still at the input after it was validated (where leases cannot tell):
    before any batch exists the job starts over, so a truncated view is never sent."""
    if att.input_path != job.input_path or job.input_fp is None:
        return False  # a piece or a remainder: batchd's own file
    try:
        now = fingerprint(ctx.spool.path(job.input_path))
    except FileNotFoundError:
        return False
    if now == job.input_fp:
        return False
    if any(a.batch_id for a in await ctx.store.attempts(job.id)):
        return False  # too late to start over; job.json will say it changed
    ctx.log.warning("input_changed", job_id=job.id, name=job.name, action="validating again")
    for a in await ctx.store.attempts(job.id):
        if a.open and a.file_id:
            await _discard(ctx, a)
    await ctx.store.revalidate(job.id, {"fingerprint": now})
    ctx.wake_submit.set()
    return True


async def advance(ctx: Context, job_id: str) -> None:
    """Take one queued/validating job to SUBMITTING with its pieces and first attempts."""
    job = await ctx.store.job(job_id)
    if job.reason is not None:  # failing was decided before a crash: finish it
        await fail_job(ctx, job, job.reason)
        return
    if job.state == JobState.QUEUED:
        job = await ctx.store.transition(job.id, JobState.VALIDATING, current=job)
    if job.state == JobState.VALIDATING:
        await _validate_job(ctx, job)
        if (await ctx.store.job(job_id)).cancel_requested:
            ctx.wake_collect.set()  # cancelled while queued: nothing to wait for now


async def _api_rejected(ctx: Context, job_id: str, e: InvalidRequest) -> None:
    """A 4xx for this job's request (not an access problem): the job fails with why."""
    job = await ctx.store.job(job_id)
    report = {"reason": "api_rejected", "message": e.message, "api_error": e.to_dict()}
    await fail_job(ctx, job, report)


@dataclass
class _Limits:
    """What admission decides on, per model: enqueued tokens and requests in flight and
    their limits (configured, or learned from the API's refusals)."""

    tokens: dict[str, int] = field(default_factory=dict)
    token_limits: dict[str, int] = field(default_factory=dict)
    requests: dict[str, int] = field(default_factory=dict)
    request_limits: dict[str, int] = field(default_factory=dict)

    def apply(self, model: str) -> bool:
        """True when a limit applies to `model`."""
        return model in self.token_limits or model in self.request_limits


def _merge(given: Mapping[str, int], learned: Mapping[str, int]) -> dict[str, int]:
    """Per model, the smaller of the configured and the learned limit."""
    out = dict(given)
    for model, limit in learned.items():
        out[model] = min(limit, out.get(model, limit))
    return out


class Submit:
    """The submit stage: a worker of `max_concurrent_submits` slots, fed with what is due."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.worker = Worker(ctx, "submit", ctx.cfg.batch.max_concurrent_submits, ctx.wake_submit)
        self._flight: dict[str, tuple[int, int]] = {}
        # Attempts being uploaded and created: not live in the store until their batch
        # exists, yet already counted against the limits.
        self._submitting: dict[str, Pending] = {}
        self._limits = _Limits()
        self._flight_at = float("-inf")
        self._version = ctx.admission_version
        self._gauged: set[str] = set()  # models whose in-flight gauges were set
        self._spend: Spend | None = None
        self._spend_at = float("-inf")
        self._spend_version = ctx.admission_version

    async def _admission(self, force: bool = False) -> _Limits:
        """Enqueued tokens and requests in flight and their limits, per model; refreshed at
        most once a second (at once after a limit was learned or the config reloaded)."""
        ctx = self.ctx
        now = ctx.clock()
        if self._version != ctx.admission_version:
            force, self._version = True, ctx.admission_version
        if force or now - self._flight_at >= _FLIGHT_TTL:
            self._flight = await ctx.store.in_flight()
            for key, p in list(self._submitting.items()):
                if self.worker.running(key):
                    self._took(p)  # (counted twice for a moment once its batch exists)
                else:
                    del self._submitting[key]
            adm = ctx.cfg.admission
            token_limits = _merge(adm.token_budgets, await ctx.store.learned_limits())
            request_limits = _merge(adm.request_limits, await ctx.store.learned_request_limits())
            self._limits = _Limits({}, token_limits, {}, request_limits)
            self._flight_at = now
            self._gauges()
        lim = self._limits
        lim.tokens = {m: t for m, (t, _) in self._flight.items()}
        lim.requests = {m: r for m, (_, r) in self._flight.items()}
        return lim

    def _gauges(self) -> None:
        m, lim = self.ctx.metrics, self._limits
        for model, limit in lim.token_limits.items():
            m.token_budget.labels(model).set(limit)
        for model, limit in lim.request_limits.items():
            m.request_limit.labels(model).set(limit)
        # A model with nothing in flight is absent from the snapshot: its gauges go to 0.
        for model in self._gauged | set(self._flight):
            tokens, requests = self._flight.get(model, (0, 0))
            m.tokens_in_flight.labels(model).set(tokens)
            if model in lim.request_limits:
                m.enqueued_requests.labels(model).set(requests)
        self._gauged |= set(self._flight)

    def _took(self, p: Pending) -> None:
        """An admitted attempt counts as in flight until the next refresh."""
        t, r = self._flight.get(p.model, (0, 0))
        self._flight[p.model] = (t + p.tokens, r + p.requests)

    async def choose(self, pending: list[Pending]) -> list[Pending]:
        """The due pending attempts admission lets through now, in order."""
        if not pending:
            return []
        lim = await self._admission()
        if not any(lim.apply(p.model) for p in pending):
            return pending  # no limit applies: oldest due first
        by_id = {p.id: p for p in pending}
        ids = admit(
            [
                Candidate(p.id, p.model, p.tokens, p.waiting_since, p.not_before, p.requests)
                for p in pending
            ],
            lim.tokens,
            lim.token_limits,
            self.ctx.clock(),
            request_limits=lim.request_limits,
            in_flight_requests=lim.requests,
        )
        return [by_id[i] for i in ids]

    # --- budgets: a job is admitted as a whole before any of its batches is created ---

    async def _committed(self, now: float) -> Spend:
        """Money held in the current day and month (refreshed every few seconds, at once
        after a reload or a job ended; jobs admitted meanwhile are added as they are)."""
        ctx = self.ctx
        tz = ctx.cfg.budget.timezone
        if (
            self._spend is None
            or self._spend_version != ctx.admission_version
            or now - self._spend_at >= _SPEND_TTL
        ):
            day0, _ = period_bounds(Period.DAY, now, tz)
            month0, _ = period_bounds(Period.MONTH, now, tz)
            rows = await ctx.store.budget_committed(day0, month0)
            committed = [
                Committed(day0 if today else month0, model, source, nanos)
                for model, source, today, nanos in rows
            ]
            self._spend = Spend.of(committed, now, tz)
            self._spend_at, self._spend_version = now, ctx.admission_version
        return self._spend

    async def _budget(self) -> float | None:
        """Admit the validated jobs the budgets let through, oldest first; the others wait
        (with why). Returns when a waiting job may fit by the calendar alone."""
        ctx = self.ctx
        jobs = await ctx.store.unadmitted_jobs(_BUDGET_BATCH)
        if not jobs:
            return None
        now = ctx.clock()
        budget = ctx.cfg.budget
        if budget.enabled and ctx.leases.shared:
            # Replicas: budgets are global, so one replica at a time admits against them
            # (two deciding at once could each spend what is left).
            fresh = ctx.leases.has_role("budget")
            if not await ctx.leases.role("budget"):
                return now + _BUDGET_ROLE_RETRY
            if not fresh:
                self._spend = None  # another replica may have admitted meanwhile
        spend = await self._committed(now) if budget.enabled else Spend()
        by_id = {j.id: j for j in jobs}
        costs = [JobCost(j.id, j.model or "", j.source, _high(j)) for j in jobs]
        until: float | None = None
        for cost, decision in decide_in_order(costs, spend, budget, now):
            job = by_id[cost.id]
            if isinstance(decision, Admit):
                high = cost.high if isinstance(cost.high, int) else None
                detail = {"reserved": format_usd(high, 4) if high is not None else None}
                if await ctx.store.admit_job(job.id, high, detail):
                    if high is not None and self._spend is not None and budget.enabled:
                        self._spend = self._spend.plus(cost.model, cost.source, high)
                    count_estimate(ctx, job.source, job.model, cost.high, job.provider)
                    if job.budget_wait:
                        ctx.log.info("budget_admitted", job_id=job.id, name=job.name)
                continue
            if decision.until is not None:
                until = decision.until if until is None else min(until, decision.until)
            if job.budget_wait != decision.reason:  # write on change
                await ctx.store.set_budget_wait(job.id, decision.reason)
                ctx.log.warning("budget_wait", job_id=job.id, name=job.name, reason=decision.reason)
        return until

    async def step(self) -> float | None:
        """Start due work in free slots; returns when the next pending attempt is due."""
        ctx, w = self.ctx, self.worker
        w.check()
        if ctx.stopping:
            return None
        window = w.limit + len(w.backoff)  # what runs or backs off, plus the free slots
        due = w.backoff.next_ready()
        now = ctx.clock()
        held_back = False
        rollover = await self._budget()
        # Work under way first: a validated job's batch is created before the next file
        # is validated, so a burst yields batches from the start, not after its last file.
        if w.free and not ctx.all_blocked:
            lim: _Limits | None = None
            if ctx.leases.shared:
                chosen, held_back = await self._claim_pending(now)
            else:
                lim = await self._admission()
                # With a limit, admission chooses among many; without, the oldest due do.
                limited = lim.token_limits or lim.request_limits
                pending = await ctx.store.due_pending(now, max(window, 200) if limited else window)
                candidates = [
                    p for p in pending if not w.busy(p.id) and not ctx.blocked(p.provider)
                ]
                chosen = await self.choose(candidates)
                held_back = len(chosen) < len(candidates)
            for p in chosen:
                item = ctx.leases.held(f"attempt:{p.id}", partial(self._submit, p))
                if w.free and w.start(p.id, p.job_id, item, partial(_api_rejected, ctx)):
                    self._took(p)
                    # Replicas count the attempts they lease as in flight in the claim.
                    if lim is not None and lim.apply(p.model):
                        self._submitting[p.id] = p
                elif not w.running(p.id):
                    await ctx.leases.release(f"attempt:{p.id}")
        if w.free:
            if ctx.leases.shared:
                leases = ctx.leases
                ids = await leases.claims.new_jobs(  # type: ignore[union-attr]
                    leases.owner, leases.cfg.lease_seconds, w.free
                )
                leases.hold([f"job:{i}" for i in ids])
            else:
                ids = await ctx.store.due_new_jobs(window)
            for job_id in ids:
                item = ctx.leases.held(f"job:{job_id}", partial(advance, ctx, job_id))
                started = w.start(job_id, job_id, item, partial(_api_rejected, ctx))
                if not started and not w.running(job_id):
                    await ctx.leases.release(f"job:{job_id}")
        if ctx.all_blocked:
            return min((t for t in (due, rollover) if t is not None), default=None)
        nxt = await ctx.store.next_pending_at(now)
        if held_back:  # a limit holds some back: look again when it may fit
            nxt = min(nxt or now + _FLIGHT_TTL, now + _FLIGHT_TTL)
        return min((t for t in (due, nxt, rollover) if t is not None), default=None)

    async def _claim_pending(self, now: float) -> tuple[list[Pending], bool]:
        """Replicas: claim the due attempts admission lets through, deciding in the claim's
        transaction on what every replica has in flight (see store/claims.py)."""
        ctx, w = self.ctx, self.worker
        # The limits (and the in-flight gauges) as one replica has them; what is in
        # flight is read again in the claim's transaction.
        lim = await self._admission()
        held_back = False

        def decide(pending: list[Pending], flight: dict[str, tuple[int, int]]) -> list[Pending]:
            nonlocal held_back
            pending = [p for p in pending if not ctx.blocked(p.provider)]  # held: they wait
            chosen = pending
            if any(lim.apply(p.model) for p in pending):
                by_id = {p.id: p for p in pending}
                cands = [
                    Candidate(p.id, p.model, p.tokens, p.waiting_since, p.not_before, p.requests)
                    for p in pending
                ]
                ids = admit(
                    cands,
                    {m: t for m, (t, _) in flight.items()},
                    lim.token_limits,
                    now,
                    request_limits=lim.request_limits,
                    in_flight_requests={m: r for m, (_, r) in flight.items()},
                )
                chosen = [by_id[i] for i in ids]
            held_back = len(chosen) < len(pending)
            return chosen[: w.free]

        leases = ctx.leases
        assert leases.claims is not None
        window = max(w.free, 200) if lim.token_limits or lim.request_limits else w.free
        chosen = await leases.claims.pending(
            leases.owner, leases.cfg.lease_seconds, now, window, decide
        )
        leases.hold([f"attempt:{p.id}" for p in chosen])
        return chosen, held_back

    async def _submit(self, p: Pending) -> None:
        att = await self.ctx.store.attempt(p.id)
        if self.ctx.leases.shared and att.phase != "pending":
            return  # another replica got there first (its lease ran out mid-way)
        await submit_attempt(self.ctx, att)

    async def reconcile(self) -> None:
        """At start-up: pieces left without an open attempt by an older batchd (a replica
        does this only for jobs no other replica works on)."""
        for job_id in await self.ctx.store.jobs_missing_attempts():
            key = f"job:{job_id}"
            if not await self.ctx.leases.take(key):
                continue
            try:
                await ensure_attempts(self.ctx, await self.ctx.store.job(job_id))
            finally:
                await self.ctx.leases.release(key)


async def run(ctx: Context, stage: Submit | None = None) -> None:
    """Loop: validate new jobs; submit admitted attempts, a few at a time."""
    stage = stage or Submit(ctx)
    await stage.reconcile()
    try:
        await loop(ctx, ctx.wake_submit, stage.step)
    finally:
        await stage.worker.drain(ctx.cfg.daemon.shutdown_grace_seconds if ctx.stopping else 0)
