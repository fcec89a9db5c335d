"""Collect stage: download results of ended batches and publish done/NAME or failed/NAME."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from batchd.api import ApiError, InvalidRequest
from batchd.spool import write_json
from batchd.stages import Context, wait_for
from batchd.states import JobState
from batchd.store import Attempt, Job

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


def _counts(batches: list[dict[str, Any]]) -> dict[str, int]:
    out = {"total": 0, "completed": 0, "failed": 0}
    for b in batches:
        rc = b.get("request_counts") or {}
        for k in out:
            out[k] += int(rc.get(k) or 0)
    return out


async def publish(
    ctx: Context, job: Job, kind: str, new_state: JobState, files: dict[str, Any]
) -> None:
    """Write files into the job's staging dir, move the input in, publish, end the job.

    `files` maps file names to JSON objects to write. Idempotent: a crash at any
    point is finished by calling it again with the same arguments.
    """
    spool, store = ctx.spool, ctx.store
    async with ctx.publish_lock:
        job = await store.job(job.id)
        if job.state == new_state:
            return
        if job.result_dir and not (spool.processing / f"{job.id}.d").exists():
            if spool.path(job.result_dir).exists():  # published before a crash
                await _end(ctx, job, new_state, files)
                return
        staging = spool.staging(job.id)
        for fname, obj in files.items():
            write_json(staging / fname, obj)
        spool.adopt_input(job.input_path, staging)
        result_dir = job.result_dir
        if result_dir is None or not result_dir.startswith(kind + "/"):
            taken = {j.result_dir for j in await store.jobs() if j.result_dir}
            result_dir = spool.choose_result_dir(kind, job.name, taken)
            await store.update_job(job.id, result_dir=result_dir)
        spool.publish(job.id, result_dir)
        job = await store.job(job.id)
        await _end(ctx, job, new_state, files)


async def _end(ctx: Context, job: Job, new_state: JobState, files: dict[str, Any]) -> None:
    detail = {"result_dir": job.result_dir}
    await ctx.store.transition(job.id, new_state, str(new_state), detail)
    ctx.metrics.jobs_finished.labels(new_state.value).inc()
    ctx.log.info(
        "job_finished",
        job_id=job.id,
        name=job.name,
        state=str(new_state),
        result_dir=job.result_dir,
    )


async def fail_job(ctx: Context, job: Job, report: dict[str, Any]) -> None:
    """End a job in failed/NAME/ with `report` as report.json (and its input)."""
    report = {"job_id": job.id, "name": job.name, **report}
    await ctx.store.update_job(job.id, "failing", {"reason": report.get("reason")}, reason=report)
    ctx.log.warning("job_failed", job_id=job.id, name=job.name, reason=report.get("reason"))
    await publish(ctx, job, "failed", JobState.FAILED, {"report.json": report})


def _concat(parts: list[Path], dest: Path) -> int:
    """Concatenate downloaded parts into `dest` (temp, fsync, rename); returns bytes."""
    if len(parts) == 1:
        parts[0].replace(dest)
        return dest.stat().st_size
    tmp = dest.with_name(f".{dest.name}.tmp")
    with tmp.open("wb") as out:
        for p in parts:
            with p.open("rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
        out.flush()
        os.fsync(out.fileno())
    tmp.replace(dest)
    for p in parts:
        p.unlink()
    return dest.stat().st_size


async def _download_attempt(ctx: Context, att: Attempt, staging: Path) -> dict[str, Any]:
    """Download one ended attempt's output and error files; returns the final batch."""
    batch = att.batch or {}
    assert att.batch_id is not None
    rc = batch.get("request_counts") or {}
    if (rc.get("completed") and not batch.get("output_file_id")) or (
        rc.get("failed") and not batch.get("error_file_id")
    ):
        # Just after `completed` the file ids have been seen missing: re-read once.
        batch = await ctx.api.get_batch(att.batch_id)
    for key, suffix in (("output_file_id", "output"), ("error_file_id", "errors")):
        file_id = batch.get(key)
        if file_id:
            await ctx.api.download(file_id, staging / f"{att.id}.{suffix}.jsonl")
    await ctx.store.update_attempt(att.id, "downloaded", collected=1, batch=batch)
    return batch


async def collect(ctx: Context, job: Job) -> None:
    """Bring a job whose batches all ended to done/, failed/ or cancelled."""
    attempts = [a for a in await ctx.store.attempts(job.id) if a.batch_id]
    staging = ctx.spool.staging(job.id)
    batches = []
    for att in attempts:
        if att.collected:
            batches.append(att.batch or {})
        else:
            batches.append(await _download_attempt(ctx, att, staging))
    last = batches[-1] if batches else {}
    status = last.get("status")
    if status == "failed":
        errors = (last.get("errors") or {}).get("data") or []
        await fail_job(
            ctx,
            job,
            {
                "reason": "batch_failed",
                "message": "the Batch API rejected the batch",
                "batch_id": last.get("id"),
                "errors": errors,
            },
        )
        return
    outputs = []
    for kind in ("output", "errors"):
        parts = [staging / f"{a.id}.{kind}.jsonl" for a in attempts]
        parts = [p for p in parts if p.exists()]
        dest = staging / f"{kind}.jsonl"
        if parts:
            _concat(parts, dest)
        elif kind == "output" and not dest.exists():
            dest.touch()
        outputs.append(dest)
    counts = _counts(batches)
    usage = sum_usage(batches)
    new_state = JobState.CANCELLED if status == "cancelled" else JobState.DONE
    await ctx.store.update_job(
        job.id, completed=counts["completed"], failed=counts["failed"], usage=usage
    )
    job = await ctx.store.job(job.id)
    m = ctx.metrics
    m.requests_completed.inc(counts["completed"])
    m.requests_failed.inc(counts["failed"])
    m.tokens.labels("input").inc(usage["input_tokens"])
    m.tokens.labels("cached").inc(usage["input_tokens_details"]["cached_tokens"])
    m.tokens.labels("output").inc(usage["output_tokens"])
    m.tokens.labels("reasoning").inc(usage["output_tokens_details"]["reasoning_tokens"])
    created = [float(b["created_at"]) for b in batches if b.get("created_at")]
    if created:
        m.created_to_results.observe(max(0.0, ctx.clock() - min(created)))
    info = {
        "job_id": job.id,
        "name": job.name,
        "status": str(new_state),
        "batch_status": status,
        "batch_ids": [a.batch_id for a in attempts],
        "endpoint": job.endpoint,
        "model": job.model,
        "request_counts": counts,
        "usage": usage,
        "sha256": job.sha256,
        "timestamps": {
            "claimed_at": job.created_at,
            "finished_at": ctx.clock(),
            "batches": [
                {
                    k: b.get(k)
                    for k in (
                        "id",
                        "created_at",
                        "completed_at",
                        "expired_at",
                        "cancelled_at",
                        "failed_at",
                    )
                }
                for b in batches
            ],
        },
    }
    await publish(ctx, job, "done", new_state, {"job.json": info})


async def run(ctx: Context, stop_when_idle: bool = False) -> None:
    """Loop: collect every job in COLLECTING; woken by the tracker."""
    while True:
        for job in await ctx.store.jobs([JobState.COLLECTING]):
            try:
                if job.reason and job.result_dir and job.result_dir.startswith("failed/"):
                    await publish(ctx, job, "failed", JobState.FAILED, {"report.json": job.reason})
                else:
                    await collect(ctx, job)
            except InvalidRequest as e:
                await fail_job(ctx, job, {"reason": "download_failed", **e.to_dict()})
            except (ApiError, OSError) as e:
                ctx.log.warning("collect_retry", job_id=job.id, error=str(e))
        await wait_for(ctx.wake_collect, ctx.cfg.batch.poll_interval_seconds)
