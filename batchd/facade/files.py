"""`/v1/files` and the Uploads API: a tenant's input files, kept under spool/files/, and the
batches' output and error files, served from their result dirs.

Bytes are streamed to a hidden temp name, fsynced, renamed into place, and only then
recorded; whatever goes wrong before that, the temp file is removed. Parts of an upload
live under spool/uploads/ID/ until it is completed (concatenated in the kernel where it
can) or cancelled, or its hour is up.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import BodyPartReader, web

from batchd.facade import views
from batchd.facade.errors import ApiError, invalid, json_response, missing, not_found
from batchd.spool import fsync_dir
from batchd.store.objects import FacadeFile, FacadeUpload, UploadPart

if TYPE_CHECKING:
    from batchd.facade.app import Facade

PURPOSES = ("batch",)  # what the facade stores (see the README for what it does not)
DAY = 86400
DEFAULT_FILE_TTL = 30 * DAY  # OpenAI: files with purpose batch expire after 30 days
UPLOAD_TTL = 3600  # an upload must be completed within the hour
MAX_PART_BYTES = 64 * 1024 * 1024
_CHUNK = 1 << 16
_FIELD_MAX = 64 * 1024


async def _chunks(part: BodyPartReader) -> AsyncIterator[bytes]:
    while chunk := await part.read_chunk(_CHUNK):
        yield chunk


async def write_stream(chunks: AsyncIterator[bytes], path: Path, limit: int, what: str) -> int:
    """Stream chunks into a new file at `path` (at most `limit` bytes), fsynced; its size."""
    size = 0
    with path.open("xb") as f:
        async for chunk in chunks:
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"{what} is larger than the limit of {limit} bytes.", what)
            f.write(chunk)
        f.flush()
        await asyncio.to_thread(os.fsync, f.fileno())
    return size


async def _field(part: BodyPartReader) -> str:
    data = b""
    async for chunk in _chunks(part):
        data += chunk
        if len(data) > _FIELD_MAX:
            raise invalid(part.name or "", f"form field {part.name!r} is too large")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise invalid(part.name or "", f"form field {part.name!r} is not UTF-8") from None


def expiry(spec: Any, param: str) -> float | None:
    """Seconds from `expires_after` ({anchor: "created_at", seconds: 3600..2592000})."""
    if spec is None:
        return None
    if not isinstance(spec, dict) or spec.get("anchor") != "created_at":
        raise invalid(f"{param}.anchor", f"Invalid '{param}.anchor': expected 'created_at'.")
    secs = spec.get("seconds")
    if isinstance(secs, str) and secs.isdigit():
        secs = int(secs)
    if isinstance(secs, bool) or not isinstance(secs, int) or not 3600 <= secs <= 30 * DAY:
        msg = f"Invalid '{param}.seconds': expected an integer in 3600..2592000."
        raise invalid(f"{param}.seconds", msg)
    return float(secs)


def _form_expiry(fields: dict[str, str]) -> float | None:
    """`expires_after` sent as form fields (`expires_after[anchor]`, `…[seconds]`)."""
    anchor = fields.get("expires_after[anchor]", fields.get("expires_after.anchor"))
    seconds = fields.get("expires_after[seconds]", fields.get("expires_after.seconds"))
    if anchor is None and seconds is None:
        return None
    return expiry({"anchor": anchor, "seconds": seconds}, "expires_after")


def _purpose(value: Any) -> str:
    if value is None:
        raise missing("purpose")
    if value not in PURPOSES:
        msg = f"Invalid value for 'purpose': {value!r}. batchd stores batch input files only."
        raise invalid("purpose", msg)
    return str(value)


async def json_body(req: web.Request) -> dict[str, Any]:
    """The request's JSON object, or a 400 in OpenAI's words."""
    try:
        data = orjson.loads(await req.read())
    except orjson.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        raise ApiError(
            400,
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly.)",
        )
    return data


def _concat(parts: list[Path], dest: Path, md5: bool) -> str | None:
    """Concatenate parts into `dest` (fsynced); their MD5 when asked."""
    digest = hashlib.md5(usedforsecurity=False) if md5 else None
    with dest.open("xb") as out:
        for p in parts:
            with p.open("rb") as src:
                if digest is None:
                    try:
                        while os.copy_file_range(src.fileno(), out.fileno(), 1 << 30):
                            pass
                        continue
                    except OSError:  # not between these files: copy through Python
                        src.seek(0)
                while chunk := src.read(8 << 20):
                    if digest is not None:
                        digest.update(chunk)
                    out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest() if digest is not None else None


class FileRoutes:
    """Handlers of /v1/files and /v1/uploads; the tenant is already authenticated."""

    def __init__(self, fac: Facade) -> None:
        self.fac = fac
        self.dir = fac.files_dir
        self.uploads = fac.uploads_dir

    async def _own(self, req: web.Request, file_id: str) -> FacadeFile:
        f = await self.fac.objects.file(file_id)
        if f is None or f.tenant != self.fac.tenant(req).name:
            raise not_found("File object", file_id)
        return f

    def _place(self, tmp: Path, file_id: str) -> str:
        """Rename a finished temp file into spool/files/ (durably); its spool-relative path."""
        dest = self.dir / f"{file_id}.jsonl"
        os.rename(tmp, dest)
        fsync_dir(self.dir)
        return str(dest.relative_to(self.fac.ctx.spool.root))

    # --- /v1/files ----------------------------------------------------------------------

    async def create(self, req: web.Request) -> web.StreamResponse:
        """POST /v1/files (multipart: purpose, file, expires_after[...])."""
        tenant = self.fac.tenant(req)
        try:
            reader = await req.multipart()
        except (AssertionError, ValueError, KeyError):
            raise ApiError(400, "Expected a multipart/form-data body.") from None
        file_id = views.new_id("file-")
        tmp = self.dir / f".{file_id}.part"
        fields: dict[str, str] = {}
        size, filename = -1, "upload.jsonl"
        try:
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader):
                    raise ApiError(400, "nested multipart is not supported")
                if part.name == "file":
                    if size >= 0:
                        raise invalid("file", "more than one 'file' part")
                    filename = Path(part.filename or filename).name
                    limit = self.fac.cfg.max_file_bytes
                    size = await write_stream(_chunks(part), tmp, limit, "file")
                else:
                    fields[part.name or ""] = await _field(part)
            if size < 0:
                raise missing("file")
            purpose = _purpose(fields.get("purpose"))
            ttl = _form_expiry(fields) or DEFAULT_FILE_TTL
            path = self._place(tmp, file_id)
        except ValueError as e:  # aiohttp's word for a malformed multipart body
            tmp.unlink(missing_ok=True)
            raise ApiError(400, f"Malformed multipart body: {e}") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        now = self.fac.ctx.clock()
        f = FacadeFile(file_id, tenant.name, filename, purpose, size, path, now, now + ttl, None)
        await self.fac.objects.add_file(f)
        self.fac.ctx.log.info("facade_file_created", tenant=tenant.name, file_id=f.id, bytes=size)
        return json_response(views.file_object(f))

    async def list(self, req: web.Request) -> web.StreamResponse:
        """GET /v1/files: `purpose`, `limit` (1..10000), `order` (asc|desc), `after`."""
        q = req.query
        limit = parse_limit(q.get("limit"), 10_000, 10_000)
        order = q.get("order", "desc")
        if order not in ("asc", "desc"):
            raise invalid("order", "Invalid 'order': expected 'asc' or 'desc'.")
        after = q.get("after") or None
        files = await self.fac.objects.files(
            self.fac.tenant(req).name, q.get("purpose") or None, limit + 1, after, order == "asc"
        )
        data = [views.file_object(f) for f in files[:limit]]
        return json_response(views.page(data, len(files) > limit))

    async def retrieve(self, req: web.Request) -> web.StreamResponse:
        """GET /v1/files/{id}."""
        return json_response(views.file_object(await self._own(req, req.match_info["id"])))

    async def content(self, req: web.Request) -> web.StreamResponse:
        """GET /v1/files/{id}/content: the bytes, streamed from disk."""
        f = await self._own(req, req.match_info["id"])
        path = self.fac.ctx.spool.path(f.path)
        if not path.is_file():
            msg = f"The content of file '{f.id}' is no longer kept (retention)."
            raise ApiError(404, msg, "id")
        return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})

    async def delete(self, req: web.Request) -> web.StreamResponse:
        """DELETE /v1/files/{id}: the record and the bytes (a batch using an input file keeps
        its own link to it; an output file's bytes in the result dir go too)."""
        f = await self._own(req, req.match_info["id"])
        await self.fac.objects.delete_file(f.id)
        self.fac.ctx.spool.path(f.path).unlink(missing_ok=True)
        self.fac.ctx.log.info("facade_file_deleted", tenant=f.tenant, file_id=f.id)
        return json_response({"id": f.id, "object": "file", "deleted": True})

    # --- /v1/uploads --------------------------------------------------------------------

    async def _pending(self, req: web.Request) -> FacadeUpload:
        upload_id = req.match_info["id"]
        u = await self.fac.objects.upload(upload_id)
        if u is None or u.tenant != self.fac.tenant(req).name:
            raise not_found("Upload object", upload_id, "upload_id")
        if u.status != "pending":
            raise invalid("upload_id", f"Upload '{upload_id}' is already {u.status}.", None)
        return u

    async def create_upload(self, req: web.Request) -> web.StreamResponse:
        """POST /v1/uploads {filename, purpose, bytes, mime_type, expires_after?}."""
        body = await json_body(req)
        for key in ("filename", "purpose", "mime_type"):
            if body.get(key) is None:
                raise missing(key)
            if not isinstance(body[key], str):
                raise invalid(key, f"Invalid type for '{key}': expected a string.", "invalid_type")
        purpose = _purpose(body["purpose"])
        size = body.get("bytes")
        if size is None:
            raise missing("bytes")
        limit = self.fac.cfg.max_upload_bytes
        if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= limit:
            raise invalid("bytes", f"Invalid 'bytes': expected an integer in 1..{limit}.")
        ttl = expiry(body.get("expires_after"), "expires_after")
        now = self.fac.ctx.clock()
        u = FacadeUpload(
            views.new_id("upload_"),
            self.fac.tenant(req).name,
            Path(body["filename"]).name or "upload.jsonl",
            purpose,
            size,
            body["mime_type"],
            ttl,
            now,
            now + UPLOAD_TTL,
            "pending",
            None,
        )
        (self.uploads / u.id).mkdir(parents=True, exist_ok=True)
        await self.fac.objects.add_upload(u)
        return json_response(views.upload_object(u, None))

    async def add_part(self, req: web.Request) -> web.StreamResponse:
        """POST /v1/uploads/{id}/parts (multipart `data`, at most 64 MB)."""
        u = await self._pending(req)
        try:
            reader = await req.multipart()
        except (AssertionError, ValueError, KeyError):
            raise ApiError(400, "Expected a multipart/form-data body.") from None
        part_id = views.new_id("part_")
        folder = self.uploads / u.id
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{part_id}.part"
        size = -1
        try:
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader):
                    raise ApiError(400, "nested multipart is not supported")
                if part.name == "data" and size < 0:
                    size = await write_stream(_chunks(part), tmp, MAX_PART_BYTES, "data")
                else:
                    await part.release()
            if size < 0:
                raise missing("data")
            so_far = sum(p.bytes for p in await self.fac.objects.parts(u.id))
            if so_far + size > u.bytes:
                msg = f"The parts would total more than the {u.bytes} bytes of the upload."
                raise invalid("data", msg)
            os.rename(tmp, folder / part_id)
            fsync_dir(folder)
        except ValueError as e:
            tmp.unlink(missing_ok=True)
            raise ApiError(400, f"Malformed multipart body: {e}") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        now = self.fac.ctx.clock()
        await self.fac.objects.add_part(UploadPart(part_id, u.id, size, now))
        return json_response(
            {"id": part_id, "object": "upload.part", "created_at": int(now), "upload_id": u.id}
        )

    async def complete_upload(self, req: web.Request) -> web.StreamResponse:
        """POST /v1/uploads/{id}/complete {part_ids, md5?}: the parts, in that order, become
        one file."""
        u = await self._pending(req)
        body = await json_body(req)
        ids, md5 = body.get("part_ids"), body.get("md5")
        if ids is None:
            raise missing("part_ids")
        if (
            not isinstance(ids, list)
            or not ids
            or not all(isinstance(i, str) for i in ids)
            or len(set(ids)) != len(ids)
        ):
            raise invalid("part_ids", "Invalid 'part_ids': expected a list of distinct part ids.")
        if md5 is not None and not isinstance(md5, str):
            raise invalid("md5", "Invalid type for 'md5': expected a string.", "invalid_type")
        parts = {p.id: p for p in await self.fac.objects.parts(u.id)}
        unknown = [i for i in ids if i not in parts]
        if unknown:
            raise invalid("part_ids", f"Invalid 'part_ids': unknown part '{unknown[0]}'.")
        total = sum(parts[i].bytes for i in ids)
        if total != u.bytes:
            msg = f"The parts total {total} bytes, but the upload was created with {u.bytes}."
            raise invalid("bytes", msg)
        file_id = views.new_id("file-")
        tmp = self.dir / f".{file_id}.part"
        try:
            paths = [self.uploads / u.id / i for i in ids]
            digest = await asyncio.to_thread(_concat, paths, tmp, bool(md5))
            if md5 and digest != md5.lower():
                raise invalid("md5", "The md5 of the parts does not match 'md5'.")
            path = self._place(tmp, file_id)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        now = self.fac.ctx.clock()
        ttl = u.file_expires_after or DEFAULT_FILE_TTL
        f = FacadeFile(file_id, u.tenant, u.filename, u.purpose, total, path, now, now + ttl, None)
        if not await self.fac.objects.end_upload(u.id, "completed", f):
            self.fac.ctx.spool.path(path).unlink(missing_ok=True)
            raise invalid("upload_id", f"Upload '{u.id}' is no longer pending.", None)
        await asyncio.to_thread(shutil.rmtree, self.uploads / u.id, True)
        self.fac.ctx.log.info("facade_file_created", tenant=u.tenant, file_id=f.id, bytes=total)
        done = FacadeUpload(**{**u.__dict__, "status": "completed", "file_id": f.id})
        return json_response(views.upload_object(done, f))

    async def cancel_upload(self, req: web.Request) -> web.StreamResponse:
        """POST /v1/uploads/{id}/cancel."""
        u = await self._pending(req)
        if not await self.fac.objects.end_upload(u.id, "cancelled", None):
            raise invalid("upload_id", f"Upload '{u.id}' is no longer pending.", None)
        await asyncio.to_thread(shutil.rmtree, self.uploads / u.id, True)
        done = FacadeUpload(**{**u.__dict__, "status": "cancelled"})
        return json_response(views.upload_object(done, None))


def parse_limit(raw: str | None, default: int, top: int) -> int:
    """`limit` as OpenAI checks it: an integer 1..top (400 outside), else the default."""
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise invalid("limit", "Invalid 'limit': expected an integer.", "invalid_type") from None
    if value < 1:
        msg = f"Invalid 'limit': integer below minimum value. Expected a value >= 1, got {value}."
        raise invalid("limit", msg, "integer_below_min_value")
    if value > top:
        msg = (
            f"Invalid 'limit': integer above maximum value. Expected a value <= {top}, got {value}."
        )
        raise invalid("limit", msg, "integer_above_max_value")
    return value
