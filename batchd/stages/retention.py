"""Retention stage: nothing grows for ever. In small bounded steps it deletes

- the provider's copies of batch files (`[retention] delete_remote_files`): an input
  file once its batch has ended, output and error files once they are verified and
  fsynced in the spool (collect makes them due only then), with a metric and an event
  per deletion;
- finished jobs' rows and their events after `jobs_days`;
- done/NAME and failed/NAME directories after `results_days`;

and hands freed database pages back (incremental vacuum). With nothing due it wakes
once an hour, or when collect makes a deletion due.
"""

from __future__ import annotations

import asyncio
import shutil

from batchd.providers.errors import AccessDenied, ApiError, NotFound
from batchd.stages import Context, loop

STEP = 200  # rows / files per step
SWEEP_SECONDS = 3600.0
ROLE_RETRY_SECONDS = 10.0
_DAY = 86400.0


class Retention:
    """Due deletions, a few at a time."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    async def _remote(self) -> bool:
        """Delete due provider copies; True when more are due now."""
        ctx = self.ctx
        now = ctx.clock()
        due = await ctx.store.due_remote_files(now, STEP)
        if due:
            # The results these copies back up are recorded; make that record survive a
            # power cut before the copies go (one fsync for the whole step).
            await ctx.store.durable()
        for file_id, job_id, kind, tries, name in due:
            if ctx.stopping:
                return False
            if ctx.blocked(name):
                continue
            try:
                await ctx.provider(name).delete_remote(file_id, kind)
            except NotFound:
                pass  # already gone (expired, or deleted by someone else)
            except AccessDenied as e:
                await ctx.block(e)
                continue
            except KeyError:  # a provider no longer configured: its copies wait
                await ctx.store.remote_file_later(file_id, now + _DAY)
                continue
            except ApiError as e:
                delay = min(_DAY, 60.0 * 2 ** min(tries, 10))
                ctx.log.warning(
                    "remote_delete_failed", job_id=job_id, file_id=file_id, error=str(e)
                )
                await ctx.store.remote_file_later(file_id, now + delay)
                continue
            await ctx.store.remote_file_deleted(file_id, job_id, kind)
            ctx.metrics.remote_files_deleted.labels(kind).inc()
            ctx.log.info(
                "remote_file_deleted", job_id=job_id, file_id=file_id, kind=kind, provider=name
            )
        return len(due) == STEP and not all(ctx.blocked(d[4]) for d in due)

    async def _rows(self) -> bool:
        ctx = self.ctx
        days = ctx.cfg.retention.jobs_days
        if days <= 0:
            return False
        ids = await ctx.store.expired_jobs(ctx.clock() - days * _DAY, STEP)
        if ids:
            await ctx.store.delete_jobs(ids)
            await ctx.store.vacuum_step()
            ctx.metrics.retention_deleted.labels("jobs").inc(len(ids))
            ctx.log.info("jobs_deleted", count=len(ids), older_than_days=days)
        return len(ids) == STEP

    async def _results(self) -> bool:
        ctx = self.ctx
        days = ctx.cfg.retention.results_days
        if days <= 0:
            return False
        due = await ctx.store.expired_results(ctx.clock() - days * _DAY, STEP)
        for job_id, rel in due:
            path = ctx.spool.path(rel)
            await asyncio.to_thread(shutil.rmtree, path, True)
            await ctx.store.results_deleted(job_id)
            ctx.metrics.retention_deleted.labels("results").inc()
            ctx.log.info("results_deleted", job_id=job_id, result_dir=rel)
        return len(due) == STEP

    async def step(self) -> float | None:
        """One bounded round; returns when to come back (replicas: only the one holding
        the role runs retention; the others look again now and then)."""
        ctx = self.ctx
        if not await ctx.leases.role("retention"):
            return ctx.clock() + ROLE_RETRY_SECONDS
        if ctx.leases.claims is not None:
            await ctx.leases.claims.sweep()  # leases of replicas long dead
        more = False
        if not ctx.all_blocked:
            more |= await self._remote()
        more |= await self._results()
        more |= await self._rows()
        now = ctx.clock()
        if more and not ctx.stopping:
            return now
        nxt = await ctx.store.next_remote_file_at()
        sweep = now + SWEEP_SECONDS
        return sweep if nxt is None or ctx.all_blocked else min(max(nxt, now), sweep)


async def run(ctx: Context) -> None:
    """Loop: due deletions in bounded steps; otherwise sleep."""
    await loop(ctx, ctx.wake_retention, Retention(ctx).step)
