"""OpenAI's Batch API (files, uploads, batches) and the provider built on it.

`BatchApi` is the raw client (what `batchd.api` has always exported); `OpenAI` is the
provider: input uploaded as a file (the Uploads API above a threshold), a create tagged
with the attempt id in `metadata` (found again by listing after an ambiguous create),
output and error files downloaded as they are. The OpenAI-compatible hosts (Azure,
Groq, Together) are subclasses with their quirks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from batchd.metrics import Metrics
from batchd.provider_config import ProviderConfig
from batchd.providers.base import (
    ATTEMPT_KEY,
    Create,
    Owned,
    Page,
    Provider,
    ResultFile,
    Snapshot,
    Verdict,
    file_results,
    file_results_pending,
    unix,
)
from batchd.providers.errors import RateLimited, Transient
from batchd.providers.http import HttpClient, Lines, Tap, bearer, form

# A request that failed for a reason another attempt may not share.
RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
RETRYABLE_CODES = frozenset({"batch_expired", "server_error", "rate_limit_exceeded", "timeout"})
_TIMES = ("completed_at", "failed_at", "expired_at", "cancelled_at", "in_progress_at")


def openai_auth(organization: str | None, project: str | None) -> Any:
    """Bearer auth plus the organization/project headers, when configured."""

    def auth(key: str | None) -> dict[str, str]:
        h = bearer(key)
        if organization:
            h["OpenAI-Organization"] = organization
        if project:
            h["OpenAI-Project"] = project
        return h

    return auth


class BatchApi(HttpClient):
    """A client for /files, /uploads and /batches of OpenAI's API (and compatible ones)."""

    fixed_routes = frozenset(
        {"upload_file", "create_upload", "create_batch", "list_batches", "list_files"}
    )
    purpose = "batch"
    uploads_api = True  # the host serves the multi-part Uploads API
    root_hint = "does {section} base_url end in /v1?"

    def __init__(self, cfg: Any, api_key: str | None, metrics: Metrics, *a: Any, **kw: Any) -> None:
        kw.setdefault("auth", openai_auth(cfg.organization, cfg.project))
        super().__init__(cfg, api_key, metrics, *a, **kw)

    async def __aenter__(self) -> BatchApi:
        await self.open()
        return self

    # --- files ------------------------------------------------------------------------

    async def upload_file(
        self, path: Path, filename: str, tap: Tap | None = None
    ) -> dict[str, Any]:
        """Upload a JSONL file with purpose=batch, streamed from disk (through `tap`)."""
        size = path.stat().st_size

        async def once() -> dict[str, Any]:
            fields = self.upload_fields(filename)
            body = form("file", path, 0, size, tap, filename, "application/jsonl", **fields)
            data = await self.json("upload_file", "POST", "/files", data=body)
            self.counted_upload(size)
            return data

        return await self.retrying(once)

    def upload_fields(self, filename: str) -> dict[str, str]:
        """The text fields of the POST /files form (before the file part)."""
        return {"purpose": self.purpose}

    async def upload(
        self, path: Path, filename: str, threshold: int, part_bytes: int, tap: Tap | None = None
    ) -> dict[str, Any]:
        """Upload with one multipart request, or with the Uploads API at/above `threshold`.

        Every byte read for the upload passes through `tap` once, in order (e.g. to
        validate while uploading), even when a request is retried.
        """
        size = path.stat().st_size
        if size < threshold or not self.uploads_api:
            return await self.upload_file(path, filename, tap)
        return await self.upload_parts(path, filename, size, part_bytes, tap)

    async def upload_parts(
        self, path: Path, filename: str, size: int, part_bytes: int, tap: Tap | None = None
    ) -> dict[str, Any]:
        """Uploads API: create, send parts (each retried on its own), complete."""
        body = {
            "filename": filename,
            "purpose": self.purpose,
            "bytes": size,
            "mime_type": "application/jsonl",
        }
        up = await self.call("create_upload", "POST", "/uploads", json=body)
        part_ids: list[str] = []
        for offset in range(0, size, part_bytes):
            length = min(part_bytes, size - offset)

            async def send(offset: int = offset, length: int = length) -> dict[str, Any]:
                data = form("data", path, offset, length, tap, "part", "application/octet-stream")
                return await self.json(
                    "upload_part", "POST", f"/uploads/{up['id']}/parts", data=data
                )

            part = await self.retrying(send)
            self.counted_upload(length)
            part_ids.append(part["id"])
        done = await self.call(
            "complete_upload", "POST", f"/uploads/{up['id']}/complete", json={"part_ids": part_ids}
        )
        file = done.get("file")
        if not isinstance(file, dict) or "id" not in file:
            raise Transient("complete_upload: no file in the completed upload")
        return file

    def _file_time(self, f: Mapping[str, Any]) -> float:
        return unix(f.get("created_at")) or 0.0

    async def find_file(
        self, filename: str, not_before: float, max_pages: int = 5
    ) -> dict[str, Any] | None:
        """Look for an uploaded batch file by name (newest first), e.g. one whose upload
        finished but whose id was never recorded; stops at files older than `not_before`."""
        after: str | None = None
        for _ in range(max_pages):
            params = {"purpose": self.purpose, "limit": "100", "order": "desc"}
            if after:
                params["after"] = after
            page = await self.call("list_files", "GET", "/files", params=params)
            data = page.get("data") or []
            for f in data:
                if f.get("filename") == filename:
                    return dict(f)
                if self._file_time(f) < not_before:
                    return None
            if not page.get("has_more") or not data:
                return None
            after = data[-1]["id"]
        return None

    async def delete_file(self, file_id: str) -> None:
        """Delete a file (best effort callers ignore NotFound)."""
        await self.call("delete_file", "DELETE", f"/files/{file_id}")

    async def download(  # type: ignore[override]
        self, file_id: str, dest: Path, lines: Lines | None = None
    ) -> int:
        """Stream a file's content to `dest` (see HttpClient.download)."""
        return await super().download("download_file", f"/files/{file_id}/content", dest, lines)

    # --- batches ----------------------------------------------------------------------

    def create_body(
        self,
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        metadata: Mapping[str, str],
        output_expires_after_seconds: int | None = None,
    ) -> dict[str, Any]:
        """The body of POST /batches."""
        body: dict[str, Any] = {
            "input_file_id": input_file_id,
            "endpoint": endpoint,
            "completion_window": completion_window,
            "metadata": dict(metadata),
        }
        if output_expires_after_seconds is not None:
            body["output_expires_after"] = {
                "anchor": "created_at",
                "seconds": output_expires_after_seconds,
            }
        return body

    async def create_batch(
        self,
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        metadata: Mapping[str, str],
        output_expires_after_seconds: int | None = None,
    ) -> dict[str, Any]:
        """POST /batches. Retries only 429; an unknown outcome is raised as Transient."""
        body = self.create_body(
            input_file_id, endpoint, completion_window, metadata, output_expires_after_seconds
        )
        return await self.call("create_batch", "POST", "/batches", (RateLimited,), json=body)

    async def get_batch(self, batch_id: str) -> dict[str, Any]:
        """GET /batches/{id}."""
        return await self.call("get_batch", "GET", f"/batches/{batch_id}")

    async def list_batches(self, limit: int = 100, after: str | None = None) -> dict[str, Any]:
        """One page of GET /batches, newest first."""
        data = orjson.loads(await self.list_batches_raw(limit, after))
        if not isinstance(data, dict):
            raise Transient("list_batches: unexpected response body")
        return data

    async def list_batches_raw(self, limit: int = 100, after: str | None = None) -> bytes:
        """One page of GET /batches as the API sent it (the tracker skips parsing a
        page whose bytes it has seen before)."""
        params: dict[str, str] = {"limit": str(limit)}
        if after:
            params["after"] = after
        return await self.raw("list_batches", "GET", "/batches", params=params)

    async def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        """POST /batches/{id}/cancel."""
        return await self.call("cancel_batch", "POST", f"/batches/{batch_id}/cancel")

    async def find_batch(
        self, attempt_id: str, not_before: float, max_pages: int = 20
    ) -> dict[str, Any] | None:
        """Look for a batch carrying this attempt id in its metadata (newest first).

        Stops once past batches created before `not_before` (unix seconds) or after
        `max_pages` pages.
        """
        after: str | None = None
        for _ in range(max_pages):
            page = await self.list_batches(100, after)
            for b in page.get("data", []):
                if (b.get("metadata") or {}).get(ATTEMPT_KEY) == attempt_id:
                    return dict(b)
                if (unix(b.get("created_at")) or 0) < not_before:
                    return None
            if not page.get("has_more") or not page.get("data"):
                return None
            after = page["data"][-1]["id"]
        return None


_CID_KEY = b'"custom_id"'


def custom_id_of(line: bytes, key: bytes = _CID_KEY) -> str:
    """The custom_id of a result line. The API writes it near the start of the line, at
    the top level: found there without parsing the (often large) rest; else parsed."""
    i = line.find(key, 0, 4096)
    if i > 0 and line.find(b"{", 1, i) == -1:
        j = i + len(key)
        while line[j : j + 1] in (b" ", b"\t"):
            j += 1
        if line[j : j + 1] == b":":
            j += 1
            while line[j : j + 1] in (b" ", b"\t"):
                j += 1
            if line[j : j + 1] == b'"':
                k = line.find(b'"', j + 1)
                value = line[j + 1 : k]
                if k > 0 and b"\\" not in value:
                    try:
                        return value.decode()
                    except UnicodeDecodeError:
                        pass
    return str(orjson.loads(line).get(key.strip(b'"').decode()))


def openai_verdict(rec: Mapping[str, Any]) -> Verdict:
    """The verdict of an OpenAI-shaped line in an error file."""
    err = rec.get("error")
    if isinstance(err, dict) and err.get("code") == "batch_expired":
        return Verdict.EXPIRED
    if isinstance(err, dict) and err.get("code") in RETRYABLE_CODES:
        return Verdict.RETRYABLE
    resp = rec.get("response")
    if isinstance(resp, dict):
        status = resp.get("status_code")
        if isinstance(status, int) and status < 400:
            return Verdict.SUCCEEDED
        ok = isinstance(status, int) and (status in RETRYABLE_STATUS or status >= 500)
        return Verdict.RETRYABLE if ok else Verdict.FAILED
    return Verdict.RETRYABLE if err is None else Verdict.FAILED


class OpenAI(Provider):
    """OpenAI's Batch API (the `[api]` section, or `kind = "openai"`)."""

    kind = "openai"
    tag = "metadata"
    has_batch_usage = True
    client_class: type[BatchApi] = BatchApi
    path_suffix = ""  # appended to base_url (the SDK's base URL) to reach /files, /batches

    def __init__(self, cfg: ProviderConfig, api_key: str | None, metrics: Metrics) -> None:
        super().__init__(cfg, api_key, metrics)
        self.api = self.client_class(
            self.client_config(),
            api_key,
            metrics,
            provider=cfg.name,
            section=cfg.section,
            **self.client_options(),
        )

    def client_config(self) -> Any:
        """The ApiConfig the HTTP client uses (the base URL as the client needs it)."""
        api = self.cfg.api
        if not self.path_suffix:
            return api
        return dataclasses.replace(api, base_url=api.base_url.rstrip("/") + self.path_suffix)

    def client_options(self) -> dict[str, Any]:
        """Extra keyword arguments of the client (auth, headers, query parameters)."""
        return {}

    @classmethod
    def wrapping(cls, cfg: ProviderConfig, api: BatchApi) -> OpenAI:
        """A provider around an open client (tests and tools that hold a BatchApi)."""
        p = cls.__new__(cls)
        Provider.__init__(p, cfg, None, api._metrics)
        p.api = api
        return p

    @property
    def http(self) -> HttpClient:
        return self.api

    # --- input ------------------------------------------------------------------------

    async def stage(self, path: Path, filename: str, tap: Tap | None = None) -> str | None:
        up = self.cfg.upload
        f = await self.api.upload(
            path, filename, up.uploads_api_threshold_bytes, up.part_bytes, tap
        )
        return str(f["id"])

    async def find_staged(self, filename: str, not_before: float, size: int) -> str | None:
        found = await self.api.find_file(filename, not_before)
        if found is None:
            return None
        if found.get("bytes") == size:
            return str(found["id"])
        await self.api.delete_file(found["id"])  # a partial or foreign file: don't leak it
        return None

    async def delete_file(self, file_id: str) -> None:
        await self.api.delete_file(file_id)

    # --- batches ----------------------------------------------------------------------

    def endpoint_for_create(self, endpoint: str | None) -> str:
        """The `endpoint` value of the create (the lines' url)."""
        assert endpoint is not None
        return endpoint

    async def create(self, req: Create) -> Snapshot:
        assert req.file_id is not None
        b = await self.api.create_batch(
            req.file_id,
            self.endpoint_for_create(req.endpoint),
            self.cfg.completion_window,
            {**req.metadata, ATTEMPT_KEY: req.attempt_id},
            self.cfg.output_expires_after_seconds,
        )
        return self.snapshot(b)

    async def find(self, req: Create, sent_at: float, owned: Owned) -> Snapshot | None:
        # The tag is exact; the window only bounds the listing (10 min of clock skew).
        b = await self.api.find_batch(req.attempt_id, sent_at - 600)
        return None if b is None else self.snapshot(b)

    async def get(self, batch_id: str) -> Snapshot:
        return self.snapshot(await self.api.get_batch(batch_id))

    async def list_raw(self, cursor: str | None) -> bytes:
        return await self.api.list_batches_raw(100, cursor)

    def parse_page(self, raw: bytes, cursor: str | None = None) -> Page:
        data = orjson.loads(raw)
        if not isinstance(data, dict):
            raise Transient("list_batches: unexpected response body")
        batches = [self.snapshot(b) for b in data.get("data") or [] if isinstance(b, dict)]
        more = bool(data.get("has_more")) and bool(batches)
        return Page(batches, batches[-1].id if more else None)

    def raw_status(self, b: Mapping[str, Any]) -> str:
        """The status as the API wrote it."""
        return str(b.get("status") or "")

    def snapshot(self, b: Mapping[str, Any]) -> Snapshot:
        raw = self.raw_status(b)
        rc = b.get("request_counts") or {}
        errors = (b.get("errors") or {}).get("data") or []
        times = {k: unix(b.get(k)) for k in _TIMES}
        return Snapshot(
            id=str(b.get("id")),
            status=raw.lower(),
            raw_status=raw,
            completed=int(rc.get("completed") or 0),
            failed=int(rc.get("failed") or 0),
            total=int(rc.get("total") or 0),
            created_at=unix(b.get("created_at")) or 0.0,
            raw=dict(b),
            errors=tuple(e for e in errors if isinstance(e, dict)),
            usage=b.get("usage") if isinstance(b.get("usage"), dict) else None,
            times=times,
        )

    async def cancel(self, batch_id: str) -> None:
        await self.api.cancel_batch(batch_id)

    async def probe(self) -> int:
        page = await self.api.list_batches(1)
        return len(page.get("data") or [])

    # --- results ----------------------------------------------------------------------

    def result_files(self, snap: Snapshot) -> list[ResultFile]:
        return file_results(snap, "output_file_id", "error_file_id")

    def results_pending(self, snap: Snapshot) -> bool:
        return file_results_pending(snap, "output_file_id", "error_file_id")

    async def download(self, rf: ResultFile, dest: Path, lines: Lines) -> int:
        return await self.api.download(rf.ref, dest, lines)

    def result_id(self, line: bytes) -> str:
        return custom_id_of(line)

    def classify(self, line: bytes) -> tuple[str, Verdict]:
        rec = orjson.loads(line)
        return str(rec.get("custom_id")), openai_verdict(rec)

    def remote_copies(self, snap: Snapshot, file_id: str | None) -> list[tuple[str, str]]:
        out = super().remote_copies(snap, file_id)
        for key, kind in (("output_file_id", "output"), ("error_file_id", "error")):
            if snap.raw.get(key):
                out.append((str(snap.raw[key]), kind))
        return out
