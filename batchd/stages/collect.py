"""Collect stage: settle ended attempts (download their results; resubmit what can be
retried; requeue a token-limit refusal), then merge a finished job's results and
publish done/NAME or failed/NAME.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
from functools import partial
from pathlib import Path
from typing import Any

import orjson
from ulid import ULID

from batchd import pieces
from batchd.admission import limit_from_message, request_limit_from_message
from batchd.prices import NANOS_PER_USD, Unknown, format_usd
from batchd.providers import Provider
from batchd.providers.base import ResultFile, Snapshot, Verdict, usage_dict
from batchd.providers.errors import ApiError, InvalidRequest, Transient
from batchd.providers.http import Lines
from batchd.providers.openai import custom_id_of
from batchd.spool import fingerprint, fsync_dir, write_json
from batchd.stages import Backoff, Context, guarded, loop, sync_job
from batchd.states import TERMINAL_JOB_STATES, JobState, is_terminal_status
from batchd.store import Attempt, Job
from batchd.usage import AttemptTally, Usage

__all__ = ["custom_id_of", "fail_job", "finish", "publish", "run", "settle"]

_USAGE_KEYS = (
    ("input_tokens",),
    ("input_tokens_details", "cached_tokens"),
    ("output_tokens",),
    ("output_tokens_details", "reasoning_tokens"),
    ("total_tokens",),
)


def sum_usage(batches: list[dict[str, Any]]) -> dict[str, Any]:
    """Add up the `usage` objects of several batches."""
    total: dict[str, Any] = {
        "input_tokens": 0,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 0,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 0,
    }
    for b in batches:
        usage = b.get("usage") or {}
        for path in _USAGE_KEYS:
            v: Any = usage
            for k in path:
                v = v.get(k) if isinstance(v, dict) else None
            if isinstance(v, int):
                if len(path) == 1:
                    total[path[0]] += v
                else:
                    total[path[0]][path[1]] += v
    return total


# --- publishing -----------------------------------------------------------------------


async def publish(
    ctx: Context,
    job: Job,
    kind: str,
    new_state: JobState,
    files: dict[str, Any],
    summary: dict[str, Any] | None = None,
) -> None:
    """Write files into the job's staging dir, move the input in, publish, end the job.

    `files` maps file names to JSON objects to write; `summary` (e.g. the first error)
    goes into the final event and log line. Idempotent: a crash at any point is
    finished by calling it again with the same arguments.
    """
    spool, store = ctx.spool, ctx.store
    async with ctx.publish_lock:
        job = await store.job(job.id)
        if job.state == new_state:
            return
        published = job.result_dir and spool.path(job.result_dir).exists()
        if not (published and not (spool.processing / f"{job.id}.d").exists()):
            staging = spool.staging(job.id)
            for fname, obj in files.items():
                write_json(staging / fname, obj)
            spool.adopt_input(job.input_path, staging)
            result_dir = job.result_dir
            if result_dir is None or not result_dir.startswith(kind + "/"):
                # The job's name is unique and was free on disk when it was claimed; a
                # directory made by hand since then gets NAME-2, … (never overwritten).
                taken: set[str] = set()
                while True:
                    result_dir = spool.choose_result_dir(kind, job.name, taken)
                    if not await store.result_dir_taken(result_dir):
                        break
                    taken.add(result_dir)
                await store.update_job(job.id, result_dir=result_dir)
            spool.publish(job.id, result_dir)
            job = await store.job(job.id)
        for extra in (f"{job.id}.pieces", f"{job.id}.parts"):
            shutil.rmtree(spool.processing / extra, ignore_errors=True)
        cost = await store.job_cost(job.id)
        detail = {"result_dir": job.result_dir, **(summary or {})}
        if cost["attempts"]:
            detail["cost"] = format_usd(cost["cost_nanos"], 6)
        job = await store.transition(
            job.id,
            new_state,
            str(new_state),
            detail,
            cost_nanos=cost["cost_nanos"],
            cost_unknown=cost["cost_unknown"],
        )
    _cost_ended(ctx, job)
    ctx.wake_facade.set()  # a facade batch of this job can be settled
    if (wake_source := ctx.wake_sources.get(job.source)) is not None:
        wake_source.set()  # its outcome is to be published
    ctx.metrics.jobs_finished.labels(new_state.value, ctx.provider(job.provider).name).inc()
    ctx.outcomes[new_state.value] += 1
    log = ctx.log.warning if new_state == JobState.FAILED else ctx.log.info
    log(
        "job_finished",
        job_id=job.id,
        name=job.name,
        state=str(new_state),
        result_dir=job.result_dir,
        requests=job.requests,
        completed=job.completed,
        failed=job.failed,
        **(summary or {}),
    )


def _cost_ended(ctx: Context, job: Job) -> None:
    """A job ended: how its actual cost compares with its high estimate; a budget may
    now have room (its actual cost replaced its reservation)."""
    high = (job.estimate or {}).get("cost_high_nanousd")
    if isinstance(high, int) and high > 0 and job.cost_nanos is not None and not job.cost_unknown:
        ctx.metrics.estimate_ratio.observe(job.cost_nanos / high)
    if ctx.cfg.budget.enabled:
        ctx.admission_version += 1
        ctx.wake_submit.set()


def _price_source(ctx: Context, job: Job) -> str:
    price = ctx.prices_of(job.provider).price(job.model or "")
    return price.reason if isinstance(price, Unknown) else price.source


def estimate_view(est: dict[str, Any] | None) -> dict[str, Any] | None:
    """The `estimate` of job.json: as made at intake, with the range in USD too."""
    if not est:
        return None
    low, high = est.get("cost_low_nanousd"), est.get("cost_high_nanousd")
    usd = {
        "cost_low_usd": format_usd(low, 6).lstrip("$") if isinstance(low, int) else None,
        "cost_high_usd": format_usd(high, 6).lstrip("$") if isinstance(high, int) else None,
    }
    return {**est, **usd}


def cost_view(cost: dict[str, Any], price_source: str = "") -> dict[str, Any]:
    """The `cost` of job.json: what the job's result lines billed, summed once each. With
    nothing priced (`unknown` says why) it is null, never $0; with part of it priced, the
    priced part beside `unknown`."""
    nanos = cost["cost_nanos"]
    if cost["cost_unknown"] and not nanos:
        nanos = None
    return {
        "usd": format_usd(nanos, 6).lstrip("$") if nanos is not None else None,
        "nanousd": nanos,
        "unknown": cost["cost_unknown"],
        "requests_billed": cost["requests"],
        "input_tokens": cost["input_tokens"],
        "cached_tokens": cost["cached_tokens"],
        "cache_write_tokens": cost["cache_write_tokens"],
        "output_tokens": cost["output_tokens"],
        "reasoning_tokens": cost["reasoning_tokens"],
        "price_source": price_source,
    }


def failure_report(job: Job, report: dict[str, Any]) -> dict[str, Any]:
    """report.json of a failed job."""
    return {"job_id": job.id, "name": job.name, **report}


async def fail_job(ctx: Context, job: Job, report: dict[str, Any]) -> None:
    """End a job in failed/NAME/: report.json, its input, and whatever results its
    finished pieces already produced (paid for; `batchd retry` skips them).

    The decision is recorded first, so a crash in between cannot forget it: the
    collect stage finishes every job that has a reason but has not ended.
    """
    async with ctx.fail_lock:
        job = await ctx.store.job(job.id)
        if job.state in TERMINAL_JOB_STATES:
            return
        report = failure_report(job, report)
        if job.reason != report:
            await ctx.store.update_job(
                job.id, "failing", {"reason": report.get("reason")}, reason=report
            )
            ctx.log.warning(
                "job_failed",
                job_id=job.id,
                name=job.name,
                reason=report.get("reason"),
                message=report.get("message"),
            )
        await _cancel_live(ctx, job.id)
        uploads = []
        for a in await ctx.store.attempts(job.id):
            if a.open:
                await ctx.store.update_attempt(a.id, "abandoned", abandoned=1)
                if a.file_id and a.batch_id is None:
                    uploads.append((a.file_id, "input"))
        if uploads and ctx.cfg.retention.delete_remote_files:
            await ctx.store.forget_remote_files(job.id, uploads)
            ctx.wake_retention.set()
        staging = ctx.spool.staging(job.id)
        if (ctx.spool.processing / f"{job.id}.parts").exists():
            await _merge(ctx, job, staging)
        summary = {"reason": report.get("reason"), "message": report.get("message")}
        cost = await ctx.store.job_cost(job.id)
        if cost["attempts"]:  # batches of other pieces ran: what they billed
            report = {**report, "cost": cost_view(cost, _price_source(ctx, job))}
        await publish(ctx, job, "failed", JobState.FAILED, {"report.json": report}, summary)


async def _cancel_live(ctx: Context, job_id: str) -> None:
    """Best effort: cancel a job's batches still running remotely."""
    for a in await ctx.store.attempts(job_id):
        if a.batch_id and a.open and not is_terminal_status(a.status) and a.status != "cancelling":
            try:
                await ctx.provider(a.provider).cancel(a.batch_id)
            except ApiError as e:
                ctx.log.warning("cancel_failed", job_id=job_id, batch_id=a.batch_id, error=str(e))


# --- settling one ended attempt -------------------------------------------------------


def _parts(ctx: Context, job_id: str) -> Path:
    d = ctx.spool.processing / f"{job_id}.parts"
    d.mkdir(exist_ok=True)
    return d


class _Sink(Lines):
    """Counts one result file's lines as they arrive and records what each says; starts
    over with the download (a retried one sends every byte again). Each line's billed
    usage goes into `tally`, which counts a request id once however often it is fed."""

    def __init__(self, provider: Provider, key: str, tally: AttemptTally) -> None:
        super().__init__(self._line)
        self.provider, self.key, self.tally = provider, key, tally
        self.reset()

    def reset(self) -> None:
        super().reset()
        self.succeeded: set[str] = set()
        self.other: list[tuple[str, Verdict]] = []
        self.ok: list[bool] = []  # per line of a "results" stream: a success?

    def _line(self, line: bytes) -> None:
        p = self.provider
        if self.key == "output":
            cid = p.result_id(line)
            self.succeeded.add(cid)
        else:
            cid, verdict = p.classify(line)
            good = verdict is Verdict.SUCCEEDED
            if good:
                self.succeeded.add(cid)
            else:
                self.other.append((cid, verdict))
            self.ok.append(good)
        p.tally_line(self.tally, cid, line)  # a failed line bills nothing, as a rule


def _usage_of(tally: AttemptTally) -> Usage:
    c = tally.charge()
    return Usage(
        c.input_tokens, c.cached_tokens, c.cache_write_tokens, c.output_tokens, c.reasoning_tokens
    )


async def _fetch(
    ctx: Context, provider: Provider, att: Attempt, rf: ResultFile, parts: Path, sink: _Sink
) -> None:
    """One result file on disk, verified, its lines recorded in `sink` (downloaded and
    verified before a restart: read from disk, never fetched twice)."""
    dest = parts / f"{att.id}.{rf.key}.jsonl"
    out_f, err_f = parts / f"{att.id}.output.jsonl", parts / f"{att.id}.errors.jsonl"
    if rf.key == "results" and not dest.exists() and out_f.exists() and err_f.exists():
        # Split before a restart: what the two halves say is what the stream said.
        for path, key in ((out_f, "output"), (err_f, "errors")):
            half = _Sink(provider, key, sink.tally)
            await asyncio.to_thread(_feed_file, path, half)
            sink.succeeded |= half.succeeded
            sink.other += half.other
            sink.count += half.count
    elif dest.exists():
        await asyncio.to_thread(_feed_file, dest, sink)
    else:
        await provider.download(rf, dest, sink)
    if sink.count < rf.min_lines:
        dest.unlink(missing_ok=True)
        ctx.metrics.retries.labels("short_download").inc()
        raise Transient(
            f"{rf.key} of {att.batch_id} has {sink.count} lines, the batch says {rf.min_lines}"
        )
    if rf.key == "results" and dest.exists():
        await asyncio.to_thread(pieces.split_lines, dest, sink.ok, out_f, err_f)
        dest.unlink()


async def _download(
    ctx: Context, att: Attempt, parts: Path, tally: AttemptTally
) -> tuple[Snapshot, pieces.Outcome, dict[str, Any] | None]:
    """Fetch an ended attempt's result files; returns the final batch, what its results
    say (counted and classified as the bytes arrive: no second pass), and the usage its
    lines report when the batch reports none. Each line's billed usage goes into
    `tally` (a request id once, however often it is read)."""
    assert att.batch_id is not None
    provider = ctx.provider(att.provider)
    snap = provider.snapshot(att.batch or {})
    if provider.results_pending(snap):
        snap = await provider.get(att.batch_id)
    outcome = pieces.Outcome()
    others: list[tuple[str, Verdict]] = []
    for rf in provider.result_files(snap):
        sink = _Sink(provider, rf.key, tally)
        await _fetch(ctx, provider, att, rf, parts, sink)
        outcome.succeeded |= sink.succeeded
        others += sink.other
    fsync_dir(parts)  # the renames are durable before the provider's copies may go
    sets = {
        Verdict.RETRYABLE: outcome.retryable,
        Verdict.FAILED: outcome.failed,
        Verdict.EXPIRED: outcome.expired,
        Verdict.CANCELED: outcome.canceled,
    }
    for cid, verdict in others:  # as pieces.read_outcome: a success wins
        if cid not in outcome.succeeded:
            sets[verdict].add(cid)
    # The batch reports no usage: what its lines billed stands in (job.json's usage).
    return snap, outcome, usage_dict(_usage_of(tally)) if snap.usage is None else None


def _feed_file(path: Path, lines: Lines) -> None:
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            lines.feed(chunk)
    lines.end()


def _remote_copies(ctx: Context, att: Attempt, snap: Snapshot) -> list[tuple[str, str]]:
    """The provider's copies of an ended attempt (its input, result files, the batch
    itself where it can be deleted), once the results are on disk."""
    if not ctx.cfg.retention.delete_remote_files:
        return []
    return ctx.provider(att.provider).remote_copies(snap, att.file_id)


def _count_lines(path: Path) -> int:
    return sum(1 for _ in pieces.iter_lines(path))


MAX_REFUSALS = 20


def refusal_delay(ctx: Context, refusals: int) -> float:
    """Seconds before trying again after the n-th enqueued-token refusal."""
    adm = ctx.cfg.admission
    return float(
        min(adm.max_refusal_backoff_seconds, adm.refusal_backoff_seconds * 2 ** (refusals - 1))
    )


async def _requeue_refused(
    ctx: Context,
    job: Job,
    att: Attempt,
    batch: dict[str, Any],
    msg: str,
    remote: list[tuple[str, str]],
) -> None:
    """A token_limit_exceeded refusal: learn the limit, back off, queue the piece again."""
    refusals = (
        sum(
            1
            for a in await ctx.store.attempts(att.job_id)
            if a.piece == att.piece and a.outcome == "requeue"
        )
        + 1
    )
    limit = limit_from_message(msg)
    req_limit = request_limit_from_message(msg)
    if limit and att.model:
        await ctx.store.learn_limit(att.model, limit)
        ctx.admission_version += 1
    if req_limit and att.model:
        await ctx.store.learn_request_limit(att.model, req_limit)
        ctx.admission_version += 1
    kind = "request" if req_limit is not None and limit is None else "token"
    too_big = refusals >= 3 and (
        (limit is not None and att.est_tokens > limit)
        or (req_limit is not None and (att.requests or 0) > req_limit)
    )
    if too_big or refusals > MAX_REFUSALS:
        if too_big and kind == "request":
            why = (
                f"piece {att.piece} has {att.requests} requests but the enqueued-request "
                f"limit of {att.model} is {req_limit}; lower [limits] max_requests_per_batch"
            )
        elif too_big:
            why = (
                f"piece {att.piece} needs ~{att.est_tokens} tokens but the enqueued-token "
                f"limit of {att.model} is {limit}; lower [limits] max_requests_per_batch or "
                "max_bytes_per_batch"
            )
        else:
            why = f"refused {refusals} times for the enqueued-{kind} limit"
        report = {"reason": f"{kind}_limit", "message": why, "batch_id": batch.get("id")}
        await ctx.store.settle_attempt(
            att.id,
            "failed",
            batch,
            piece_done=True,
            reason=failure_report(job, report),
            remote_files=remote,
        )
        return
    delay = refusal_delay(ctx, refusals)
    ctx.metrics.retries.labels(f"{kind}_limit").inc()
    ctx.log.warning(
        f"{kind}_limit_refused",
        job_id=att.job_id,
        piece=att.piece,
        model=att.model,
        limit=limit if kind == "token" else req_limit,
        retry_in=delay,
    )
    nxt = {
        "id": str(ULID()),
        "job_id": att.job_id,
        "piece": att.piece,
        "input_path": att.input_path,
        "model": att.model,
        "requests": att.requests,
        "est_tokens": att.est_tokens,
        "not_before": ctx.clock() + delay,
    }
    await ctx.store.settle_attempt(
        att.id,
        "requeue",
        batch,
        nxt,
        detail={f"{kind}_limit": limit or req_limit},
        remote_files=remote,
    )


def _limit_refusal(err: dict[str, Any]) -> bool:
    """The batch was refused for an enqueued-token or enqueued-request limit (the latter
    recognised by its message: its error code was never documented)."""
    if err.get("code") == "token_limit_exceeded":
        return True
    return request_limit_from_message(str(err.get("message") or "")) is not None


def first_error_text(err: dict[str, Any]) -> str:
    """`code: message (line N)` of one error object."""
    text = f"{err.get('code') or 'error'}: {err.get('message') or ''}".strip()
    return f"{text} (line {err['line']})" if err.get("line") else text


def _batch_failed(att: Attempt, snap: Snapshot) -> dict[str, Any]:
    """The report of a job whose batch the API failed, its first error in the message."""
    errors = list(snap.errors)
    first = errors[0] if errors else {}
    return {
        "reason": "batch_failed",
        "message": "the Batch API failed the batch"
        + (f": {first_error_text(first)}" if first else ""),
        "batch_id": snap.id,
        "raw_status": snap.raw_status,
        "piece": att.piece,
        "first_error": first or None,
        "errors": errors,
    }


async def settle(ctx: Context, att: Attempt) -> None:
    """Download an ended attempt's results and decide what comes next for its piece."""
    if ctx.leases.shared:  # as it is now that it is ours (a replica may have settled it)
        att = await ctx.store.attempt(att.id)
        if att.phase != "ended":
            return
    await _settle(ctx, att)
    ctx.wake_retention.set()  # the provider's copies it made due for deletion, if any


async def _settle(ctx: Context, att: Attempt) -> None:
    job = await ctx.store.job(att.job_id)
    parts = _parts(ctx, job.id)
    tally = AttemptTally(ctx.prices_of(att.provider).price(att.model or job.model or ""))
    snap, outcome, usage = await _download(ctx, att, parts, tally)
    remote = _remote_copies(ctx, att, snap)
    await _decide(ctx, job, att, snap, outcome, usage, _charge(ctx, job, att, tally), remote)


async def _decide(
    ctx: Context,
    job: Job,
    att: Attempt,
    snap: Snapshot,
    outcome: pieces.Outcome,
    usage: dict[str, Any] | None,
    charge: dict[str, Any] | None,
    remote: list[tuple[str, str]],
) -> None:
    """Settle an attempt whose results are on disk: its piece is done, or resubmitted."""
    provider = ctx.provider(att.provider)
    key = provider.id_key
    parts = _parts(ctx, job.id)
    batch = snap.raw
    status = snap.status
    if status == "failed":
        errors = snap.errors
        if errors and _limit_refusal(errors[0]) and not job.cancel_requested:
            msg = str(errors[0].get("message") or "")
            await _requeue_refused(ctx, job, att, batch, msg, remote)
            await sync_job(ctx, job.id)
            return
        report = failure_report(job, _batch_failed(att, snap))
        await ctx.store.settle_attempt(
            att.id,
            "failed",
            batch,
            piece_done=True,
            reason=report,
            remote_files=remote,
            charge=charge,
        )
        _charged(ctx, charge)
        return  # the failure is published by the loop (fail_job), crash or not
    err_f = parts / f"{att.id}.errors.jsonl"
    try:
        asked = set(await asyncio.to_thread(pieces.custom_ids, ctx.spool.path(att.input_path), key))
    except FileNotFoundError:
        # Someone removed batchd's copy of the input: what came back is kept and the
        # piece ends here (nothing can be resubmitted or told missing without it).
        ctx.log.warning(
            "input_missing",
            job_id=job.id,
            piece=att.piece,
            path=att.input_path,
            action="results are kept; nothing of this piece is resubmitted",
        )
        await ctx.store.settle_attempt(
            att.id,
            status,
            batch,
            piece_done=True,
            detail={"input_missing": att.input_path},
            remote_files=remote,
            usage=usage,
            charge=charge,
        )
        _charged(ctx, charge)
        await sync_job(ctx, job.id)
        return
    missing = asked - outcome.seen()
    tries = sum(
        1
        for a in await ctx.store.attempts(job.id)
        if a.piece == att.piece and a.outcome != "requeue" and not a.abandoned
    )
    again = (outcome.again() | missing) & asked
    stop = job.cancel_requested or status == "cancelled"
    if again and not stop and tries < ctx.cfg.retry.max_attempts_per_piece:
        nxt_id = str(ULID())
        sub = await asyncio.to_thread(
            pieces.write_subset,
            ctx.spool.path(att.input_path),
            again,
            parts / f"{nxt_id}.input.jsonl",
            key,
        )
        if err_f.exists():  # those errors are superseded by the next attempt's results
            await asyncio.to_thread(pieces.filter_lines, err_f, err_f, again, key)
        ctx.metrics.retries.labels("expired" if status == "expired" else "request_failed").inc(
            len(again)
        )
        nxt = {
            "id": nxt_id,
            "job_id": job.id,
            "piece": att.piece,
            "input_path": str(sub.path.relative_to(ctx.spool.root)),
            "model": att.model,
            "requests": sub.requests,
            "est_tokens": sub.est_tokens,
        }
        await ctx.store.settle_attempt(
            att.id,
            "resubmit",
            batch,
            nxt,
            detail={"resubmitted": len(again)},
            remote_files=remote,
            usage=usage,
            charge=charge,
        )
    else:
        if missing and not stop:
            msg = "no result from the Batch API"
            with (parts / f"{att.id}.missing.jsonl").open("wb") as f:
                for cid in sorted(missing):
                    f.write(orjson.dumps(provider.missing_line(cid, msg)) + b"\n")
        await ctx.store.settle_attempt(
            att.id,
            status,
            batch,
            piece_done=True,
            remote_files=remote,
            usage=usage,
            charge=charge,
        )
    _charged(ctx, charge)
    await sync_job(ctx, job.id)


def _charge(ctx: Context, job: Job, att: Attempt, tally: AttemptTally) -> dict[str, Any] | None:
    """The charge row of an attempt's tally (None when its results billed nothing)."""
    c = tally.charge()
    if not c.requests:
        return None
    return {
        "provider": ctx.provider(att.provider).name,
        "model": att.model or job.model or "",
        "source": job.source,
        "requests": c.requests,
        "input_tokens": c.input_tokens,
        "cached_tokens": c.cached_tokens,
        "cache_write_tokens": c.cache_write_tokens,
        "output_tokens": c.output_tokens,
        "reasoning_tokens": c.reasoning_tokens,
        "cost_nanos": None if isinstance(c.cost, Unknown) else c.cost,
        "cost_unknown": c.cost.reason if isinstance(c.cost, Unknown) else None,
    }


def _charged(ctx: Context, charge: dict[str, Any] | None) -> None:
    """Count a settled attempt's charge in the cost metrics."""
    if charge is None:
        return
    m = ctx.metrics
    if charge["cost_nanos"] is None:
        m.cost_unpriced.labels(charge["provider"], charge["model"]).inc(charge["requests"])
        return
    labels = (charge["provider"], charge["model"], charge["source"], "actual")
    m.cost.labels(*labels).inc(charge["cost_nanos"] / NANOS_PER_USD)


# --- finishing a job ------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _input_file(ctx: Context, job: Job, staging: Path) -> Path:
    """Where the job's input is now: processing/, or already moved into its staging dir
    by a publish that a crash interrupted."""
    path = ctx.spool.path(job.input_path)
    return path if os.path.lexists(path) else staging / "input.jsonl"


async def _input_sha256(ctx: Context, job: Job, staging: Path) -> str | None:
    """The input's SHA-256, hashed now if not yet (submission leaves it to this stage,
    off the path to the batch); recorded before the input moves into the result."""
    if job.sha256 is not None:
        return job.sha256
    path = _input_file(ctx, job, staging)
    if not path.exists():
        return None
    sha = await asyncio.to_thread(_sha256, path)
    await ctx.store.update_job(job.id, sha256=sha)
    return sha


async def _merge(ctx: Context, job: Job, staging: Path) -> tuple[list[Attempt], int, int]:
    """Merge the collected attempts' results into staging/output.jsonl and errors.jsonl
    (absent when empty); returns the attempts and the completed and failed counts."""
    atts = [a for a in await ctx.store.attempts(job.id) if a.batch_id and a.collected]
    parts = _parts(ctx, job.id)
    outs = [p for a in atts if (p := parts / f"{a.id}.output.jsonl").exists()]
    errs = [
        p
        for a in atts
        for k in ("errors", "missing")
        if (p := parts / f"{a.id}.{k}.jsonl").exists()
    ]
    out_f, err_f = staging / "output.jsonl", staging / "errors.jsonl"
    await asyncio.to_thread(pieces.concat, outs, out_f)
    if ctx.cfg.output.order == "input":
        key = ctx.provider(job.provider).id_key
        order = await asyncio.to_thread(pieces.custom_ids, _input_file(ctx, job, staging), key)
        await asyncio.to_thread(pieces.reorder, out_f, order, out_f, key)
    failed = 0
    if errs:
        await asyncio.to_thread(pieces.concat, errs, err_f)
        failed = await asyncio.to_thread(_count_lines, err_f)
        if failed == 0:
            err_f.unlink()
    return atts, await asyncio.to_thread(_count_lines, out_f), failed


def attempt_usage(provider: Provider, a: Attempt) -> dict[str, Any] | None:
    """An attempt's usage: tallied from its result lines, else its batch's own."""
    if a.usage is not None:
        return a.usage
    return provider.snapshot(a.batch or {}).usage if a.batch else None


async def _input_notes(ctx: Context, job: Job, staging: Path) -> dict[str, Any]:
    """Warnings about the input for job.json: gone, or changed after it was submitted."""
    path = _input_file(ctx, job, staging)
    if not os.path.lexists(path):
        return {"input_missing": "input.jsonl was removed from processing/ while the job ran"}
    if job.input_fp and fingerprint(path) != job.input_fp:
        ctx.log.warning("input_changed_after_submit", job_id=job.id, name=job.name)
        return {"input_changed": "input.jsonl changed after it was validated and submitted"}
    return {}


async def finish(ctx: Context, job: Job) -> None:
    """Merge every attempt's results into done/NAME/ and end the job."""
    new_state = JobState.CANCELLED if job.cancel_requested else JobState.DONE
    staged = (ctx.spool.processing / f"{job.id}.d").exists()
    rd = job.result_dir
    if rd and rd.startswith("done/") and ctx.spool.path(rd).exists() and not staged:
        # Published just before a crash: building the staging dir again would make the
        # publish rename fail for ever. Only the end is left to record.
        await publish(ctx, job, "done", new_state, {})
        return
    staging = ctx.spool.staging(job.id)
    provider = ctx.provider(job.provider)
    atts, completed, failed = await _merge(ctx, job, staging)
    snaps = [provider.snapshot(a.batch or {}) for a in atts]
    usage = sum_usage([{"usage": attempt_usage(provider, a)} for a in atts])
    await ctx.store.update_job(job.id, completed=completed, failed=failed, usage=usage)
    m = ctx.metrics
    m.requests_completed.inc(completed)
    m.requests_failed.inc(failed)
    name = provider.name
    m.tokens.labels("input", name).inc(usage["input_tokens"])
    m.tokens.labels("cached", name).inc(usage["input_tokens_details"]["cached_tokens"])
    m.tokens.labels("output", name).inc(usage["output_tokens"])
    m.tokens.labels("reasoning", name).inc(usage["output_tokens_details"]["reasoning_tokens"])
    created = [s.created_at for s in snaps if s.created_at]
    if created:
        m.created_to_results.observe(max(0.0, ctx.clock() - min(created)))
    statuses = [s.status for s in snaps]
    raw = [s.raw_status for s in snaps]
    first = await asyncio.to_thread(pieces.first_record, staging / "errors.jsonl")
    summary: dict[str, Any] = {"first_error": provider.request_error(first)} if first else {}
    info = {
        "job_id": job.id,
        "name": job.name,
        "status": str(new_state),
        "provider": name,
        "kind": provider.kind,
        "batch_status": statuses[-1] if len(set(statuses)) == 1 else "mixed",
        "raw_status": raw[-1] if len(set(raw)) == 1 else "mixed",
        "batch_ids": [a.batch_id for a in atts],
        "pieces": len(await ctx.store.pieces(job.id)),
        "endpoint": job.endpoint,
        "model": job.model,
        "request_counts": {"total": job.requests or 0, "completed": completed, "failed": failed},
        **summary,
        "usage": usage,
        "estimate": estimate_view(job.estimate),
        "cost": cost_view(await ctx.store.job_cost(job.id), _price_source(ctx, job)),
        "sha256": await _input_sha256(ctx, job, staging),
        **await _input_notes(ctx, job, staging),
        "timestamps": {
            "claimed_at": job.created_at,
            "finished_at": ctx.clock(),
            "batches": [
                {
                    "id": s.id,
                    "status": s.status,
                    "raw_status": s.raw_status,
                    "created_at": s.created_at or None,
                    **{k: s.times.get(k) for k in _ENDS},
                }
                for s in snaps
            ],
        },
    }
    await publish(ctx, job, "done", new_state, {"job.json": info}, summary)


_ENDS = ("completed_at", "expired_at", "cancelled_at", "failed_at")


# --- cancellation ---------------------------------------------------------------------


async def cancel_requested(ctx: Context) -> float | None:
    """Act on `batchd cancel`: cancel remote batches, drop attempts not yet created.
    Returns when to look again (a create whose answer may still be on its way)."""
    due: float | None = None
    for job in await ctx.store.cancelling_jobs():
        key = f"job:{job.id}"
        if not await ctx.leases.take(key):
            continue  # another replica acts on it
        try:
            due = _earliest(due, await _cancel_one(ctx, job))
        finally:
            await ctx.leases.release(key)
    return due


def _earliest(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


async def _cancel_one(ctx: Context, job: Job) -> float | None:
    """Cancel one job's batches, drop its attempts not yet created; when to look again."""
    due: float | None = None
    for a in await ctx.store.attempts(job.id):
        if a.open and a.batch_id is None:
            timeout = ctx.provider(a.provider).cfg.api.request_timeout_seconds
            wait_until = (a.create_sent_at or 0) + timeout + 5
            if a.create_sent_at is not None and ctx.clock() < wait_until:
                due = min(due or wait_until, wait_until)
                continue  # its create may still be in flight: wait for its answer
            found = None
            if a.create_sent_at is not None:
                from batchd.stages.submit import find_lost

                async with ctx.provider(a.provider).serial():
                    found = await find_lost(ctx, job, a, a.create_sent_at)
            if found:
                await ctx.store.update_attempt(
                    a.id,
                    "adopted",
                    batch_id=found.id,
                    status=found.status,
                    raw_status=found.raw_status,
                    batch=found.raw,
                    batch_created_at=found.created_at or ctx.clock(),
                )
                (ctx.wake_collect if found.ended else ctx.wake_track).set()
            else:
                await ctx.store.update_attempt(a.id, "abandoned", abandoned=1)
    await _cancel_live(ctx, job.id)
    await sync_job(ctx, job.id)
    return due


BATCH = 100  # items of one kind handled per step (more: the step runs again at once)


class Collect:
    """The collect stage: every kind of due work, each item guarded on its own."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.backoff = Backoff(ctx.clock)
        self._cancel_due: float | None = None

    async def _download_failed(self, job_id: str, e: InvalidRequest) -> None:
        """The results are gone (404, 4xx): the job fails, keeping what it has."""
        job = await self.ctx.store.job(job_id)
        report = failure_report(job, {"reason": "download_failed", **e.to_dict()})
        await self.ctx.store.update_job(job_id, "failing", None, reason=report)

    async def _each(
        self, key: str, job_id: str, item: Any, on_invalid: Any = None, lease: str | None = None
    ) -> None:
        if not self.backoff.ready(key):
            return
        leases = self.ctx.leases
        if lease is not None and leases.shared:
            if not await leases.take(lease):
                return  # another replica works on it
            item = leases.held(lease, item)
        await guarded(self.ctx, "collect", self.backoff, key, job_id, item, on_invalid)

    async def _finish(self, job: Job) -> None:
        if self.ctx.leases.shared:  # as it is now that it is ours
            job = await self.ctx.store.job(job.id)
            if job.state != JobState.COLLECTING or job.reason is not None:
                return
        await finish(self.ctx, job)

    async def _cancels(self) -> None:
        self._cancel_due = await cancel_requested(self.ctx)

    async def step(self) -> float | None:
        """Do what is due; returns when something is due next (None: wait to be woken)."""
        ctx = self.ctx
        more = False
        if not ctx.all_blocked:
            await self._each("cancel", "-", self._cancels)
            ended = await ctx.store.ended_attempts(BATCH)
            # (ended attempts of a held provider wait; they must not make the step spin)
            more |= len(ended) == BATCH and not all(ctx.blocked(a.provider) for a in ended)
            for att in ended:
                if ctx.blocked(att.provider):
                    continue
                await self._each(
                    att.id,
                    att.job_id,
                    partial(settle, ctx, att),
                    self._download_failed,
                    lease=f"attempt:{att.id}",
                )
        failing = await ctx.store.failing_jobs(BATCH)
        more |= len(failing) == BATCH
        for job in failing:
            assert job.reason is not None
            item = partial(fail_job, ctx, job, job.reason)
            await self._each(job.id, job.id, item, lease=f"job:{job.id}")
        collecting = await ctx.store.collecting_jobs(BATCH)
        more |= len(collecting) == BATCH
        for job in collecting:
            await self._each(job.id, job.id, partial(self._finish, job), lease=f"job:{job.id}")
        if more and not ctx.stopping:
            return ctx.clock()
        due = [t for t in (self.backoff.next_ready(), self._cancel_due) if t is not None]
        return min(due, default=None)

    async def reconcile(self) -> None:
        """At start-up: jobs whose pieces all settled just before a crash move on."""
        for job in await self.ctx.store.settled_jobs():
            item = partial(sync_job, self.ctx, job.id)
            await self._each(job.id, job.id, item, lease=f"job:{job.id}")


async def run(ctx: Context) -> None:
    """Loop: act on cancels, settle ended attempts, publish decided failures, finish jobs
    whose pieces are all done. Each item backs off on its own when it fails."""
    stage = Collect(ctx)
    await stage.reconcile()
    await loop(ctx, ctx.wake_collect, stage.step)
