"""`/v1/batches`: one logical batch per create, done by one ordinary job.

A create records the batch (durably) before its job: the job's input is a hard link to
the tenant's file at processing/JOB--BATCH.jsonl, so the job takes exactly the path of a
dropped file (validated, split, held by admission, resubmitted, collected, kept). A
crash between the two is finished at start-up (`ensure_job`).

The SDK retries a create on timeouts, dropped connections and 5xx, and sends no
Idempotency-Key: an identical create (same input file, endpoint, window, metadata and
output expiry) within `[facade] dedupe_window` returns the batch already made. With an
`Idempotency-Key` header only the key counts; the same key with other parameters is a
409 the SDK does not retry.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web
from ulid import ULID

from batchd.facade import views
from batchd.facade.errors import ApiError, invalid, json_response, missing, not_found
from batchd.facade.files import expiry, json_body, parse_limit
from batchd.facade.tenants import Tenant
from batchd.jsonl import ENDPOINTS
from batchd.spool import fsync_dir
from batchd.stages.collect import fail_job
from batchd.store import Duplicate, NewJob
from batchd.store.objects import FacadeBatch, FacadeFile

if TYPE_CHECKING:
    from batchd.facade.app import Facade


def source(tenant: str) -> str:
    """The job's source: `facade:TENANT` (`batchd show`, `[budget.sources]` per tenant)."""
    return f"facade:{tenant}"


WINDOWS = ("24h",)
_ORDER = (
    "/v1/responses",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/completions",
    "/v1/moderations",
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/videos",
)
assert set(_ORDER) == ENDPOINTS
_FIRST_LINE_MAX = 64 * 1024 * 1024


def dedupe_key(
    input_file_id: str,
    endpoint: str,
    window: str,
    metadata: dict[str, str] | None,
    output_expires_after: float | None,
) -> str:
    """What makes two creates the same create (the tenant is compared beside it)."""
    canon = orjson.dumps(
        [input_file_id, endpoint, window, metadata or {}, output_expires_after],
        option=orjson.OPT_SORT_KEYS,
    )
    return hashlib.sha256(canon).hexdigest()


def _string(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if value is None:
        raise missing(key)
    if not isinstance(value, str):
        raise invalid(key, f"Invalid type for '{key}': expected a string.", "invalid_type")
    return value


def check_metadata(meta: Any) -> dict[str, str] | None:
    """OpenAI's rule: at most 16 pairs, keys <= 64 characters, values strings <= 512."""
    if meta is None:
        return None
    if not isinstance(meta, dict) or len(meta) > 16:
        msg = "Invalid 'metadata': expected an object with at most 16 properties."
        raise invalid("metadata", msg)
    for k, v in meta.items():
        if not k or len(k) > 64 or not isinstance(v, str) or len(v) > 512:
            msg = f"Invalid 'metadata.{k}': keys 1..64 characters, values strings <= 512."
            raise invalid("metadata", msg)
    return dict(meta)


def _first_url(path: Path) -> str | None:
    """The `url` of the file's first line (None when it cannot be read as a request)."""
    with path.open("rb") as f:
        head = b""
        while b"\n" not in head and len(head) < _FIRST_LINE_MAX:
            chunk = f.read(1 << 16)
            if not chunk:
                break
            head += chunk
    try:
        obj = orjson.loads(head.split(b"\n", 1)[0])
    except orjson.JSONDecodeError:
        return None
    url = obj.get("url") if isinstance(obj, dict) else None
    return url if isinstance(url, str) else None


def _link(src: Path, dest: Path) -> None:
    """`dest` becomes the same file as `src` (a hard link; a durable copy where links fail)."""
    try:
        os.link(src, dest)
    except FileExistsError:
        return
    except OSError:
        tmp = dest.with_name(f".{dest.name}.part")
        shutil.copyfile(src, tmp)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.rename(tmp, dest)


async def ensure_job(fac: Facade, b: FacadeBatch) -> None:
    """Give a recorded batch its job (idempotent: also finishes a create cut off by a crash)."""
    spool, store = fac.ctx.spool, fac.ctx.store
    rel = f"processing/{b.job_id}--{b.id}.jsonl"
    dest = spool.path(rel)
    if not os.path.lexists(dest):
        f = await fac.objects.file(b.input_file_id)
        src = spool.path(f.path) if f is not None else None
        if src is not None and src.is_file():  # else the job fails: input_missing
            await asyncio.to_thread(_link, src, dest)
            fsync_dir(spool.processing)
    new = NewJob(b.job_id, b.id, rel, source(b.tenant), allow_duplicate=True)
    try:
        await fac.objects.create_job(new, spool.dir_taken)
    except Duplicate:
        # Recorded meanwhile (a restarted intake adopted the link): make it ours.
        await store.job(b.job_id)
        await store.update_job(b.job_id, source=source(b.tenant), allow_duplicate=True)


class BatchRoutes:
    """Handlers of /v1/batches; the tenant is already authenticated."""

    def __init__(self, fac: Facade) -> None:
        self.fac = fac

    async def _own(self, req: web.Request) -> FacadeBatch:
        batch_id = req.match_info["id"]
        b = await self.fac.objects.batch(batch_id)
        if b is None or b.tenant != self.fac.tenant(req).name:
            raise not_found("batch", batch_id)
        return b

    async def create(self, req: web.Request) -> web.StreamResponse:
        """POST /v1/batches {input_file_id, endpoint, completion_window, metadata?,
        output_expires_after?}."""
        tenant = self.fac.tenant(req)
        body = await json_body(req)
        file_id = _string(body, "input_file_id")
        endpoint = _string(body, "endpoint")
        window = _string(body, "completion_window")
        if endpoint not in ENDPOINTS:
            msg = f"Invalid value: '{endpoint}'. Supported values are: {', '.join(_ORDER)}."
            raise invalid("endpoint", msg)
        if window not in WINDOWS:
            msg = f"Invalid value: '{window}'. Supported values are: '24h'."
            raise invalid("completion_window", msg)
        meta = check_metadata(body.get("metadata"))
        out_ttl = expiry(body.get("output_expires_after"), "output_expires_after")
        f = await self.fac.objects.file(file_id)
        if f is None or f.tenant != tenant.name or f.purpose != "batch":
            why = "not found" if f is None or f.tenant != tenant.name else "purpose is not 'batch'"
            raise invalid("input_file_id", f"Invalid 'input_file_id': '{file_id}'. File {why}.")
        idem = req.headers.get("Idempotency-Key")
        if idem is not None and not 0 < len(idem) <= 256:
            raise invalid("Idempotency-Key", "Idempotency-Key: 1..256 characters.")
        key = dedupe_key(file_id, endpoint, window, meta, out_ttl)
        async with self.fac.lock(tenant.name):
            found = await self._existing(tenant, key, idem)
            if found is not None:
                return json_response(await self.fac.batch_view(found))
            b = await self._make(tenant, f, endpoint, window, meta, out_ttl, key, idem)
        return json_response(await self.fac.batch_view(b))

    async def _existing(self, tenant: Tenant, key: str, idem: str | None) -> FacadeBatch | None:
        """The batch an identical create (or the same Idempotency-Key) already made."""
        objs, ctx = self.fac.objects, self.fac.ctx
        if idem is not None:
            found = await objs.by_key(tenant.name, idem)
            if found is not None and found.dedupe_key != key:
                raise ApiError(
                    409,
                    "This Idempotency-Key was already used with other parameters "
                    f"(batch {found.id}).",
                    "Idempotency-Key",
                    "idempotency_key_reused",
                )
        else:
            window = self.fac.cfg.dedupe_window_seconds
            if window <= 0:
                return None
            found = await objs.by_dedupe(tenant.name, key, ctx.clock() - window)
        if found is not None:
            ctx.metrics.facade_deduplicated.inc()
            ctx.log.info(
                "facade_create_deduplicated",
                tenant=tenant.name,
                batch_id=found.id,
                by="idempotency_key" if idem else "parameters",
            )
        return found

    async def _make(
        self,
        tenant: Tenant,
        f: FacadeFile,
        endpoint: str,
        window: str,
        meta: dict[str, str] | None,
        out_ttl: float | None,
        key: str,
        idem: str | None,
    ) -> FacadeBatch:
        ctx = self.fac.ctx
        b = FacadeBatch(
            id=views.new_id("batch_"),
            tenant=tenant.name,
            job_id=str(ULID()),
            input_file_id=f.id,
            endpoint=endpoint,
            completion_window=window,
            metadata=meta,
            output_expires_after=out_ttl,
            dedupe_key=key,
            idempotency_key=idem,
            created_at=ctx.clock(),
            status=None,
            output_file_id=None,
            error_file_id=None,
            final=None,
            ended_at=None,
        )
        await self.fac.objects.add_batch(b)
        await ensure_job(self.fac, b)
        ctx.log.info("facade_batch_created", tenant=tenant.name, batch_id=b.id, job_id=b.job_id)
        path = ctx.spool.path(f"processing/{b.job_id}--{b.id}.jsonl")
        url = await asyncio.to_thread(_first_url, path) if path.exists() else None
        if url is not None and url in ENDPOINTS and url != endpoint:
            # The daemon checks every line against the first one; this checks the first
            # against the endpoint asked for.
            problem = {
                "line": 1,
                "code": "url_mismatch",
                "message": f"url {url!r} differs from the batch endpoint {endpoint!r}",
            }
            report = {
                "reason": "invalid_input",
                "message": f"1 problem(s); first: line 1: url_mismatch: {problem['message']}",
                "problems": [problem],
            }
            await fail_job(ctx, await ctx.store.job(b.job_id), report)
        else:
            ctx.wake_submit.set()
        return b

    async def list(self, req: web.Request) -> web.StreamResponse:
        """GET /v1/batches: newest first; `limit` 1..100 (default 20), `after`."""
        limit = parse_limit(req.query.get("limit"), 20, 100)
        after = req.query.get("after") or None
        if after is not None and not (after.startswith("batch_") and len(after) <= 64):
            raise invalid("after", f"Invalid 'after': '{after}' is not a batch id.")
        found = await self.fac.objects.batches(self.fac.tenant(req).name, limit + 1, after)
        data = [await self.fac.batch_view(b) for b in found[:limit]]
        return json_response(views.page(data, len(found) > limit))

    async def retrieve(self, req: web.Request) -> web.StreamResponse:
        """GET /v1/batches/{id}."""
        return json_response(await self.fac.batch_view(await self._own(req)))

    async def cancel(self, req: web.Request) -> web.StreamResponse:
        """POST /v1/batches/{id}/cancel: the job's batches are cancelled, what finished is
        kept (cancelling -> cancelled)."""
        b = await self._own(req)
        view = await self.fac.batch_view(b)
        if view["status"] in views.TERMINAL or view["status"] == "finalizing":
            raise invalid("id", f"Cannot cancel a batch with status '{view['status']}'.", None)
        ctx = self.fac.ctx
        try:
            live = await ctx.store.request_cancel(b.job_id)
        except KeyError:  # its create is still being recorded
            raise ApiError(409, "The batch is being created; try again.", "id") from None
        if live:
            ctx.wake_track.set()
            ctx.wake_collect.set()
            ctx.log.info("cancel_requested", job_id=b.job_id, batch_id=b.id, source="facade")
        return json_response(await self.fac.batch_view(b))
