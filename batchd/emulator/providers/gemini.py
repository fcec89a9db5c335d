"""Gemini API Batch Mode under ``/gemini`` (``v1beta`` and ``v1``), as google-genai speaks it.

``POST /gemini/v1beta/models/{model}:batchGenerateContent`` with ``{"batch": {displayName,
inputConfig: {fileName} | {requests: {requests: [{request, metadata}]}}}}`` returns a
long-running operation ``batches/{id}`` whose ``metadata`` holds ``state``
(``BATCH_STATE_PENDING/RUNNING/SUCCEEDED/FAILED/CANCELLED/EXPIRED``), ``batchStats`` (int64 as
strings) and, once done, ``output``: ``responsesFile`` (file input; one ``{key, response}`` or
``{key, error: {code, message}}`` line per request, in input order) or ``inlinedResponses``
(inline input: ``{response | error, metadata}`` in input order).
Files: the resumable upload protocol (``/gemini/upload/v1beta/files``), get, list, delete,
``files/{id}:download?alt=media``. Batches: get, list (``pageSize``/``pageToken``),
``:cancel``, delete. Auth ``x-goog-api-key`` header (or ``?key=``).
"""

from __future__ import annotations

import secrets
from typing import Any, ClassVar

import orjson
from aiohttp import web

from batchd.emulator.dialect import Dialect
from batchd.emulator.http import json_body, json_response, send_file
from batchd.emulator.ids import rfc3339
from batchd.emulator.lines import Json, Problem, Req, Rules
from batchd.emulator.providers.base import Handler, Provider
from batchd.emulator.state import TERMINAL, ApiError, Batch, StoredFile

VERSIONS = ("v1beta", "v1")  # the SDK's default is v1 (3.x), the docs' v1beta
ID = "{id:[^/:]+}"
BATCH_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch"
OUTPUT_TYPE = BATCH_TYPE + "Output"
MAX_INLINE_BYTES = 20 * 1024 * 1024
FILE_TTL = 48 * 3600
_STATES = {
    "validating": "PENDING",
    "in_progress": "RUNNING",
    "finalizing": "RUNNING",
    "cancelling": "RUNNING",
    "completed": "SUCCEEDED",
    "failed": "FAILED",
    "expired": "EXPIRED",
    "cancelled": "CANCELLED",
}
_GRPC = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ALREADY_EXISTS",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def grpc_status(status: int) -> str:
    """The google.rpc status name the API reports with an HTTP status."""
    return _GRPC.get(status, "UNKNOWN")


class _FileRules(Rules):
    """File lines ``{key, request}``; a request without ``contents`` fails on its own."""

    same_model = False

    def problem(self, obj: Any, seen: set[str], model: str | None) -> Problem | None:
        if not isinstance(obj, dict):
            return "invalid_json_line", "This line is not a JSON object.", None
        if not isinstance(obj.get("key"), str) or not obj["key"]:
            return "missing_required_parameter", "Missing required field: 'key'.", "key"
        if not isinstance(obj.get("request"), dict):
            return "missing_required_parameter", "Missing required field: 'request'.", "request"
        return None

    def custom_id(self, obj: Json, index: int) -> str:
        return str(obj["key"])

    def body(self, obj: Json) -> Json:
        return dict(obj["request"])

    def model(self, obj: Json) -> str | None:
        return None

    def request_error(self, obj: Json) -> str | None:
        contents = obj["request"].get("contents")
        if not isinstance(contents, list) or not contents:
            return "* GenerateContentRequest.contents: contents is not specified"
        return None


class _InlineRules(_FileRules):
    """Inline requests ``{request, metadata}``, identified by position."""

    def problem(self, obj: Any, seen: set[str], model: str | None) -> Problem | None:
        if not isinstance(obj, dict) or not isinstance(obj.get("request"), dict):
            return "missing_required_parameter", "Missing required field: 'request'.", "request"
        return None

    def custom_id(self, obj: Json, index: int) -> str:
        return str(index)

    def meta(self, obj: Json) -> Any:
        meta = obj.get("metadata")
        return meta if isinstance(meta, dict) else None


class GeminiDialect(Dialect):
    """One results file in input order; requests not run get no line."""

    name = "gemini"
    split_errors = False
    ordered = True
    webhooks = False
    output_purpose = "batch_output"

    def parse(self, path: Any, endpoint: str, model: str | None) -> Any:
        from batchd.emulator.lines import parse_lines

        rules = _InlineRules(endpoint) if endpoint == "inline" else _FileRules(endpoint)
        return parse_lines(path, rules)

    def result_line(self, b: Batch, r: Req, outcome: str, created: int) -> tuple[Json | None, int]:
        if outcome in ("canceled", "expired"):
            return None, 0
        inline = b.endpoint == "inline"
        head: Json = {"metadata": r.meta} if inline and r.meta else {}
        if not inline:
            head["key"] = r.custom_id
        if outcome == "errored":
            message = r.message or f"Emulated request failure (HTTP {r.status})."
            err = {"code": r.status, "message": message}  # a google.rpc.Status
            return head | {"error": err}, 0
        text = f"Emulated reply to: {r.text}"
        n_out = 1 + len(text) // 4
        candidate = {
            "content": {"parts": [{"text": text}], "role": "model"},
            "finishReason": "STOP",
            "index": 0,
        }
        usage = {"promptTokenCount": r.tokens, "candidatesTokenCount": n_out}
        response = {
            "candidates": [candidate],
            "usageMetadata": usage | {"totalTokenCount": r.tokens + n_out},
            "modelVersion": (b.model_hint or "").removeprefix("models/"),
            "responseId": secrets.token_hex(8),
        }
        return head | {"response": response}, n_out


class Gemini(Provider):
    """Batch Mode and the Files API of the Gemini Developer API."""

    name: ClassVar[str] = "gemini"
    prefix: ClassVar[str] = "/gemini/"
    create_routes = frozenset(
        f"POST /gemini/{v}/models/{{model}}:batchGenerateContent" for v in VERSIONS
    )
    download_routes = frozenset(f"GET /gemini/{v}/files/{{id}}:download" for v in VERSIONS)
    dialect = GeminiDialect()

    def __init__(self, state: Any) -> None:
        super().__init__(state)
        self.sessions: dict[str, Json] = {}  # resumable uploads in progress

    def auth(self, request: web.Request) -> None:
        if request.path.startswith("/gemini/upload/") and "upload_id" in request.query:
            return  # like the real upload URL, the session id is the credential
        key = request.headers.get("x-goog-api-key") or request.query.get("key")
        if not key:
            msg = "Method doesn't allow unregistered callers. Please use an API Key."
            raise ApiError(403, msg)
        if self.state.config.api_key is not None and key != self.state.config.api_key:
            raise ApiError(400, "API key not valid. Please pass a valid API key.")

    def error_body(self, err: ApiError) -> Json:
        status = grpc_status(err.status)
        return {"error": {"code": err.status, "message": err.message, "status": status}}

    def fault(self, status: int, message: str, code: str | None, path: str = "") -> web.Response:
        return self.error(ApiError(status, message), path)

    # -- files -----------------------------------------------------------------------------
    def file_dict(self, request: web.Request, f: StoredFile) -> Json:
        """The File resource."""
        version = request.path.split("/")[2 if request.path.startswith("/gemini/v") else 3]
        base = f"{request.scheme}://{request.host}/gemini/{version}/files/{f.id}"
        d = {
            "name": f"files/{f.id}",
            "mimeType": f.extra.get("mime", "application/jsonl"),
            "sizeBytes": str(f.bytes),
            "createTime": rfc3339(f.created_at),
            "updateTime": rfc3339(f.created_at),
            "expirationTime": rfc3339(f.created_at + FILE_TTL),
            "sha256Hash": "",
            "uri": base,
            "state": "ACTIVE",
            "source": "UPLOADED" if f.kind == "input" else "GENERATED",
        }
        if f.extra.get("display"):
            d["displayName"] = f.extra["display"]
        if f.kind != "input":
            d["downloadUri"] = base + ":download?alt=media"
        return d

    async def upload(self, request: web.Request) -> web.StreamResponse:
        command = request.headers.get("X-Goog-Upload-Command", "").replace(" ", "")
        if request.headers.get("X-Goog-Upload-Protocol") == "resumable" and command == "start":
            return await self._start(request)
        sid = request.query.get("upload_id", "")
        if sid not in self.sessions:
            raise ApiError(404, f"No upload session '{sid}'.")
        s = self.sessions[sid]
        offset = request.headers.get("X-Goog-Upload-Offset", "")
        if not offset.isdigit() or int(offset) != s["written"]:
            raise ApiError(400, f"Bad X-Goog-Upload-Offset {offset!r}; expected {s['written']}.")
        data = await request.read()
        with s["path"].open("ab") as fh:
            fh.write(data)
        s["written"] += len(data)
        if "finalize" not in command.split(","):
            return web.Response(headers={"x-goog-upload-status": "active"})
        del self.sessions[sid]
        if s["written"] != s["size"]:
            s["path"].unlink(missing_ok=True)
            raise ApiError(400, f"Uploaded {s['written']} bytes; {s['size']} were announced.")
        f = self.state.add_file(s["id"], s["display"] or s["id"], "batch", s["size"], FILE_TTL)
        f.provider, f.extra = self.name, {"mime": s["mime"], "display": s["display"]}
        body = orjson.dumps({"file": self.file_dict(request, f)})
        return web.Response(
            body=body, content_type="application/json", headers={"x-goog-upload-status": "final"}
        )

    async def _start(self, request: web.Request) -> web.StreamResponse:
        size = request.headers.get("X-Goog-Upload-Header-Content-Length", "")
        if not size.isdigit():
            raise ApiError(400, "X-Goog-Upload-Header-Content-Length is required.")
        meta = (await json_body(request)).get("file") or {}
        sid, fid = secrets.token_hex(16), secrets.token_hex(8)
        self.sessions[sid] = {
            "id": fid,
            "path": self.state.data_dir / fid,
            "size": int(size),
            "written": 0,
            "mime": request.headers.get("X-Goog-Upload-Header-Content-Type", "application/jsonl"),
            "display": meta.get("displayName") or meta.get("display_name"),
        }
        (self.state.data_dir / fid).write_bytes(b"")
        url = f"{request.scheme}://{request.host}{request.path}?upload_id={sid}"
        headers = {"x-goog-upload-url": url, "x-goog-upload-status": "active"}
        return web.Response(headers=headers)

    def _file(self, request: web.Request) -> StoredFile:
        try:
            return self.state.get_file(request.match_info["id"], self.name)
        except ApiError:
            msg = f"File files/{request.match_info['id']} does not exist."
            raise ApiError(404, msg) from None

    async def get_file(self, request: web.Request) -> web.StreamResponse:
        return json_response(self.file_dict(request, self._file(request)))

    async def delete_file(self, request: web.Request) -> web.StreamResponse:
        self.state.delete_file(self._file(request).id, self.name)
        return json_response({})

    async def list_files(self, request: web.Request) -> web.StreamResponse:
        files = [f for f in reversed(self.state.files.values()) if f.provider == self.name]
        page, token = _page(files, request)
        return json_response({"files": [self.file_dict(request, f) for f in page]} | _token(token))

    async def download(self, request: web.Request) -> web.StreamResponse:
        f = self._file(request)
        if f.kind == "input":
            raise ApiError(400, "Only generated files can be downloaded.")
        return await send_file(request, self.state, f.path, f.bytes, "application/jsonl")

    # -- batches ---------------------------------------------------------------------------
    def render(self, request: web.Request, b: Batch) -> Json:
        """The batch as a long-running operation."""
        state = _STATES[b.status]
        done = b.status in TERMINAL
        ok, failed = self.state.live_counts(b)
        if done:
            ok, failed = b.outcomes["succeeded"], b.outcomes["errored"]
        total = b.total or len(b.reqs)
        stats = {
            "requestCount": str(total),
            "successfulRequestCount": str(ok),
            "failedRequestCount": str(failed),
            "pendingRequestCount": str(max(0, total - ok - failed)),
        }
        end = next((b.ts[f"{s}_at"] for s in TERMINAL if f"{s}_at" in b.ts), None)
        meta: Json = {
            "@type": BATCH_TYPE,
            "model": b.model_hint,
            "displayName": b.extra.get("display", ""),
            "createTime": rfc3339(b.created_at),
            "updateTime": rfc3339(max([b.created_at, *b.ts.values()])),
            "batchStats": stats,
            "state": f"BATCH_STATE_{state}",
            "name": f"batches/{b.id}",
        }
        if end is not None:
            meta["endTime"] = rfc3339(end)
        op: Json = {"name": f"batches/{b.id}", "metadata": meta}
        if not done:
            return op
        output = self._output(b)
        if output is not None:
            meta["output"] = output
        op["done"] = True
        if state == "SUCCEEDED" and output is not None:
            op["response"] = {"@type": OUTPUT_TYPE} | output
        elif state != "SUCCEEDED":
            message = "; ".join(e["message"] for e in (b.errors or {}).get("data", [])[:3])
            code = {"CANCELLED": 1, "EXPIRED": 4}.get(state, 3)
            op["error"] = {"code": code, "message": message or f"Batch {state.lower()}."}
        return op

    def _output(self, b: Batch) -> Json | None:
        if b.output_file_id is None:
            return None
        if b.endpoint != "inline":
            return {"responsesFile": f"files/{b.output_file_id}"}
        path = self.state.files[b.output_file_id].path
        lines = [orjson.loads(x) for x in path.read_bytes().splitlines() if x.strip()]
        return {"inlinedResponses": {"inlinedResponses": lines}}

    async def create(self, request: web.Request) -> web.StreamResponse:
        model = "models/" + request.match_info["model"]
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        batch = body.get("batch") if isinstance(body, dict) else None
        config = batch.get("inputConfig") if isinstance(batch, dict) else None
        if not isinstance(batch, dict) or not isinstance(config, dict):
            raise ApiError(400, "* BatchGenerateContentRequest.batch.input_config: required")
        file_name, inline = config.get("fileName"), config.get("requests")
        if (file_name is None) == (inline is None):
            raise ApiError(400, "Exactly one of input_config.file_name or requests must be set.")
        bid = secrets.token_hex(10)
        if file_name is not None:
            fid = str(file_name).removeprefix("files/")
            f = self.state.files.get(fid)
            if f is None or f.provider != self.name:
                raise ApiError(404, f"File {file_name} does not exist.")
            path, endpoint, total = f.path, "file", 0
        else:
            reqs = inline.get("requests") if isinstance(inline, dict) else None
            if not isinstance(reqs, list) or not reqs:
                raise ApiError(400, "* input_config.requests.requests: at least one request")
            if len(raw) > MAX_INLINE_BYTES:
                raise ApiError(400, "Inline requests exceed 20 MB; upload a file instead.")
            path, endpoint, total = self.state.data_dir / f"{bid}.input.jsonl", "inline", len(reqs)
            path.write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in reqs))
        b = self.state.start_batch(
            self.name, self.dialect, path, endpoint, bid=bid, total=total, model=model
        )
        b.extra["display"] = batch.get("displayName") or ""
        b.input_file_id = str(file_name or "")
        return json_response(self.render(request, b))

    def _batch(self, request: web.Request) -> Batch:
        try:
            return self.state.get_batch(request.match_info["id"], self.name)
        except ApiError:
            raise ApiError(404, f"Batch batches/{request.match_info['id']} not found.") from None

    async def get(self, request: web.Request) -> web.StreamResponse:
        return json_response(self.render(request, self._batch(request)))

    async def list_batches(self, request: web.Request) -> web.StreamResponse:
        page, token = _page(self.state.provider_batches(self.name), request)
        ops = [self.render(request, b) for b in page]
        return json_response({"operations": ops} | _token(token))

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        b = self._batch(request)
        if b.status in TERMINAL:
            raise ApiError(400, f"Batch batches/{b.id} has already finished ({b.status}).")
        if b.status != "cancelling":
            self.state.cancel_batch(b.id, self.name)
        return json_response({})

    async def delete(self, request: web.Request) -> web.StreamResponse:
        self.state.delete_batch(self._batch(request))
        return json_response({})

    def routes(self) -> list[tuple[str, str, Handler]]:
        out: list[tuple[str, str, Handler]] = []
        for version in VERSIONS:
            v = f"/gemini/{version}"
            out += [
                ("POST", f"/gemini/upload/{version}/files", self.upload),
                ("GET", f"{v}/files", self.list_files),
                ("GET", f"{v}/files/{ID}", self.get_file),
                ("DELETE", f"{v}/files/{ID}", self.delete_file),
                ("GET", f"{v}/files/{ID}:download", self.download),
                ("POST", f"{v}/models/{{model:[^/:]+}}:batchGenerateContent", self.create),
                ("GET", f"{v}/batches", self.list_batches),
                ("GET", f"{v}/batches/{ID}", self.get),
                ("DELETE", f"{v}/batches/{ID}", self.delete),
                ("POST", f"{v}/batches/{ID}:cancel", self.cancel),
            ]
        return out


def _page(items: list[Any], request: web.Request) -> tuple[list[Any], str | None]:
    """One page of ``items`` for ``pageSize``/``pageToken`` (the token is an offset)."""
    raw_size, token = request.query.get("pageSize", "50"), request.query.get("pageToken", "0")
    if not raw_size.isdigit() or not token.isdigit():
        raise ApiError(400, "Invalid pageSize or pageToken.")
    size, start = max(1, min(1000, int(raw_size))), int(token)
    end = start + size
    return items[start:end], (str(end) if end < len(items) else None)


def _token(token: str | None) -> Json:
    return {"nextPageToken": token} if token else {}
