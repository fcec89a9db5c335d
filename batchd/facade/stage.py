"""The facade stage: settle batches whose job ended, deliver webhooks, expire what is due.

- **Settle**: when a facade batch's job has ended, its result files are recorded as the
  tenant's files (`output_file_id`, `error_file_id`: served from the job's result dir),
  the batch object is frozen with its final status, and the webhook owed is queued, all
  in one transaction. Until then the batch reads `finalizing`: `completed` only once the
  merged output is on disk and recorded.
- **Webhooks**: `batch.completed|failed|expired|cancelled` events, signed as OpenAI signs
  them (Standard Webhooks), POSTed to the tenant's `webhook_url`; a failed delivery is
  tried again with backoff for up to 3 days. Owed deliveries are rows, so a crash
  re-sends (at least once), never forgets.
- **Expiry**: files past `expires_after`, uploads not completed within the hour, and
  ended batches' records after `[retention] jobs_days`.

Level-triggered like every stage: woken when a job ends (`ctx.wake_facade`), otherwise
asleep until the next delivery or expiry is due.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import random
import shutil
from functools import partial
from typing import TYPE_CHECKING

import aiohttp
import orjson

from batchd.facade import views
from batchd.stages import Worker, loop
from batchd.store.objects import FacadeBatch, FacadeEvent, FacadeFile

if TYPE_CHECKING:
    from batchd.facade.app import Facade

STEP = 100
SWEEP_SECONDS = 3600.0
SLACK = 5.0  # seconds: a job's end committed just after the stage looked is still seen
GIVE_UP_SECONDS = 3 * 86400.0
DELIVERY_TIMEOUT = 10.0
DAY = 86400.0
_RESULTS = (("output.jsonl", "output"), ("errors.jsonl", "error"))


def sign(key: bytes, msg_id: str, timestamp: str, body: bytes) -> str:
    """The `webhook-signature` value: `v1,` + base64 HMAC-SHA256 of `{id}.{timestamp}.{body}`."""
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def event_body(ev: FacadeEvent) -> bytes:
    """The event as OpenAI sends it (`data.id` is the facade's batch id)."""
    return orjson.dumps(
        {
            "id": ev.id,
            "object": "event",
            "type": ev.type,
            "created_at": int(ev.created_at),
            "data": {"id": ev.batch_id},
        }
    )


class FacadeStage:
    """Due facade work, a bounded amount per step."""

    def __init__(self, fac: Facade, session: aiohttp.ClientSession) -> None:
        self.fac = fac
        self.ctx = fac.ctx
        self.session = session
        self.worker = Worker(fac.ctx, "facade", 16, fac.ctx.wake_facade)
        # Jobs that ended before this (minus SLACK) have been looked at; None: walk every
        # live batch first (start-up), as again every SWEEP_SECONDS.
        self.since: float | None = None
        self.next_sweep = 0.0

    # --- settling -----------------------------------------------------------------------

    def _result_files(self, b: FacadeBatch, rel: str | None, now: float) -> dict[str, FacadeFile]:
        """The job's non-empty output and error files as the tenant's files, by kind."""
        out: dict[str, FacadeFile] = {}
        if rel is None:
            return out
        expires = now + b.output_expires_after if b.output_expires_after else None
        for fname, kind in _RESULTS:
            try:
                size = self.ctx.spool.path(f"{rel}/{fname}").stat().st_size
            except FileNotFoundError:
                continue
            if size:
                out[kind] = FacadeFile(
                    id=views.new_id("file-"),
                    tenant=b.tenant,
                    filename=f"{b.id}_{kind}.jsonl",
                    purpose="batch_output",
                    bytes=size,
                    path=f"{rel}/{fname}",
                    created_at=now,
                    expires_at=expires,
                    batch_id=b.id,
                )
        return out

    async def settle(self, b: FacadeBatch) -> None:
        """Freeze one ended batch (see the module docstring)."""
        ctx, store = self.ctx, self.ctx.store
        now = ctx.clock()
        try:
            job = await store.job(b.job_id)
        except KeyError:
            job = None
        if job is None:
            return
        atts = await store.attempts(job.id)
        events = await store.events(job.id)
        status = views.final_status(job, atts)
        files = self._result_files(b, job.result_dir, now)
        out, err = files.get("output"), files.get("error")
        b = dataclasses.replace(
            b,
            output_file_id=out.id if out else None,
            error_file_id=err.id if err else None,
        )
        final = views.batch_object(b, job, atts, events, status)
        tenant = self.fac.tenants.get(b.tenant)
        event = None
        if tenant is not None and tenant.webhook_url:
            kind = f"batch.{status}"
            event = FacadeEvent(views.new_id("evt_"), b.tenant, b.id, kind, now, now, 0)
        if await self.fac.objects.settle(b, final, list(files.values()), event, now):
            ctx.metrics.facade_batches_ended.labels(status).inc()
            ctx.log.info(
                "facade_batch_ended",
                tenant=b.tenant,
                batch_id=b.id,
                job_id=b.job_id,
                status=status,
                completed=final["request_counts"]["completed"],
                failed=final["request_counts"]["failed"],
            )

    # --- webhooks -----------------------------------------------------------------------

    async def deliver(self, ev: FacadeEvent) -> None:
        """POST one event; on failure schedule it again (doubling, up to an hour)."""
        ctx, objs = self.ctx, self.fac.objects
        tenant = self.fac.tenants.get(ev.tenant)
        if tenant is None or not tenant.webhook_url or tenant.webhook_key is None:
            await objs.event_done(ev.id)  # the tenant or its webhook was removed
            return
        body = event_body(ev)
        stamp = str(int(ctx.clock()))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "batchd-webhooks",
            "webhook-id": ev.id,
            "webhook-timestamp": stamp,
            "webhook-signature": sign(tenant.webhook_key, ev.id, stamp, body),
        }
        error = None
        try:
            timeout = aiohttp.ClientTimeout(total=DELIVERY_TIMEOUT)
            async with self.session.post(
                tenant.webhook_url, data=body, headers=headers, timeout=timeout
            ) as r:
                await r.read()
                if not 200 <= r.status < 300:
                    error = f"HTTP {r.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            error = f"{type(e).__name__}: {e}"
        now = ctx.clock()
        log = dict(tenant=ev.tenant, batch_id=ev.batch_id, event_type=ev.type, webhook_id=ev.id)
        if error is None:
            await objs.event_done(ev.id)
            ctx.metrics.facade_webhooks.labels("delivered").inc()
            ctx.log.info("facade_webhook_delivered", **log)
        elif now - ev.created_at > GIVE_UP_SECONDS:
            await objs.event_done(ev.id)
            ctx.metrics.facade_webhooks.labels("dropped").inc()
            ctx.log.error("facade_webhook_dropped", error=error, tries=ev.tries + 1, **log)
        else:
            delay = min(3600.0, 2.0 ** min(ev.tries, 12)) * random.uniform(0.5, 1.0)
            await objs.event_later(ev.id, now + delay)
            ctx.metrics.facade_webhooks.labels("failed").inc()
            ctx.log.warning("facade_webhook_failed", error=error, retry_in=round(delay, 1), **log)

    # --- expiry -------------------------------------------------------------------------

    async def _expire(self, now: float) -> bool:
        """Expired files, uploads and old batch records; True when more are due now."""
        ctx, objs, spool = self.ctx, self.fac.objects, self.ctx.spool
        files = await objs.expired_files(now, STEP)
        for f in files:
            await objs.delete_file(f.id)
            spool.path(f.path).unlink(missing_ok=True)
            ctx.log.info("facade_file_expired", tenant=f.tenant, file_id=f.id)
        uploads = await objs.expired_uploads(now, STEP)
        for u in uploads:
            if await objs.end_upload(u.id, "expired", None):
                await asyncio.to_thread(shutil.rmtree, self.fac.uploads_dir / u.id, True)
        more = len(files) == STEP or len(uploads) == STEP
        days = ctx.cfg.retention.jobs_days
        if days > 0:
            old = await objs.expired_batches(now - days * DAY, STEP)
            await objs.delete_batches(old)
            more |= len(old) == STEP
        return more

    # --- the loop -----------------------------------------------------------------------

    async def step(self) -> float | None:
        """Settle, deliver, expire; returns when something is due next (replicas: only
        the one holding the role; the HTTP routes are served by every replica)."""
        ctx, objs = self.ctx, self.fac.objects
        self.worker.check()
        if ctx.stopping:
            return None
        if not await ctx.leases.role("facade"):
            self.since = None  # a takeover starts with a full sweep
            return ctx.clock() + ctx.leases.renew_every
        now = ctx.clock()
        if self.since is None or now >= self.next_sweep:
            ended = await objs.to_settle(STEP)
            if len(ended) < STEP:
                self.since, self.next_sweep = now - SLACK, now + SWEEP_SECONDS
        else:
            found = await objs.ended_since(self.since, STEP)
            ended = [b for b, _ in found]
            mark = found[-1][1] if len(found) == STEP else now
            self.since = max(self.since, mark - SLACK)
        for b in ended:
            await self.settle(b)
        for ev in await objs.due_events(now, STEP):
            if not self.worker.free:
                break
            self.worker.start(ev.id, "-", partial(self.deliver, ev))
        more = len(ended) == STEP or await self._expire(now)
        if more and not ctx.stopping:
            return ctx.clock()
        # A delivery due now but not started (every slot busy, or in flight) is started
        # when a slot frees: the worker wakes the stage.
        event_at = await objs.next_event_at()
        due: list[float | None] = [
            event_at if event_at is not None and event_at > now else None,
            await objs.next_file_expiry(),
            await objs.next_upload_expiry(),
            max(self.next_sweep, now + 1.0),
        ]
        return min(t for t in due if t is not None)


async def run(fac: Facade) -> None:
    """Loop until shutdown; deliveries in flight get the grace period, then are cancelled
    (they are rows: sent again at the next start)."""
    ctx = fac.ctx
    async with aiohttp.ClientSession(trust_env=False) as session:
        stage = FacadeStage(fac, session)
        try:
            await loop(ctx, ctx.wake_facade, stage.step)
        finally:
            await stage.worker.drain(ctx.cfg.daemon.shutdown_grace_seconds if ctx.stopping else 0)
