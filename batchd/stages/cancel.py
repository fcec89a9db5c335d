"""`batchd cancel JOB` with no daemon running: carry out that one job's cancellation.

The caller holds the spool lock (no daemon starts meanwhile). Each round does for this
job what the stages do: cancel its remote batches (attempts not yet created are
dropped), refresh its batches, settle the ended ones, publish a decided failure, and
publish the job (`cancelled`, with the partial results) once it is collecting. The
inbox and every other job are left alone.
"""

from __future__ import annotations

import asyncio

from batchd import logs
from batchd.config import Config
from batchd.metrics import Metrics
from batchd.providers import Providers
from batchd.providers.errors import ApiError, InvalidRequest
from batchd.spool import Spool
from batchd.stages import Context, collect, sync_job
from batchd.stages.track import Tracker, budget, interval
from batchd.states import TERMINAL_JOB_STATES, JobState
from batchd.store import Job, Store

UNSUBMITTED = frozenset({JobState.QUEUED, JobState.VALIDATING})


async def _round(ctx: Context, tracker: Tracker, job_id: str) -> None:
    store = ctx.store
    await collect.cancel_requested(ctx)  # acts only on cancels already asked for
    tracker.live = {b.batch_id: b for b in await store.live_batches() if b.job_id == job_id}
    if tracker.live:
        await tracker.sweep(budget(len(tracker.live)))
    for att in await store.ended_attempts():
        if att.job_id != job_id:
            continue
        try:
            await collect.settle(ctx, att)
        except InvalidRequest as e:  # as the collect stage: the results are gone
            report = {"reason": "download_failed", **e.to_dict()}
            await collect.fail_job(ctx, await store.job(job_id), report)
    job = await store.job(job_id)
    if job.reason is not None and job.state not in TERMINAL_JOB_STATES:
        await collect.fail_job(ctx, job, job.reason)
    elif job.state in (JobState.SUBMITTING, JobState.TRACKING):
        await sync_job(ctx, job_id)
    job = await store.job(job_id)
    if job.state == JobState.COLLECTING and job.reason is None:
        await collect.finish(ctx, job)


async def drive(cfg: Config, store: Store, job_id: str, deadline: float) -> Job:
    """Cancel one job until it ends or `deadline` (event-loop time); returns it."""
    loop = asyncio.get_running_loop()
    metrics = Metrics(list(cfg.provider_configs()))
    async with Providers.build(cfg, metrics) as providers:
        ctx = Context(
            cfg, store, Spool(cfg.spool.dir, cfg.providers), providers, metrics, logs.get("batchd")
        )
        tracker = Tracker(ctx)
        while True:
            job = await store.job(job_id)
            if job.state in TERMINAL_JOB_STATES or job.state in UNSUBMITTED:
                return job
            try:
                await _round(ctx, tracker, job_id)
            except (ApiError, OSError) as e:
                ctx.log.warning("cancel_retry", job_id=job_id, error=str(e))
            job = await store.job(job_id)
            left = deadline - loop.time()
            if job.state in TERMINAL_JOB_STATES or left <= 0:
                return job
            await asyncio.sleep(min(interval(ctx) / 2, left))
