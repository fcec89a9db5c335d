"""OpenAI-compatible hosts as presets of the OpenAI kind, with their quirks.

- `groq`: `base_url` as Groq's SDK takes it (`https://api.groq.com`; batchd adds
  `/openai/v1`); `completion_window` from 24h to 7d; chat completions only; files up to
  100 MB; no Uploads API.
- `together`: `base_url` as Together's SDK takes it (`https://api.together.xyz`; batchd
  adds `/v1`); files with `purpose=batch-api`; lines `{custom_id, body}`; the create
  answers `{"job": …}`, the list is one JSON array, statuses are upper case, timestamps
  ISO, and a job reports `progress` (0-100), not request counts. A Together batch takes
  no metadata: its tag is its input file, uploaded for that attempt alone
  (`batchd-ATTEMPT.jsonl`), so an ambiguous create is found by `input_file_id`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from batchd.providers.base import Create, Owned, Page, Snapshot, obj, unix
from batchd.providers.errors import RateLimited, Transient
from batchd.providers.openai import BatchApi, OpenAI


class _NoUploads(BatchApi):
    uploads_api = False
    root_hint = "is {section} base_url Groq's root (https://api.groq.com, no /openai/v1)?"


class Groq(OpenAI):
    """Groq's OpenAI-compatible batches."""

    kind = "groq"
    client_class = _NoUploads
    path_suffix = "/openai/v1"


class _TogetherApi(BatchApi):
    uploads_api = False
    purpose = "batch-api"
    root_hint = "is {section} base_url Together's root (https://api.together.xyz, no /v1)?"

    def upload_fields(self, filename: str) -> dict[str, str]:
        # file_name: required by the upload form of Together's published spec (and sent
        # by its SDK); without it the file is named after the part's filename anyway.
        return {"purpose": self.purpose, "file_name": filename}

    async def find_file(
        self, filename: str, not_before: float, max_pages: int = 5
    ) -> dict[str, Any] | None:
        """Together's GET /files takes no parameters (no paging, no order): one list."""
        page = await self.call("list_files", "GET", "/files")
        for f in page.get("data") or []:
            if isinstance(f, dict) and f.get("filename") == filename:
                return dict(f)
        return None


_TOGETHER = {
    "VALIDATING": "validating",
    "IN_PROGRESS": "in_progress",
    "COMPLETED": "completed",
    "FAILED": "failed",
    "EXPIRED": "expired",
    "CANCELING": "cancelling",
    "CANCELLING": "cancelling",
    "CANCELLED": "cancelled",
}
_ENDS = {"completed": "completed_at", "failed": "failed_at", "expired": "expired_at"}


class Together(OpenAI):
    """Together's batch API."""

    kind = "together"
    tag = "input_file"
    client_class = _TogetherApi
    path_suffix = "/v1"

    async def create(self, req: Create) -> Snapshot:
        assert req.file_id is not None
        body = {
            "endpoint": req.endpoint or "/v1/chat/completions",
            "input_file_id": req.file_id,
            "completion_window": self.cfg.completion_window,
        }
        data = await self.api.call("create_batch", "POST", "/batches", (RateLimited,), json=body)
        job = obj(data, "job") or data
        return self.snapshot(job)

    async def find(self, req: Create, sent_at: float, owned: Owned) -> Snapshot | None:
        if req.file_id is None:
            return None
        for s in self.parse_page(await self.list_raw(None), None).batches:
            if s.raw.get("input_file_id") == req.file_id:
                return s
        return None

    async def list_raw(self, cursor: str | None) -> bytes:
        return await self.api.raw("list_batches", "GET", "/batches")

    def parse_page(self, raw: bytes, cursor: str | None = None) -> Page:
        data: Any = orjson.loads(raw)
        if isinstance(data, dict):
            data = data.get("data")
        if not isinstance(data, list):
            raise Transient("list_batches: unexpected response body")
        return Page([self.snapshot(b) for b in data if isinstance(b, dict)], None)

    def snapshot(self, b: Mapping[str, Any]) -> Snapshot:
        raw = str(b.get("status") or "")
        status = _TOGETHER.get(raw.upper(), raw.lower() or "validating")
        end = unix(b.get("completed_at"))
        times: dict[str, float | None] = {"ended_at": end}
        if status in _ENDS:
            times[_ENDS[status]] = end
        elif status == "cancelled":
            times["cancelled_at"] = end
        error = b.get("error")
        errors = ({"code": None, "message": str(error)},) if error and status == "failed" else ()
        return Snapshot(
            id=str(b.get("id")),
            status=status,
            raw_status=raw,
            completed=0,  # Together reports progress (0-100), not request counts
            failed=0,
            total=0,
            created_at=unix(b.get("created_at")) or 0.0,
            raw=dict(b),
            errors=errors,
            usage=obj(b, "usage") or None,
            times=times,
        )

    async def probe(self) -> int:
        return len(self.parse_page(await self.list_raw(None), None).batches)
