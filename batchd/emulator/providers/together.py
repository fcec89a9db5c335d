"""Together AI batches under ``/together/v1`` (``/v1/batches`` and ``/v1/files``).

Upload as the together SDK does it: ``POST /v1/files`` with the file's metadata only answers
``302`` with a presigned ``Location`` (served at ``/_emulator/presigned/together/{id}``, no
auth) and ``X-Together-File-Id``; the bytes are PUT there, then ``POST
/v1/files/{id}/preprocess`` returns the file (``purpose=batch-api``). Lines are ``{custom_id
(<= 64 chars), body}``; the model is ``body.model`` or the job's ``model_id``. Create answers
``201 {"job": {...}}``; get/cancel answer the job; list answers a JSON array
(no paging). Statuses ``VALIDATING``, ``IN_PROGRESS``, ``COMPLETED``, ``FAILED``,
``EXPIRED``, ``CANCELLED``; ISO timestamps; ``progress`` 0..100; OpenAI-shaped output and
error files.
"""

from __future__ import annotations

import uuid
from typing import Any, ClassVar

from aiohttp import web

from batchd.emulator.dialect import Dialect
from batchd.emulator.http import json_body, json_response, multipart, send_file
from batchd.emulator.ids import rfc3339
from batchd.emulator.lines import Json, Problem, Req, Rules, response_body
from batchd.emulator.providers.base import Handler, Provider
from batchd.emulator.state import DAY, TERMINAL, ApiError, Batch, StoredFile

V = "/together/v1"
PRESIGNED = "/_emulator/presigned/together"
ENDPOINTS = ("/v1/chat/completions", "/v1/audio/transcriptions", "/v1/audio/translations")
PURPOSES = ("fine-tune", "calibration", "eval", "batch-api")
MAX_FILE_BYTES = 100 * 1024 * 1024
_STATUS = {
    "validating": "VALIDATING",
    "in_progress": "IN_PROGRESS",
    "finalizing": "IN_PROGRESS",
    "cancelling": "IN_PROGRESS",  # the SDK's status enum has no CANCELLING
    "completed": "COMPLETED",
    "failed": "FAILED",
    "expired": "EXPIRED",
    "cancelled": "CANCELLED",
}


class _Rules(Rules):
    """``{custom_id, body}`` lines (``method``/``url`` are tolerated)."""

    same_model = False

    def __init__(self, endpoint: str, model: str | None) -> None:
        super().__init__(endpoint)
        self.job_model = model

    def problem(self, obj: Any, seen: set[str], model: str | None) -> Problem | None:
        if not isinstance(obj, dict):
            return "invalid_json_line", "This line is not a JSON object.", None
        cid = obj.get("custom_id")
        if not isinstance(cid, str) or not 1 <= len(cid) <= 64:
            msg = "'custom_id' must be a string of 1 to 64 characters."
            return "invalid_custom_id", msg, "custom_id"
        if not isinstance(obj.get("body"), dict):
            return "missing_required_parameter", "Missing required field: 'body'.", "body"
        if cid in seen:
            return "duplicate_custom_id", f"Duplicate custom_id '{cid}'.", "custom_id"
        if self.job_model is None and not isinstance(obj["body"].get("model"), str):
            return "missing_required_parameter", "No model: set body.model or model_id.", "model"
        return None


class TogetherDialect(Dialect):
    name = "together"
    webhooks = False
    output_purpose = "batch-api"

    def rules(self, endpoint: str, model: str | None) -> Rules:
        return _Rules(endpoint, model)

    def body(self, b: Batch, r: Req, created: int) -> tuple[Json, int]:
        return response_body(b.endpoint, b.model or b.model_hint or "", r, created)


class Together(Provider):
    """Together's Files and Batches APIs."""

    name: ClassVar[str] = "together"
    prefix: ClassVar[str] = "/together/"
    create_routes = frozenset({f"POST {V}/batches"})
    download_routes = frozenset({f"GET {V}/files/{{id}}/content"})
    dialect = TogetherDialect()

    def __init__(self, state: Any) -> None:
        super().__init__(state)
        self.pending: dict[str, Json] = {}  # presigned uploads not PUT yet

    def error(self, err: ApiError, path: str = "") -> web.Response:
        """The published spec's envelopes: BatchErrorResponse ``{"error": "<message>"}``
        under /batches, ErrorData ``{"error": {message, type, param, code}}`` elsewhere."""
        if path.startswith(f"{V}/batches"):
            return json_response({"error": err.message}, err.status)
        return super().error(err, path)

    # -- files -----------------------------------------------------------------------------
    def file_dict(self, f: StoredFile) -> Json:
        """The FileResponse object."""
        return {
            "id": f.id,
            "object": "file",
            "bytes": f.bytes,
            "created_at": f.created_at,
            "filename": f.filename,
            "FileType": "jsonl",
            "purpose": f.purpose,
            "Processed": True,  # required by the published spec's FileResponse
            "processing_status": "COMPLETED",
        }

    async def create_file(self, request: web.Request) -> web.StreamResponse:
        fields, size = await multipart(request, self.state, "file", MAX_FILE_BYTES)
        purpose = fields.get("purpose") or "fine-tune"
        if purpose not in PURPOSES:
            (self.state.data_dir / fields["_id"]).unlink(missing_ok=True)
            raise ApiError(400, f"Invalid purpose {purpose!r}.", "purpose")
        if size >= 0:  # a direct multipart upload
            name = fields["_filename"]
            f = self.state.add_file(fields["_id"], name, purpose, size, None, self.name)
            return json_response(self.file_dict(f))
        fid = fields["_id"]
        self.pending[fid] = {"filename": fields.get("file_name") or "upload.jsonl"}
        self.pending[fid]["purpose"] = purpose
        location = f"{request.scheme}://{request.host}{PRESIGNED}/{fid}"
        headers = {"Location": location, "X-Together-File-Id": fid}
        return web.Response(status=302, headers=headers)

    async def put_presigned(self, request: web.Request) -> web.StreamResponse:
        fid = request.match_info["id"]
        meta = self.pending.pop(fid, None)
        if meta is None:
            return web.Response(status=403, text="presigned URL unknown or already used")
        path, size = self.state.data_dir / fid, 0
        with path.open("wb") as fh:
            async for chunk in request.content.iter_chunked(1 << 20):
                size += len(chunk)
                fh.write(chunk)
        if size > MAX_FILE_BYTES:
            path.unlink()
            return web.Response(status=413, text="file too large")
        self.state.add_file(fid, meta["filename"], meta["purpose"], size, None, self.name)
        return web.Response(status=200)

    def _file(self, request: web.Request) -> StoredFile:
        return self.state.get_file(request.match_info["id"], self.name)

    async def preprocess(self, request: web.Request) -> web.StreamResponse:
        return json_response(self.file_dict(self._file(request)))

    async def get_file(self, request: web.Request) -> web.StreamResponse:
        return json_response(self.file_dict(self._file(request)))

    async def delete_file(self, request: web.Request) -> web.StreamResponse:
        fid = self._file(request).id
        self.state.delete_file(fid, self.name)
        return json_response({"id": fid, "deleted": True})

    async def list_files(self, request: web.Request) -> web.StreamResponse:
        files = [f for f in reversed(self.state.files.values()) if f.provider == self.name]
        return json_response({"data": [self.file_dict(f) for f in files]})

    async def file_content(self, request: web.Request) -> web.StreamResponse:
        f = self._file(request)
        return await send_file(request, self.state, f.path, f.bytes)

    # -- batches ---------------------------------------------------------------------------
    def render(self, b: Batch) -> Json:
        """The BatchJob object; a field not known yet is absent (the spec has no nulls)."""
        total = len(b.reqs) or b.total
        ok, failed = self.state.live_counts(b)
        progress = (
            100.0 if b.status in TERMINAL else (100.0 * (ok + failed) / total if total else 0)
        )
        end = next((b.ts[f"{s}_at"] for s in TERMINAL if f"{s}_at" in b.ts), None)
        error = "; ".join(e["message"] for e in (b.errors or {}).get("data", [])[:3]) or None
        job = {
            "id": b.id,
            "user_id": "user_emulator",
            "input_file_id": b.input_file_id,
            "file_size_bytes": b.extra.get("file_size_bytes"),
            "status": _STATUS[b.status],
            "job_deadline": rfc3339(b.created_at + DAY),
            "created_at": rfc3339(b.created_at),
            "endpoint": b.endpoint,
            "progress": round(progress, 2),
            "model_id": b.model_hint or b.model,
            "output_file_id": b.output_file_id,
            "error_file_id": b.error_file_id,
            "error": error,
            "completed_at": rfc3339(end),
        }
        return {k: v for k, v in job.items() if v is not None}

    async def create(self, request: web.Request) -> web.StreamResponse:
        body = await json_body(request)
        endpoint, fid = body.get("endpoint"), body.get("input_file_id")
        if endpoint not in ENDPOINTS:
            raise ApiError(400, f"Invalid endpoint; supported: {', '.join(ENDPOINTS)}", "endpoint")
        f = self.state.files.get(str(fid))
        if f is None or f.provider != self.name or f.purpose != "batch-api":
            raise ApiError(400, f"Input file {fid} not found or not uploaded as 'batch-api'.")
        window = body.get("completion_window", "24h")
        if window != "24h":
            raise ApiError(400, "completion_window: only '24h' is supported.")
        model = body.get("model_id")
        b = self.state.start_batch(
            self.name,
            self.dialect,
            f.path,
            str(endpoint),
            input_file_id=f.id,
            bid=str(uuid.uuid4()),  # a UUID, as the spec's BatchJob.id
            model=model if isinstance(model, str) else None,
        )
        b.extra["file_size_bytes"] = f.bytes
        return json_response({"job": self.render(b)}, 201)  # (`warning`: only with one)

    def _batch(self, request: web.Request) -> Batch:
        return self.state.get_batch(request.match_info["id"], self.name)

    async def get(self, request: web.Request) -> web.StreamResponse:
        return json_response(self.render(self._batch(request)))

    async def list_batches(self, request: web.Request) -> web.StreamResponse:
        return json_response([self.render(b) for b in self.state.provider_batches(self.name)])

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        b = self._batch(request)
        if b.status in TERMINAL:
            raise ApiError(400, f"Batch {b.id} has already finished ({_STATUS[b.status]}).")
        if b.status != "cancelling":
            self.state.cancel_batch(b.id, self.name)
        return json_response(self.render(b))

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [
            ("POST", f"{V}/files", self.create_file),
            ("GET", f"{V}/files", self.list_files),
            ("GET", f"{V}/files/{{id}}", self.get_file),
            ("DELETE", f"{V}/files/{{id}}", self.delete_file),
            ("GET", f"{V}/files/{{id}}/content", self.file_content),
            ("POST", f"{V}/files/{{id}}/preprocess", self.preprocess),
            ("POST", f"{V}/batches", self.create),
            ("GET", f"{V}/batches", self.list_batches),
            ("GET", f"{V}/batches/{{id}}", self.get),
            ("POST", f"{V}/batches/{{id}}/cancel", self.cancel),
        ]

    def open_routes(self) -> list[tuple[str, str, Handler]]:
        return [("PUT", f"{PRESIGNED}/{{id}}", self.put_presigned)]
