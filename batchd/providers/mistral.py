"""Mistral's batch jobs (`kind = "mistral"`).

Input lines are `{custom_id, body}`; the file is uploaded with `purpose=batch` and the
job names it in `input_files`, with one job-level `model` (the lines' `body.model`, or
`[providers.NAME] model`), the `endpoint` (`[providers.NAME] endpoint`) and
`timeout_hours`. Statuses `QUEUED` -> validating, `RUNNING` -> in_progress, `SUCCESS` ->
completed, `FAILED`, `TIMEOUT_EXCEEDED` -> expired, `CANCELLATION_REQUESTED` ->
cancelling, `CANCELLED`. Output and error files carry OpenAI-shaped lines; a request not
run before the timeout has an error line (`response: null`), sent again by batchd.

Tag: `metadata.batchd_attempt`, as on OpenAI; an ambiguous create is reconciled by
listing jobs (pages by number, newest first).
"""

from __future__ import annotations

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
    obj,
    unix,
)
from batchd.providers.errors import RateLimited, Transient
from batchd.providers.http import HttpClient, Lines, Tap, bearer, form
from batchd.providers.openai import custom_id_of, openai_verdict

JOBS = "/v1/batch/jobs"
PAGE = 100
_STATUS = {
    "QUEUED": "validating",
    "RUNNING": "in_progress",
    "SUCCESS": "completed",
    "FAILED": "failed",
    "TIMEOUT_EXCEEDED": "expired",
    "CANCELLATION_REQUESTED": "cancelling",
    "CANCELLED": "cancelled",
}
_ENDS = {"completed": "completed_at", "failed": "failed_at", "expired": "expired_at"}
TIMEOUT_CODE = 3000  # an error line for a request past the job's timeout_hours


class _Client(HttpClient):
    fixed_routes = frozenset({"upload_file", "create_batch", "list_batches", "list_files"})


class Mistral(Provider):
    """Mistral batch jobs and files."""

    kind = "mistral"
    tag = "metadata"

    def __init__(self, cfg: ProviderConfig, api_key: str | None, metrics: Metrics) -> None:
        super().__init__(cfg, api_key, metrics)
        self._http = _Client(
            cfg.api, api_key, metrics, auth=bearer, provider=cfg.name, section=cfg.section
        )

    @property
    def http(self) -> HttpClient:
        return self._http

    # --- files ------------------------------------------------------------------------

    async def stage(self, path: Path, filename: str, tap: Tap | None = None) -> str | None:
        size = path.stat().st_size

        async def once() -> str:
            body = form("file", path, 0, size, tap, filename, "application/jsonl", purpose="batch")
            f = await self._http.json("upload_file", "POST", "/v1/files", data=body)
            self._http.counted_upload(size)
            return str(f["id"])

        return await self._http.retrying(once)

    async def find_staged(self, filename: str, not_before: float, size: int) -> str | None:
        for page in range(5):
            params = {"page": str(page), "page_size": str(PAGE), "purpose": "batch"}
            data = await self._http.call("list_files", "GET", "/v1/files", params=params)
            files = data.get("data") or []
            for f in files:
                if f.get("filename") != filename:
                    continue
                if f.get("bytes") == size:
                    return str(f["id"])
                await self.delete_file(str(f["id"]))  # partial or foreign: don't leak it
                return None
            if len(files) < PAGE:
                return None
        return None

    async def delete_file(self, file_id: str) -> None:
        await self._http.call("delete_file", "DELETE", f"/v1/files/{file_id}")

    # --- jobs -------------------------------------------------------------------------

    async def create(self, req: Create) -> Snapshot:
        assert req.file_id is not None
        model = req.model or self.cfg.model
        body: dict[str, Any] = {
            "input_files": [req.file_id],
            "endpoint": self.cfg.endpoint or req.endpoint or "/v1/chat/completions",
            "metadata": {**req.metadata, ATTEMPT_KEY: req.attempt_id},
            "timeout_hours": self.cfg.timeout_hours,
        }
        if model:
            body["model"] = model
        job = await self._http.call("create_batch", "POST", JOBS, (RateLimited,), json=body)
        return self.snapshot(job)

    async def find(self, req: Create, sent_at: float, owned: Owned) -> Snapshot | None:
        async for s in self.newest_first(sent_at - 600):
            if (s.raw.get("metadata") or {}).get(ATTEMPT_KEY) == req.attempt_id:
                return s
        return None

    async def get(self, batch_id: str) -> Snapshot:
        return self.snapshot(await self._http.call("get_batch", "GET", f"{JOBS}/{batch_id}"))

    async def list_raw(self, cursor: str | None) -> bytes:
        params = {"page": cursor or "0", "page_size": str(PAGE), "order_by": "-created"}
        return await self._http.raw("list_batches", "GET", JOBS, params=params)

    def parse_page(self, raw: bytes, cursor: str | None = None) -> Page:
        data = orjson.loads(raw)
        if not isinstance(data, dict):
            raise Transient("list_batches: unexpected response body")
        jobs = [self.snapshot(j) for j in data.get("data") or [] if isinstance(j, dict)]
        page = int(cursor or 0)
        total = data.get("total")
        more = len(jobs) == PAGE and (not isinstance(total, int) or (page + 1) * PAGE < total)
        return Page(jobs, str(page + 1) if more else None)

    def snapshot(self, j: Mapping[str, Any]) -> Snapshot:
        raw = str(j.get("status") or "")
        status = _STATUS.get(raw, "validating")
        errors = tuple(
            {"code": None, "message": e.get("message"), "count": e.get("count")}
            for e in j.get("errors") or []
            if isinstance(e, dict)
        )
        end = unix(j.get("completed_at"))
        times: dict[str, float | None] = {
            "ended_at": end,
            "in_progress_at": unix(j.get("started_at")),
        }
        if status in _ENDS:
            times[_ENDS[status]] = end
        elif status == "cancelled":
            times["cancelled_at"] = end
        return Snapshot(
            id=str(j.get("id")),
            status=status,
            raw_status=raw,
            completed=int(j.get("succeeded_requests") or 0),
            failed=int(j.get("failed_requests") or 0),
            total=int(j.get("total_requests") or 0),
            created_at=unix(j.get("created_at")) or 0.0,
            raw={k: v for k, v in j.items() if k != "outputs"},
            errors=errors if status == "failed" else (),
            times=times,
        )

    async def cancel(self, batch_id: str) -> None:
        await self._http.call("cancel_batch", "POST", f"{JOBS}/{batch_id}/cancel")

    async def probe(self) -> int:
        data = await self._http.call(
            "list_batches", "GET", JOBS, params={"page": "0", "page_size": "1"}
        )
        return len(data.get("data") or [])

    # --- results ----------------------------------------------------------------------

    def result_files(self, snap: Snapshot) -> list[ResultFile]:
        return file_results(snap, "output_file", "error_file")

    def results_pending(self, snap: Snapshot) -> bool:
        return file_results_pending(snap, "output_file", "error_file")

    async def download(self, rf: ResultFile, dest: Path, lines: Lines) -> int:
        return await self._http.download(
            "download_file", f"/v1/files/{rf.ref}/content", dest, lines
        )

    def result_id(self, line: bytes) -> str:
        return custom_id_of(line)

    def classify(self, line: bytes) -> tuple[str, Verdict]:
        rec = orjson.loads(line)
        cid = str(rec.get("custom_id"))
        err = obj(rec, "error")
        if rec.get("response") is None and err.get("code") == TIMEOUT_CODE:
            return cid, Verdict.EXPIRED
        return cid, openai_verdict(rec)

    # --- the provider's copies --------------------------------------------------------

    def remote_copies(self, snap: Snapshot, file_id: str | None) -> list[tuple[str, str]]:
        out = super().remote_copies(snap, file_id)
        for key, kind in (("output_file", "output"), ("error_file", "error")):
            if snap.raw.get(key):
                out.append((str(snap.raw[key]), kind))
        if snap.ended:
            out.append((snap.id, "batch"))
        return out

    async def delete_remote(self, ref: str, kind: str) -> None:
        if kind == "batch":
            await self._http.call("delete_batch", "DELETE", f"{JOBS}/{ref}")
        else:
            await self.delete_file(ref)
