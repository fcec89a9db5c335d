"""OpenAI's Batch API and the OpenAI-compatible hosts that share its shapes: Azure OpenAI, Groq.

OpenAI (``/v1``): files, uploads, batches as batchd uses them. Azure (``/azure/openai`` with
``?api-version=`` and ``/azure/openai/v1``): ``api-key`` header or Entra bearer token, one
batch deployment per file, ``token_limit_exceeded`` at create, capitalised statuses and ISO
timestamps for api-versions before 2024-10-21, a (possibly empty) error file on every finished
batch, file status ``pending`` in the upload response. Groq (``/groq/openai/v1``): chat
completions only, ``completion_window`` 24h..7d, files up to 100 MB, no uploads API.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any, ClassVar

from aiohttp import web

from batchd.emulator.dialect import Dialect
from batchd.emulator.http import json_body, json_response, multipart, send_file
from batchd.emulator.ids import rfc3339
from batchd.emulator.lines import Json, Problem, Rules
from batchd.emulator.providers.base import Handler, Provider, bearer_token
from batchd.emulator.state import (
    DAY,
    PURPOSES,
    TIMESTAMPS,
    ApiError,
    Batch,
    Flavor,
    StoredFile,
)


def _oid(request: web.Request) -> str:
    return request.match_info["id"]


class OpenAI(Provider):
    """OpenAI's own API under ``/v1``."""

    name: ClassVar[str] = "openai"
    prefix: ClassVar[str] = "/v1/"
    bases: ClassVar[tuple[str, ...]] = ("/v1",)  # where /files and /batches live
    flavor: Flavor = Flavor()
    purposes: ClassVar[tuple[str, ...]] = PURPOSES
    uploads: ClassVar[bool] = True  # serve the multi-part Uploads API

    def __init__(self, state: Any) -> None:
        super().__init__(state)
        self.create_routes = frozenset(f"POST {b}/batches" for b in self.bases)
        self.download_routes = frozenset(f"GET {b}/files/{{id}}/content" for b in self.bases)

    # -- rendering (overridden by Azure) ---------------------------------------------------
    def render(self, request: web.Request, b: Batch) -> Json:
        """The batch object as this API returns it."""
        return self.state.batch_dict(b)

    def file_dict(self, request: web.Request, f: StoredFile, created: bool = False) -> Json:
        """The file object (``created``: in the upload response)."""
        return f.to_dict()

    # -- handlers --------------------------------------------------------------------------
    async def create_file(self, request: web.Request) -> web.StreamResponse:
        limit = self.flavor.max_file_bytes(self.state.config)
        fields, size = await multipart(request, self.state, "file", limit)
        if size < 0:
            msg = "Missing required parameter: 'file'."
            raise ApiError(400, msg, "file", "missing_required_parameter")
        purpose = fields.get("purpose")
        if purpose not in self.purposes:
            (self.state.data_dir / fields["_id"]).unlink(missing_ok=True)
            msg = f"Invalid value for 'purpose': {purpose!r}."
            raise ApiError(400, msg, "purpose", "invalid_value")
        f = self.state.add_file(
            fields["_id"], fields["_filename"], purpose, size, None, self.flavor.provider
        )
        return json_response(self.file_dict(request, f, created=True))

    async def list_files(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        limit = min(10_000, int(q.get("limit", "10000")))
        page = self.state.list_files(q.get("purpose"), limit, q.get("after"), self.flavor.provider)
        page["data"] = [
            self.file_dict(request, self.state.get_file(d["id"], self.flavor.provider))
            for d in page["data"]
        ]
        return json_response(page)

    async def get_file(self, request: web.Request) -> web.StreamResponse:
        f = self.state.get_file(_oid(request), self.flavor.provider)
        return json_response(self.file_dict(request, f))

    async def delete_file(self, request: web.Request) -> web.StreamResponse:
        return json_response(self.state.delete_file(_oid(request), self.flavor.provider))

    async def file_content(self, request: web.Request) -> web.StreamResponse:
        f = self.state.get_file(_oid(request), self.flavor.provider)
        return await send_file(request, self.state, f.path, f.bytes)

    async def create_upload(self, request: web.Request) -> web.StreamResponse:
        return json_response(self.state.create_upload(await json_body(request)).to_dict())

    async def add_part(self, request: web.Request) -> web.StreamResponse:
        upload = self.state.pending_upload(_oid(request))
        limit = self.state.config.max_part_bytes
        fields, size = await multipart(request, self.state, "data", limit, "part_")
        if size < 0:
            msg = "Missing required parameter: 'data'."
            raise ApiError(400, msg, "data", "missing_required_parameter")
        return json_response(self.state.add_part(upload, fields["_id"], size))

    async def complete_upload(self, request: web.Request) -> web.StreamResponse:
        body = await json_body(request)
        return json_response((await self.state.complete_upload(_oid(request), body)).to_dict())

    async def cancel_upload(self, request: web.Request) -> web.StreamResponse:
        return json_response(self.state.cancel_upload(_oid(request)).to_dict())

    async def create_batch(self, request: web.Request) -> web.StreamResponse:
        b = self.state.create_batch(await json_body(request), self.flavor)
        return json_response(self.render(request, b))

    async def list_batches(self, request: web.Request) -> web.StreamResponse:
        raw = request.query.get("limit", "20")
        if not raw.isdigit() or not 1 <= int(raw) <= 100:
            raise ApiError(400, "Invalid 'limit': expected an integer in 1..100.", "limit")
        after = request.query.get("after")
        page = self.state.list_batches(
            int(raw), after, self.flavor.provider, lambda b: self.render(request, b)
        )
        return json_response(page)

    async def get_batch(self, request: web.Request) -> web.StreamResponse:
        b = self.state.get_batch(_oid(request), self.flavor.provider)
        return json_response(self.render(request, b))

    async def cancel_batch(self, request: web.Request) -> web.StreamResponse:
        b = self.state.cancel_batch(_oid(request), self.flavor.provider)
        return json_response(self.render(request, b))

    def routes(self) -> list[tuple[str, str, Handler]]:
        out: list[tuple[str, str, Handler]] = []
        for base in self.bases:
            out += [
                ("POST", f"{base}/files", self.create_file),
                ("GET", f"{base}/files", self.list_files),
                ("GET", f"{base}/files/{{id}}", self.get_file),
                ("DELETE", f"{base}/files/{{id}}", self.delete_file),
                ("GET", f"{base}/files/{{id}}/content", self.file_content),
                ("POST", f"{base}/batches", self.create_batch),
                ("GET", f"{base}/batches", self.list_batches),
                ("GET", f"{base}/batches/{{id}}", self.get_batch),
                ("POST", f"{base}/batches/{{id}}/cancel", self.cancel_batch),
            ]
            if self.uploads:
                out += [
                    ("POST", f"{base}/uploads", self.create_upload),
                    ("POST", f"{base}/uploads/{{id}}/parts", self.add_part),
                    ("POST", f"{base}/uploads/{{id}}/complete", self.complete_upload),
                    ("POST", f"{base}/uploads/{{id}}/cancel", self.cancel_upload),
                ]
        return out


# -- Groq ------------------------------------------------------------------------------------
_WINDOW = re.compile(r"^([1-9][0-9]*)([hd])$")


def groq_window(window: str) -> int | None:
    """Seconds of a Groq ``completion_window`` (``24h`` .. ``7d``), None if not allowed."""
    m = _WINDOW.match(window)
    if m is None:
        return None
    seconds = int(m.group(1)) * (3600 if m.group(2) == "h" else DAY)
    return seconds if DAY <= seconds <= 7 * DAY else None


class _GroqDialect(Dialect):
    name = "groq"
    webhooks = False


class Groq(OpenAI):
    """Groq's OpenAI-compatible batches under ``/groq/openai/v1``."""

    name: ClassVar[str] = "groq"
    prefix: ClassVar[str] = "/groq/"
    bases: ClassVar[tuple[str, ...]] = ("/groq/openai/v1",)
    flavor: Flavor = Flavor(
        provider="groq",
        dialect=_GroqDialect(),
        endpoints=("/v1/chat/completions",),
        window_seconds=groq_window,
        windows_hint="'24h' to '7d' (e.g. '24h', '48h', '7d')",
        file_bytes=100 * 1024 * 1024,
    )
    purposes: ClassVar[tuple[str, ...]] = ("batch",)
    uploads: ClassVar[bool] = False


# -- Azure -----------------------------------------------------------------------------------
LEGACY_BEFORE = "2024-10-21"  # api-versions older than this render statuses/timestamps old-style
AZURE_ENDPOINTS = ("/chat/completions", "/v1/chat/completions", "/responses", "/v1/responses")


class _AzureRules(Rules):
    def __init__(self, endpoint: str, deployments: frozenset[str] | None) -> None:
        super().__init__(endpoint)
        self.deployments = deployments

    def problem(self, obj: Any, seen: set[str], model: str | None) -> Problem | None:
        problem = super().problem(obj, seen, model)
        if problem is None and self.deployments is not None:
            name = obj["body"]["model"]
            if name not in self.deployments:
                msg = f"The model deployment '{name}' does not exist or is not a batch deployment."
                return "model_not_found", msg, "model"
        return problem


class AzureDialect(Dialect):
    """Azure OpenAI: lines name a batch deployment; an error file even when empty."""

    name = "azure"
    keep_empty_error_file = True
    token_limit_at_validation = False  # refused at create instead

    def __init__(self, deployments: frozenset[str] | None = None) -> None:
        self.deployments = deployments

    def rules(self, endpoint: str, model: str | None) -> Rules:
        return _AzureRules(endpoint, self.deployments)


def _legacy(request: web.Request) -> bool:
    version = request.query.get("api-version", "")
    return bool(version) and version[:10] < LEGACY_BEFORE


class Azure(OpenAI):
    """Azure OpenAI batches: classic ``/azure/openai/...?api-version=`` and v1
    ``/azure/openai/v1/...``."""

    name: ClassVar[str] = "azure"
    prefix: ClassVar[str] = "/azure/"
    bases: ClassVar[tuple[str, ...]] = ("/azure/openai", "/azure/openai/v1")
    purposes: ClassVar[tuple[str, ...]] = ("batch",)
    uploads: ClassVar[bool] = False

    def __init__(self, state: Any) -> None:
        super().__init__(state)
        self.dialect = AzureDialect(state.config.azure_deployments)
        self.flavor = Flavor(provider="azure", dialect=self.dialect, endpoints=AZURE_ENDPOINTS)

    def auth(self, request: web.Request) -> None:
        key = self.state.config.api_key
        given = request.headers.get("api-key") or bearer_token(request)
        if not given or (key is not None and given != key):
            msg = (
                "Access denied due to invalid subscription key or wrong API endpoint. Make sure "
                "to provide a valid key for an active subscription and use a correct regional "
                "API endpoint for your resource."
            )
            raise ApiError(401, msg, None, "401")
        classic = not request.path.startswith("/azure/openai/v1/")
        if classic and not request.query.get("api-version"):
            msg = "The api-version query parameter (?api-version=) is required for all requests."
            raise ApiError(400, msg, None, "MissingApiVersionParameter")

    def render(self, request: web.Request, b: Batch) -> Json:
        d = self.state.batch_dict(b) | {"endpoint": b.extra.get("endpoint", b.endpoint)}
        if b.error_file_id is None and b.status in ("completed", "cancelled", "expired"):
            d["error_file_id"] = ""  # seen from Azure instead of null
        if not _legacy(request):
            return d
        d["status"] = str(d["status"]).capitalize()
        for key in (*TIMESTAMPS, "created_at", "expires_at"):
            d[key] = rfc3339(d[key]) if d.get(key) is not None else None
        return d

    def file_dict(self, request: web.Request, f: StoredFile, created: bool = False) -> Json:
        d = f.to_dict()
        if created:
            d["status"] = "pending"  # Azure processes uploads asynchronously; poll the file
        if _legacy(request):
            d["created_at"] = rfc3339(f.created_at)
        return d

    async def create_batch(self, request: web.Request) -> web.StreamResponse:
        body = await json_body(request)
        endpoint = body.get("endpoint")
        if isinstance(endpoint, str) and endpoint in AZURE_ENDPOINTS:
            body["endpoint"] = endpoint if endpoint.startswith("/v1/") else "/v1" + endpoint
        f = self.state.files.get(str(body.get("input_file_id")))
        parsed = None
        if f is not None and f.provider == "azure" and isinstance(endpoint, str):
            parse = self.dialect.parse
            parsed = await asyncio.to_thread(parse, f.path, body["endpoint"], None)
            self._check_quota(parsed.model, parsed.tokens if not parsed.errors else 0)
        b = self.state.create_batch(body, self.flavor, parsed)
        b.extra["endpoint"] = endpoint
        return json_response(self.render(request, b))

    def _check_quota(self, deployment: str | None, tokens: int) -> None:
        limit = self.state.config.token_limits.get(deployment or "")
        if limit is None or deployment is None:
            return
        held = self.state.tokens_held("azure", deployment)
        if held + tokens > limit:
            msg = (
                f"Enqueued token limit reached for {deployment}. Limit: {limit} enqueued tokens. "
                "Please try again once some in_progress batches have been completed."
            )
            raise ApiError(400, msg, None, "token_limit_exceeded")
