"""The facade's HTTP side: tenant authentication, OpenAI's error envelope, the routes.

Mounted on the daemon's app (`[http] listen`) when `[facade.tenants.*]` are configured.
Every request under /v1/files, /v1/uploads and /v1/batches is authenticated first
(`Authorization: Bearer KEY` -> a tenant, else 401); a tenant sees only its own objects
(another tenant's are a 404, exactly like ids that never existed). Every error there,
unknown routes and methods included, is `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import time
from collections.abc import Mapping
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler

from batchd.facade import stage, views
from batchd.facade.batches import BatchRoutes, ensure_job
from batchd.facade.errors import ApiError
from batchd.facade.files import FileRoutes
from batchd.facade.tenants import Keys, Tenant
from batchd.stages import Context
from batchd.store import Job
from batchd.store.objects import FacadeBatch, Objects

TENANT = web.RequestKey("facade_tenant", Tenant)
PREFIXES = ("/v1/files", "/v1/uploads", "/v1/batches")
_NO_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization "
    "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)


def is_facade_path(path: str) -> bool:
    """True for the routes the facade owns (the HTTP queue keeps /v1/jobs)."""
    return any(path == p or path.startswith(p + "/") for p in PREFIXES)


class Facade:
    """The OpenAI-compatible Files/Batches API of one daemon: its tenants, records, routes
    and stage."""

    def __init__(self, ctx: Context, tenants: Mapping[str, Tenant]) -> None:
        self.ctx = ctx
        self.cfg = ctx.cfg.facade
        self.tenants = dict(tenants)
        self.keys = Keys(tenants)
        self.objects = Objects(ctx.store)
        self.files_dir = ctx.spool.root / "files"
        self.uploads_dir = ctx.spool.root / "uploads"
        self._locks: dict[str, asyncio.Lock] = {}

    @staticmethod
    def tenant(req: web.Request) -> Tenant:
        """The tenant the request authenticated as."""
        return req[TENANT]

    def lock(self, tenant: str) -> asyncio.Lock:
        """Serialises one tenant's creates (a retried create must find the first one)."""
        return self._locks.setdefault(tenant, asyncio.Lock())

    # --- start-up -----------------------------------------------------------------------

    async def start(self) -> None:
        """Before serving and before the stages run: directories, leftovers of a crash
        (temp files, unrecorded files, dead uploads), batches whose job was never recorded."""
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.uploads_dir.mkdir(parents=True, exist_ok=True)
        removed = 0
        for e in list(os.scandir(self.files_dir)):
            file_id = e.name.removesuffix(".jsonl")
            if self._maybe_in_use(e.path):
                continue
            if e.name.startswith(".") or await self.objects.file(file_id) is None:
                os.unlink(e.path)
                removed += 1
        for e in list(os.scandir(self.uploads_dir)):
            if self._maybe_in_use(e.path):
                continue
            u = await self.objects.upload(e.name)
            if u is None or u.status != "pending":
                await asyncio.to_thread(shutil.rmtree, e.path, True)
                removed += 1
            else:  # a part cut off mid-write
                for p in list(os.scandir(e.path)):
                    if p.name.startswith("."):
                        os.unlink(p.path)
        if removed:
            self.ctx.log.info("facade_leftovers_removed", count=removed)
        for b in await self.objects.without_job():
            await ensure_job(self, b)
            self.ctx.log.info("facade_batch_job_recorded", batch_id=b.id, job_id=b.job_id)

    def _maybe_in_use(self, path: str) -> bool:
        """Replicas share the spool: what another replica wrote lately may not be
        recorded yet (left alone until [replicas] adopt_after_seconds have passed)."""
        if not self.ctx.leases.shared:
            return False
        try:
            age = time.time() - os.lstat(path).st_mtime
        except FileNotFoundError:
            return True
        return age < self.ctx.cfg.replicas.adopt_after_seconds

    async def run(self, ctx: Context) -> None:
        """The facade stage (see stage.py)."""
        await stage.run(self)

    # --- views --------------------------------------------------------------------------

    async def batch_view(self, b: FacadeBatch) -> dict[str, Any]:
        """The Batch object: frozen once settled, else derived from its job now."""
        if b.final is not None:
            return b.final
        store = self.ctx.store
        job: Job | None
        try:
            job = await store.job(b.job_id)
        except KeyError:
            job = None
        if job is None:
            return views.batch_object(b, None, [], [])
        atts = await store.attempts(job.id)
        # The history is read only when a timestamp comes from it (cancel, finalizing).
        need = job.cancel_requested or job.ended or job.state == "collecting"
        events = await store.events(job.id) if need else []
        return views.batch_object(b, job, atts, events)

    # --- HTTP ---------------------------------------------------------------------------

    def _authenticate(self, req: web.Request) -> Tenant:
        scheme, _, cred = req.headers.get("Authorization", "").partition(" ")
        cred = cred.strip()
        if scheme.lower() != "bearer" or not cred:
            raise ApiError(401, _NO_KEY)
        tenant = self.keys.tenant(cred)
        if tenant is None:
            self.ctx.log.warning("facade_unauthorized", method=req.method, path=req.path)
            raise ApiError(401, "Incorrect API key provided.", None, "invalid_api_key")
        return tenant

    def middleware(self) -> Any:
        """Authentication and OpenAI's error envelope for the facade's paths only."""
        log = self.ctx.log

        @web.middleware
        async def facade(req: web.Request, handler: Handler) -> web.StreamResponse:
            if not is_facade_path(req.path):
                return await handler(req)
            request_id = "req_" + secrets.token_hex(16)
            resp: web.StreamResponse
            try:
                req[TENANT] = self._authenticate(req)
                resp = await handler(req)
            except ApiError as e:
                resp = e.response()
            except web.HTTPException as e:
                if e.status < 400:
                    raise
                if e.status in (404, 405):
                    message = f"Invalid URL ({req.method} {req.path})"
                else:
                    message = e.reason
                resp = ApiError(e.status, message).response()
                if "Allow" in e.headers:
                    resp.headers["Allow"] = e.headers["Allow"]
            except (HttpProcessingError, ConnectionError) as e:
                log.warning("facade_upload_aborted", path=req.path, error=str(e))
                resp = ApiError(400, "The request body was cut off.").response()
            except Exception:
                log.exception("facade_handler_failed", method=req.method, path=req.path)
                msg = "The server had an error while processing your request (see batchd's log)."
                resp = ApiError(500, msg).response()
            resp.headers["x-request-id"] = request_id
            return resp

        return facade

    def mount(self, app: web.Application) -> None:
        """Add the routes and the middleware (inside the daemon's error middleware)."""
        app.middlewares.append(self.middleware())
        f, b = FileRoutes(self), BatchRoutes(self)
        r = app.router
        r.add_post("/v1/files", f.create)
        r.add_get("/v1/files", f.list)
        r.add_get("/v1/files/{id}", f.retrieve)
        r.add_delete("/v1/files/{id}", f.delete)
        r.add_get("/v1/files/{id}/content", f.content)
        r.add_post("/v1/uploads", f.create_upload)
        r.add_post("/v1/uploads/{id}/parts", f.add_part)
        r.add_post("/v1/uploads/{id}/complete", f.complete_upload)
        r.add_post("/v1/uploads/{id}/cancel", f.cancel_upload)
        r.add_post("/v1/batches", b.create)
        r.add_get("/v1/batches", b.list)
        r.add_get("/v1/batches/{id}", b.retrieve)
        r.add_post("/v1/batches/{id}/cancel", b.cancel)
