"""Mistral batch jobs under ``/mistral/v1`` (``/v1/batch/jobs`` and ``/v1/files``).

Jobs take ``input_files`` (uploaded with ``purpose=batch``) or inline ``requests``, one job-level
``model`` (``body.model`` optional per line), ``metadata`` and ``timeout_hours`` (1..168,
default 24; reported, not enforced: use the expiry knob). Lines are ``{custom_id?, body}``
(``custom_id`` defaults to the line's position). Statuses ``QUEUED``, ``RUNNING``, ``SUCCESS``,
``FAILED``, ``TIMEOUT_EXCEEDED``, ``CANCELLATION_REQUESTED``, ``CANCELLED``; unix timestamps;
``output_file`` / ``error_file`` with ``{id, custom_id, response{status_code, body}, error}``
lines, or ``outputs`` inline with ``?inline=true``. List: ``page`` (from 0) / ``page_size``.
"""

from __future__ import annotations

import uuid
from typing import Any, ClassVar

import orjson
from aiohttp import web

from batchd.emulator.dialect import Dialect
from batchd.emulator.http import json_body, json_response, multipart, send_file
from batchd.emulator.lines import Json, Problem, Req, Rules, error_body, response_body
from batchd.emulator.providers.base import Handler, Provider
from batchd.emulator.state import TERMINAL, ApiError, Batch, StoredFile

V = "/mistral/v1"
ENDPOINTS = tuple(
    "/v1/chat/completions /v1/embeddings /v1/fim/completions /v1/moderations "
    "/v1/chat/moderations /v1/ocr /v1/classifications /v1/chat/classifications "
    "/v1/conversations /v1/audio/transcriptions".split()
)
PURPOSES = ("batch", "fine-tune", "ocr")
_STATUS = {
    "validating": "QUEUED",
    "in_progress": "RUNNING",
    "finalizing": "RUNNING",
    "cancelling": "CANCELLATION_REQUESTED",
    "completed": "SUCCESS",
    "failed": "FAILED",
    "expired": "TIMEOUT_EXCEEDED",
    "cancelled": "CANCELLED",
}
_SAMPLE_TYPE = {"input": "batch_request", "output": "batch_result", "error": "batch_error"}
TIMEOUT_MSG = "The request was not processed before the job's timeout_hours elapsed."


class _Rules(Rules):
    """``{custom_id?, body}`` lines; the model is the job's or the line's ``body.model``."""

    same_model = False

    def __init__(self, endpoint: str, model: str | None) -> None:
        super().__init__(endpoint)
        self.job_model = model

    def problem(self, obj: Any, seen: set[str], model: str | None) -> Problem | None:
        if not isinstance(obj, dict):
            return "invalid_json_line", "This line is not a JSON object.", None
        if not isinstance(obj.get("body"), dict):
            return "missing_required_parameter", "Missing required field: 'body'.", "body"
        cid = obj.get("custom_id")
        if cid is not None and not isinstance(cid, str):
            return "invalid_type", "'custom_id' must be a string.", "custom_id"
        if cid in seen:
            return "duplicate_custom_id", f"Duplicate custom_id '{cid}'.", "custom_id"
        if self.job_model is None and not isinstance(obj["body"].get("model"), str):
            return "missing_required_parameter", "No model: set the job's model.", "model"
        return None

    def custom_id(self, obj: Json, index: int) -> str:
        cid = obj.get("custom_id")
        return cid if isinstance(cid, str) else str(index)


class MistralDialect(Dialect):
    """Output and error files; requests past the timeout get an error line."""

    name = "mistral"
    webhooks = False
    output_purpose = "batch"

    def rules(self, endpoint: str, model: str | None) -> Rules:
        return _Rules(endpoint, model)

    def body(self, b: Batch, r: Req, created: int) -> tuple[Json, int]:
        return response_body(b.endpoint, b.model_hint or b.model or "", r, created)

    def result_line(self, b: Batch, r: Req, outcome: str, created: int) -> tuple[Json | None, int]:
        line: Json = {"id": f"batch-{b.id}-{r.custom_id}", "custom_id": r.custom_id}
        if outcome == "canceled":
            return None, 0
        if outcome == "expired":
            return line | {"response": None, "error": {"message": TIMEOUT_MSG, "code": 3000}}, 0
        body, tokens = error_body(r.status), 0
        if outcome == "succeeded":
            body, tokens = self.body(b, r, created)
        return line | {"response": {"status_code": r.status, "body": body}, "error": None}, tokens


class Mistral(Provider):
    """Mistral's Files and Batch APIs."""

    name: ClassVar[str] = "mistral"
    prefix: ClassVar[str] = "/mistral/"
    create_routes = frozenset({f"POST {V}/batch/jobs"})
    download_routes = frozenset({f"GET {V}/files/{{id}}/content"})
    dialect = MistralDialect()

    def error_body(self, err: ApiError) -> Json:
        kind = err.kind or ("invalid_request_error" if err.status < 500 else "server_error")
        return {
            "object": "error",
            "message": err.message,
            "type": kind,
            "param": err.param,
            "code": err.code,
        }

    # -- files -----------------------------------------------------------------------------
    def file_dict(self, f: StoredFile) -> Json:
        """The file object."""
        return {
            "id": f.id,
            "object": "file",
            "bytes": f.bytes,
            "created_at": f.created_at,
            "filename": f.filename,
            "purpose": f.purpose,
            "sample_type": _SAMPLE_TYPE[f.kind],
            "source": "upload" if f.kind == "input" else "mistral",
            "num_lines": f.lines,
            "mimetype": "application/jsonl",
            "signature": None,
            "expires_at": f.expires_at,
            "visibility": "workspace",
        }

    async def create_file(self, request: web.Request) -> web.StreamResponse:
        limit = self.state.config.max_file_bytes
        fields, size = await multipart(request, self.state, "file", limit, "")
        if size < 0:
            raise ApiError(422, "Field required: file", "file")
        purpose = fields.get("purpose") or "fine-tune"
        if purpose not in PURPOSES:
            (self.state.data_dir / fields["_id"]).unlink(missing_ok=True)
            raise ApiError(422, f"Invalid purpose {purpose!r}.", "purpose")
        fid = str(uuid.uuid4())
        (self.state.data_dir / fields["_id"]).rename(self.state.data_dir / fid)
        f = self.state.add_file(fid, fields["_filename"], purpose, size, None, self.name)
        f.expires_at = None  # Mistral keeps batch files until deleted
        return json_response(self.file_dict(f))

    def _file(self, request: web.Request) -> StoredFile:
        return self.state.get_file(request.match_info["id"], self.name)

    async def get_file(self, request: web.Request) -> web.StreamResponse:
        return json_response(self.file_dict(self._file(request)) | {"deleted": False})

    async def delete_file(self, request: web.Request) -> web.StreamResponse:
        fid = self._file(request).id
        self.state.delete_file(fid, self.name)
        return json_response({"id": fid, "object": "file", "deleted": True})

    async def list_files(self, request: web.Request) -> web.StreamResponse:
        purpose = request.query.get("purpose")
        files = [
            f
            for f in reversed(self.state.files.values())
            if f.provider == self.name and purpose in (None, f.purpose)
        ]
        page = _page(files, request)
        data = [self.file_dict(f) for f in page]
        return json_response({"data": data, "object": "list", "total": len(files)})

    async def file_content(self, request: web.Request) -> web.StreamResponse:
        f = self._file(request)
        return await send_file(request, self.state, f.path, f.bytes)

    # -- jobs ------------------------------------------------------------------------------
    def render(self, b: Batch, inline: bool = False) -> Json:
        """The BatchJob object (``inline``: with ``outputs``)."""
        ok, failed = self.state.live_counts(b)
        if b.status in TERMINAL:
            ok, failed = b.outcomes["succeeded"], b.outcomes["errored"]
        errors = [
            {"message": f"line {e['line']}: {e['message']}" if e["line"] else e["message"]}
            | {"count": 1}
            for e in (b.errors or {}).get("data", [])
        ]
        end = next((b.ts[f"{s}_at"] for s in TERMINAL if f"{s}_at" in b.ts), None)
        d: Json = {
            "id": b.id,
            "object": "batch",
            "input_files": b.extra.get("input_files", []),
            "metadata": b.metadata,
            "endpoint": b.endpoint,
            "model": b.model_hint or b.model,
            "agent_id": b.extra.get("agent_id"),
            "output_file": b.output_file_id,
            "error_file": b.error_file_id,
            "errors": errors,
            "outputs": None,
            "status": _STATUS[b.status],
            "created_at": b.created_at,
            "total_requests": b.total or len(b.reqs),
            "completed_requests": ok + failed,
            "succeeded_requests": ok,
            "failed_requests": failed,
            "started_at": b.ts.get("in_progress_at"),
            "completed_at": end,
        }
        if inline and b.status in TERMINAL:
            d["outputs"] = [
                orjson.loads(x)
                for fid in (b.output_file_id, b.error_file_id)
                if fid is not None
                for x in self.state.files[fid].path.read_bytes().splitlines()
                if x.strip()
            ]
        return d

    async def create(self, request: web.Request) -> web.StreamResponse:
        body = await json_body(request)
        endpoint = body.get("endpoint")
        if endpoint not in ENDPOINTS:
            raise ApiError(422, f"Input should be one of {', '.join(ENDPOINTS)}", "endpoint")
        files, reqs = body.get("input_files"), body.get("requests")
        if (files is None) == (reqs is None):
            raise ApiError(422, "Set exactly one of 'input_files' and 'requests'.")
        hours = body.get("timeout_hours", 24)
        if isinstance(hours, bool) or not isinstance(hours, int) or not 1 <= hours <= 168:
            raise ApiError(422, "'timeout_hours' must be an integer in 1..168.", "timeout_hours")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise ApiError(422, "'model' must be a string.", "model")
        bid = str(uuid.uuid4())
        path = self.state.data_dir / f"{bid}.input.jsonl"
        if files is not None:
            if not isinstance(files, list) or not files:
                raise ApiError(422, "'input_files' must be a non-empty list.", "input_files")
            sources = []
            for fid in files:
                f = self.state.files.get(str(fid))
                if f is None or f.provider != self.name or f.purpose != "batch":
                    raise ApiError(404, f"File {fid} not found or not a batch file.")
                sources.append(f.path)
            with path.open("wb") as out:
                for src in sources:
                    data = src.read_bytes()
                    out.write(data if data.endswith(b"\n") else data + b"\n")
            total = 0
        else:
            if not isinstance(reqs, list) or not reqs:
                raise ApiError(422, "'requests' must be a non-empty list.", "requests")
            path.write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in reqs))
            total = len(reqs)
        b = self.state.start_batch(
            self.name,
            self.dialect,
            path,
            str(endpoint),
            bid=bid,
            total=total,
            model=model,
            metadata=body.get("metadata"),
        )
        b.window = hours * 3600
        b.extra |= {"input_files": list(files or []), "agent_id": body.get("agent_id")}
        return json_response(self.render(b))

    def _batch(self, request: web.Request) -> Batch:
        return self.state.get_batch(request.match_info["id"], self.name)

    async def get(self, request: web.Request) -> web.StreamResponse:
        inline = request.query.get("inline", "").lower() == "true"
        return json_response(self.render(self._batch(request), inline))

    async def list_batches(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        jobs = self.state.provider_batches(self.name)
        if q.get("order_by") == "created":
            jobs.reverse()
        statuses = q.getall("status", [])
        if statuses:
            jobs = [b for b in jobs if _STATUS[b.status] in statuses]
        if "model" in q:
            jobs = [b for b in jobs if (b.model_hint or b.model) == q["model"]]
        data = [self.render(b) for b in _page(jobs, request)]
        return json_response({"data": data, "object": "list", "total": len(jobs)})

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        b = self._batch(request)
        if b.status in TERMINAL:
            raise ApiError(400, f"Job {b.id} has already finished ({_STATUS[b.status]}).")
        if b.status != "cancelling":
            self.state.cancel_batch(b.id, self.name)
        return json_response(self.render(b))

    async def delete(self, request: web.Request) -> web.StreamResponse:
        b = self._batch(request)
        if b.status not in TERMINAL:
            raise ApiError(400, f"Job {b.id} is still running; cancel it first.")
        self.state.delete_batch(b)
        return json_response({"id": b.id, "object": "batch", "deleted": True})

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [
            ("POST", f"{V}/files", self.create_file),
            ("GET", f"{V}/files", self.list_files),
            ("GET", f"{V}/files/{{id}}", self.get_file),
            ("DELETE", f"{V}/files/{{id}}", self.delete_file),
            ("GET", f"{V}/files/{{id}}/content", self.file_content),
            ("POST", f"{V}/batch/jobs", self.create),
            ("GET", f"{V}/batch/jobs", self.list_batches),
            ("GET", f"{V}/batch/jobs/{{id}}", self.get),
            ("DELETE", f"{V}/batch/jobs/{{id}}", self.delete),
            ("POST", f"{V}/batch/jobs/{{id}}/cancel", self.cancel),
        ]


def _page(items: list[Any], request: web.Request) -> list[Any]:
    """Offset paging: ``page`` (from 0) of ``page_size`` (default 100)."""
    raw_page, raw_size = request.query.get("page", "0"), request.query.get("page_size", "100")
    if not raw_page.isdigit() or not raw_size.isdigit() or int(raw_size) < 1:
        raise ApiError(422, "'page' and 'page_size' must be non-negative integers.")
    size = int(raw_size)
    return items[int(raw_page) * size : (int(raw_page) + 1) * size]
