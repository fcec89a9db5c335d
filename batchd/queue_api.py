"""The HTTP queue: submit a JSONL file over HTTP, follow its job, fetch its results.

An upload is streamed to a hidden `inbox/.http-ID.jsonl.part` (intake ignores dot
files), counted against `[http] max_upload_bytes`, fsynced, hard-linked to
`inbox/NAME.jsonl` (never clobbering: `NAME-2.jsonl`, … when taken) and claimed at
once, so it takes exactly the path of a dropped file. Whatever goes wrong before
that, the partial file is removed: nothing partial is ever left in the spool.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from aiohttp import BodyPartReader, HttpVersion11, web
from aiohttp.http_exceptions import HttpProcessingError

from batchd import jobmeta
from batchd.config import parse_since
from batchd.provider_config import DEFAULT_PROVIDER
from batchd.spool import Claimed, Spool, enter_inbox
from batchd.spool import check_name as spool_check_name
from batchd.stages import Context
from batchd.states import TERMINAL_JOB_STATES, JobState
from batchd.store import Attempt, Job

METADATA_HEADER = "X-Batchd-Metadata"
_PART_PREFIX, _PART_SUFFIX = ".http-", ".jsonl.part"
_CHUNK = 1 << 16
_FIELD_MAX = 64 * 1024
_MAX_LIST = 1000

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Problem(Exception):
    """An error answered as `{"error": {"message", "code"}}` with an HTTP status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def response(self) -> web.Response:
        """The JSON error response."""
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return json_response(
            {"error": {"message": self.message, "code": self.code}}, self.status, headers
        )


def json_response(
    obj: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    """A JSON response encoded with orjson."""
    return web.Response(
        body=orjson.dumps(obj), status=status, headers=headers, content_type="application/json"
    )


def check_name(name: str) -> str:
    """A job NAME (see `spool.check_name`); a bad one is a 400."""
    try:
        return spool_check_name(name)
    except ValueError as e:
        raise Problem(400, "invalid_name", str(e)) from None


def parse_metadata(text: str, fixed: Mapping[str, str]) -> dict[str, str]:
    """Metadata given as JSON text (form field or header), checked against the API's rules."""
    try:
        return jobmeta.check(orjson.loads(text), fixed)
    except orjson.JSONDecodeError:
        raise Problem(400, "invalid_metadata", "metadata is not valid JSON") from None
    except jobmeta.InvalidMetadata as e:
        raise Problem(400, "invalid_metadata", str(e)) from None


def iso(t: float | None) -> str | None:
    """Unix seconds as an ISO-8601 UTC time (milliseconds), None stays None."""
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _current_input(spool: Spool, job: Job) -> Path | None:
    """Where the job's input file is now: processing/, its staging dir, or the result dir."""
    candidates = [spool.path(job.input_path), spool.processing / f"{job.id}.d" / "input.jsonl"]
    if job.result_dir:
        candidates.insert(0, spool.path(job.result_dir) / "input.jsonl")
    return next((p for p in candidates if os.path.lexists(p)), None)


def job_view(spool: Spool, job: Job, attempts: list[Attempt] | None = None) -> dict[str, Any]:
    """The JSON of a job: what a user can act on (current paths, the provider's batch ids,
    ISO times), none of batchd's bookkeeping."""
    result = spool.path(job.result_dir) if job.result_dir else None
    published = result is not None and result.is_dir()
    inp = _current_input(spool, job)
    reason = job.reason or {}
    view: dict[str, Any] = {
        "object": "job",
        "id": job.id,
        "name": job.name,
        "state": str(job.state),
        "source": job.source,
        "provider": job.provider or DEFAULT_PROVIDER,
        "endpoint": job.endpoint,
        "model": job.model,
        "request_counts": {"total": job.requests, "completed": job.completed, "failed": job.failed},
        "usage": job.usage,
        "bytes": job.bytes,
        "sha256": job.sha256,
        "cancel_requested": job.cancel_requested,
        "result_dir": job.result_dir if published else None,
        "paths": {
            "input": str(inp) if inp else None,
            "result_dir": str(result) if published else None,
        },
        "error": {"reason": reason.get("reason"), "message": reason.get("message")}
        if reason
        else None,
        "created_at": iso(job.created_at),
        "updated_at": iso(job.updated_at),
        "finished_at": iso(job.finished_at),
        # Money as nano-dollars (1e-9 USD): the estimate made at intake, the actual cost
        # once the job ended (null with cost_unknown when it could not all be priced).
        "estimate": job.estimate,
        "cost_nanousd": job.cost_nanos,
        "cost_unknown": job.cost_unknown,
        "budget_wait": job.budget_wait if job.admitted_at is None and not job.ended else None,
    }
    if attempts is not None:
        view["batch_ids"] = [a.batch_id for a in attempts if a.batch_id]
        view["batches"] = [_batch_view(a) for a in attempts if a.batch_id]
    return view


def _batch_view(a: Attempt) -> dict[str, Any]:
    """One remote batch of a job: batchd's status beside the provider's own."""
    b = a.batch or {}
    return {
        "id": a.batch_id,
        "piece": a.piece,
        "status": a.status,
        "raw_status": a.raw_status or a.status,
        "request_counts": {"total": a.total, "completed": a.completed, "failed": a.failed},
        "input_file_id": a.file_id,
        "output_file_id": b.get("output_file_id"),
        "error_file_id": b.get("error_file_id"),
        "created_at": iso(a.batch_created_at or a.created_at),
    }


def _unlink_quiet(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


async def _part_chunks(part: BodyPartReader) -> AsyncIterator[bytes]:
    while chunk := await part.read_chunk(_CHUNK):
        yield chunk


async def _read_field(part: BodyPartReader) -> str:
    data = b""
    async for chunk in _part_chunks(part):
        data += chunk
        if len(data) > _FIELD_MAX:
            raise Problem(400, "field_too_large", f"form field {part.name!r} is too large")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise Problem(400, "invalid_field", f"form field {part.name!r} is not UTF-8") from None


def _name_from_filename(filename: str | None) -> str | None:
    if not filename:
        return None
    try:
        return check_name(Path(filename).name)
    except Problem:
        return None


class _Upload:
    """What one POST /v1/jobs carried besides the file itself."""

    def __init__(self) -> None:
        self.name: str | None = None
        self.metadata: str | None = None
        self.filename: str | None = None
        self.size: int | None = None


class QueueApi:
    """Handlers of /v1/jobs; every route checks the bearer token first."""

    def __init__(self, ctx: Context, token: str) -> None:
        self.ctx = ctx
        self._token = token.encode()
        self.max_bytes = ctx.cfg.http.max_upload_bytes

    # --- plumbing -------------------------------------------------------------------------

    def _authorize(self, req: web.Request) -> None:
        scheme, _, cred = req.headers.get("Authorization", "").partition(" ")
        cred = cred.strip()
        if scheme.lower() != "bearer" or not cred:
            raise Problem(
                401, "unauthorized", "missing or malformed 'Authorization: Bearer' header"
            )
        if not hmac.compare_digest(cred.encode(), self._token):
            raise Problem(403, "forbidden", "invalid token")

    def guarded(self, handler: Handler) -> Handler:
        """Wrap a handler: token check first (a Problem becomes JSON in `web`'s middleware)."""

        async def wrapped(req: web.Request) -> web.StreamResponse:
            self._authorize(req)
            return await handler(req)

        return wrapped

    async def expect(self, req: web.Request) -> web.StreamResponse | None:
        """`Expect: 100-continue`: refuse a bad token or a too-large Content-Length before
        the client sends a byte of the body; else let it send."""
        try:
            self._authorize(req)
            self._check_length(req)
            if req.headers.get("Expect", "").lower() != "100-continue":
                raise Problem(417, "expectation_failed", "only 'Expect: 100-continue' is known")
        except Problem as p:
            resp = p.response()
            resp.force_close()  # the body was never sent: this connection is done
            return resp
        if req.version == HttpVersion11:
            await req.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            req.writer.output_size = 0
        return None

    def _check_length(self, req: web.Request) -> None:
        if req.content_length is not None and req.content_length > self.max_bytes:
            raise self._too_large()

    async def _job(self, req: web.Request) -> Job:
        ref = req.match_info["ref"]
        found = await self.ctx.store.find_jobs(ref)
        if not found:
            raise Problem(404, "not_found", f"no job matches {ref!r}")
        if len(found) > 1:
            ids = ", ".join(j.id for j in found[:5])
            raise Problem(400, "ambiguous", f"{ref!r} matches {len(found)} jobs: {ids}")
        return found[0]

    # --- POST /v1/jobs --------------------------------------------------------------------

    async def submit(self, req: web.Request) -> web.StreamResponse:
        """Stream the body into inbox/, claim it as a job, answer 202 with its id."""
        up = _Upload()
        up.name = req.match_info.get("name") or req.query.get("name")
        up.metadata = req.headers.get(METADATA_HEADER)
        provider = self._provider(req.query.get("provider"))
        fixed = self.ctx.cfg.batch.metadata
        if up.name is not None:
            check_name(up.name)  # fail before reading a byte of the body
        if up.metadata is not None:
            parse_metadata(up.metadata, fixed)
        self._check_length(req)
        part = self.ctx.spool.inbox / f"{_PART_PREFIX}{secrets.token_hex(8)}{_PART_SUFFIX}"
        try:
            if req.content_type == "multipart/form-data":
                try:
                    await self._receive_form(req, part, up)
                except ValueError as e:  # aiohttp's word for a malformed multipart body
                    raise Problem(400, "invalid_form", f"malformed multipart body: {e}") from None
            else:
                # The endpoint has one purpose: any other body is the JSONL file itself,
                # whatever it is labelled (curl --data-binary says form-urlencoded, -T
                # says nothing).
                up.size = await self._write(req.content.iter_chunked(_CHUNK), part)
            if not up.size:
                raise Problem(400, "empty_body", "the uploaded file is empty")
            name = check_name(up.name) if up.name is not None else None
            name = name or _name_from_filename(up.filename) or f"http-{secrets.token_hex(4)}"
            meta = parse_metadata(up.metadata, fixed) if up.metadata is not None else {}
            job = await self._enqueue(part, name, meta, up.size, provider)
        except (HttpProcessingError, ConnectionError) as e:
            # The client went away mid-upload; nobody reads this answer.
            _unlink_quiet(part)
            self.ctx.log.warning("upload_aborted", error=str(e))
            return Problem(400, "upload_aborted", "the upload was cut off").response()
        except BaseException:
            _unlink_quiet(part)
            raise
        location = f"/v1/jobs/{job.id}"
        return json_response(job_view(self.ctx.spool, job), 202, {"Location": location})

    def _too_large(self) -> Problem:
        return Problem(413, "too_large", f"the upload exceeds {self.max_bytes} bytes")

    async def _write(self, chunks: AsyncIterator[bytes], path: Path) -> int:
        """Stream chunks into a new file at `path`, fsynced; returns its size."""
        size = 0
        with path.open("xb") as f:
            async for chunk in chunks:
                size += len(chunk)
                if size > self.max_bytes:
                    raise self._too_large()
                f.write(chunk)
            f.flush()
            await asyncio.to_thread(os.fsync, f.fileno())
        return size

    async def _receive_form(self, req: web.Request, path: Path, up: _Upload) -> None:
        reader = await req.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise Problem(400, "invalid_form", "nested multipart is not supported")
            if part.name == "file":
                if up.size is not None:
                    raise Problem(400, "invalid_form", "more than one 'file' part")
                up.filename = part.filename
                up.size = await self._write(_part_chunks(part), path)
            elif part.name == "name":
                up.name = await _read_field(part)
            elif part.name == "metadata":
                up.metadata = await _read_field(part)
            else:
                await part.release()
        if up.size is None:
            raise Problem(400, "missing_file", "multipart/form-data needs a 'file' part")

    def _provider(self, name: str | None) -> str | None:
        """`?provider=NAME`: a configured provider (None: the default)."""
        if name is None or name == self.ctx.providers.default_name:
            return None
        if name not in self.ctx.spool.providers:
            known = ", ".join(sorted(self.ctx.providers))
            raise Problem(400, "unknown_provider", f"provider {name!r} is not configured ({known})")
        return name

    async def _enqueue(
        self, part: Path, name: str, meta: dict[str, str], size: int, provider: str | None
    ) -> Job:
        ctx = self.ctx
        # No await between placing and claiming: intake cannot take the file first,
        # so the job id is ours to answer with.
        if ctx.leases.shared:  # replicas: inbox/ is every replica's (see Spool.claim_as)
            claimed: Claimed | None = ctx.spool.claim_as(part, name, provider)
        else:
            inbox = ctx.spool.inbox / provider if provider else ctx.spool.inbox
            fname = enter_inbox(inbox, part, name)
            claimed = ctx.spool.claim(f"{provider}/{fname}" if provider else fname)
        if claimed is None:
            raise Problem(500, "internal", f"the upload of {name} vanished before it was claimed")
        if meta:
            jobmeta.write(ctx.spool, claimed.job_id, meta)
        job = await ctx.store.create_job(
            claimed.job_id, claimed.name, claimed.rel_path, "http", provider=provider
        )
        ctx.log.info(
            "job_claimed",
            job_id=job.id,
            name=job.name,
            source="http",
            bytes=size,
            provider=provider or ctx.providers.default_name,
        )
        ctx.wake_submit.set()
        return job

    # --- GET ------------------------------------------------------------------------------

    async def list_jobs(self, req: web.Request) -> web.StreamResponse:
        """Jobs, newest first; `state` (comma-separated), `since` (age, epoch or ISO),
        `limit`, and `after` (the `last_id` of the previous page) to page on."""
        q = req.query
        states: list[JobState] | None = None
        if q.get("state"):
            try:
                states = [JobState(s.strip()) for s in q["state"].split(",")]
            except ValueError:
                known = ", ".join(s.value for s in JobState)
                raise Problem(400, "invalid_state", f"state: one of {known}") from None
        since = _parse_since(q["since"]) if q.get("since") else None
        try:
            limit = int(q.get("limit", "100"))
        except ValueError:
            limit = 0
        if not 1 <= limit <= _MAX_LIST:
            raise Problem(400, "invalid_limit", f"limit: an integer 1..{_MAX_LIST}")
        before = None
        if q.get("after"):
            try:
                cursor = await self.ctx.store.job(q["after"])
            except KeyError:
                raise Problem(400, "invalid_after", "after: not the id of a job") from None
            before = (cursor.created_at, cursor.id)
        jobs = await self.ctx.store.list_jobs(states, since, limit + 1, before)
        page = [job_view(self.ctx.spool, j) for j in jobs[:limit]]
        return json_response(
            {
                "object": "list",
                "data": page,
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
                "has_more": len(jobs) > limit,
            }
        )

    async def show(self, req: web.Request) -> web.StreamResponse:
        """One job with its counts, batches (the provider's ids), metadata and paths."""
        job = await self._job(req)
        attempts = await self.ctx.store.attempts(job.id)
        return json_response(
            {
                **job_view(self.ctx.spool, job, attempts),
                "metadata": jobmeta.read(self.ctx.spool, job),
            }
        )

    async def output(self, req: web.Request) -> web.StreamResponse:
        """Stream done/NAME/output.jsonl."""
        return await self._result_file(req, "output.jsonl")

    async def errors(self, req: web.Request) -> web.StreamResponse:
        """Stream done/NAME/errors.jsonl."""
        return await self._result_file(req, "errors.jsonl")

    async def _result_file(self, req: web.Request, fname: str) -> web.StreamResponse:
        job = await self._job(req)
        # Only a published result dir is served: it appears complete, in one rename.
        if job.result_dir:
            result = self.ctx.spool.path(job.result_dir)
            path = result / fname
            if path.is_file():
                return web.FileResponse(path, headers={"Content-Type": "application/jsonl"})
            if result.is_dir():  # published without one: nothing failed (or succeeded)
                return web.Response(body=b"", content_type="application/jsonl")
        if job.state in TERMINAL_JOB_STATES:
            raise Problem(404, "not_found", f"job {job.id} ({job.state}) has no {fname}")
        raise Problem(404, "not_ready", f"job {job.id} is {job.state}; no {fname} yet")

    # --- POST /v1/jobs/{ref}/cancel -------------------------------------------------------

    async def cancel(self, req: web.Request) -> web.StreamResponse:
        """Ask the daemon to cancel a live job (its stages act on the flag); 409 once ended."""
        job = await self._job(req)
        if not await self.ctx.store.request_cancel(job.id):
            raise Problem(409, "job_ended", f"job {job.id} has already ended ({job.state})")
        self.ctx.wake_track.set()
        self.ctx.wake_collect.set()
        self.ctx.log.info("cancel_requested", job_id=job.id, source="http")
        job = await self.ctx.store.job(job.id)
        return json_response(job_view(self.ctx.spool, job), 202)


def _parse_since(text: str) -> float:
    try:
        return parse_since(text)
    except ValueError as e:
        raise Problem(400, "invalid_since", f"since: {e}") from None


def sweep_partials(ctx: Context) -> int:
    """Remove uploads cut off by a crash (the daemon holds the spool lock; replicas share
    it and leave alone what changed within [replicas] adopt_after_seconds: another
    replica may be receiving it); returns how many."""
    n = 0
    grace = ctx.cfg.replicas.adopt_after_seconds if ctx.leases.shared else -1.0
    for e in os.scandir(ctx.spool.inbox):
        if e.name.startswith(_PART_PREFIX) and e.name.endswith(_PART_SUFFIX):
            try:
                if time.time() - e.stat(follow_symlinks=False).st_mtime < grace:
                    continue
            except FileNotFoundError:
                continue
            _unlink_quiet(Path(e.path))
            n += 1
    return n


def mount(app: web.Application, ctx: Context, token: str) -> None:
    """Add the /v1/jobs routes (only called when a token is configured)."""
    n = sweep_partials(ctx)
    if n:
        ctx.log.info("partial_uploads_removed", count=n)
    q = QueueApi(ctx, token)
    submit = q.guarded(q.submit)
    for method, path in (("POST", "/v1/jobs"), ("PUT", "/v1/jobs"), ("PUT", "/v1/jobs/{name}")):
        # PUT is what `curl -T FILE URL` sends (to URL/FILE when URL ends in '/').
        app.router.add_route(method, path, submit, expect_handler=q.expect)
    app.router.add_get("/v1/jobs", q.guarded(q.list_jobs))
    app.router.add_get("/v1/jobs/{ref}", q.guarded(q.show))
    app.router.add_get("/v1/jobs/{ref}/output", q.guarded(q.output))
    app.router.add_get("/v1/jobs/{ref}/errors", q.guarded(q.errors))
    app.router.add_post("/v1/jobs/{ref}/cancel", q.guarded(q.cancel))
