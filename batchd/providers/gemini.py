"""Gemini API Batch Mode (`kind = "gemini"`).

Input lines are `{key, request}` (a GenerateContentRequest each). A file larger than
`inline_max_bytes` is uploaded through the Files API (resumable protocol, one request
with a Content-Length) and the batch reads it by name; a smaller one goes inline, each
line as `{request, metadata: {key}}`. The job's model is in the create's URL
(`models/{model}:batchGenerateContent`). A batch is a long-running operation
`batches/{id}`; its `metadata.state` maps to batchd's statuses (`BATCH_STATE_PENDING` ->
validating, `RUNNING` -> in_progress, `SUCCEEDED` -> completed, `FAILED`, `CANCELLED`,
`EXPIRED`), `batchStats` to the counts. Results come as a file of `{key, response |
error}` lines, or inline in the operation (written out in the same shape).

Tag: the batch's `displayName` is `batchd-{attempt id}`; an ambiguous create is
reconciled by listing. Requests not run (cancel, expiry) have no result line: batchd
counts them missing and, unless the job was cancelled, sends them again.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from batchd import transport
from batchd.metrics import Metrics
from batchd.pieces import iter_lines
from batchd.provider_config import ProviderConfig
from batchd.providers.base import (
    Create,
    Owned,
    Page,
    Provider,
    ResultFile,
    Snapshot,
    Verdict,
    obj,
    unix,
)
from batchd.providers.errors import RateLimited, Transient
from batchd.providers.http import HttpClient, Lines, Tap
from batchd.providers.openai import custom_id_of
from batchd.usage import AttemptTally, Usage

_STATES = {
    "PENDING": "validating",
    "UNSPECIFIED": "validating",
    "RUNNING": "in_progress",
    "SUCCEEDED": "completed",
    "FAILED": "failed",
    "CANCELLED": "cancelled",
    "EXPIRED": "expired",
}
_ENDS = {"completed": "completed_at", "failed": "failed_at", "cancelled": "cancelled_at"}
_RETRYABLE = frozenset({408, 429, 500, 502, 503, 504})
TAG = "batchd-"


def gemini_auth(key: str | None) -> dict[str, str]:
    """`x-goog-api-key`."""
    return {"x-goog-api-key": key} if key else {}


class _Client(HttpClient):
    fixed_routes = frozenset({"create_batch", "list_batches", "upload_file", "list_files"})


def _count(stats: Mapping[str, Any], key: str) -> int:
    try:
        return int(stats.get(key) or 0)  # int64 as a JSON string
    except (TypeError, ValueError):
        return 0


def _strip(op: Mapping[str, Any]) -> dict[str, Any]:
    """The operation without inline responses (possibly megabytes; fetched again when
    the results are collected), as stored in attempts.batch."""
    out = dict(op)
    for outer in ("metadata", "response"):
        part = out.get(outer)
        if not isinstance(part, dict):
            continue
        part = dict(part)
        holder = part.get("output") if outer == "metadata" else part
        if isinstance(holder, dict) and "inlinedResponses" in holder:
            holder = {k: v for k, v in holder.items() if k != "inlinedResponses"}
            holder["inlinedResponses"] = {"batchd": "fetched when collected"}
            part = {**part, "output": holder} if outer == "metadata" else holder
        out[outer] = part
    return out


class Gemini(Provider):
    """Batch Mode of the Gemini Developer API."""

    kind = "gemini"
    tag = "display_name"
    id_key = "key"

    def __init__(self, cfg: ProviderConfig, api_key: str | None, metrics: Metrics) -> None:
        super().__init__(cfg, api_key, metrics)
        self._http = _Client(
            cfg.api, api_key, metrics, auth=gemini_auth, provider=cfg.name, section=cfg.section
        )
        self.version = cfg.api_version or "v1beta"

    @property
    def http(self) -> HttpClient:
        return self._http

    def _v(self, path: str) -> str:
        return f"/{self.version}/{path}"

    def stages_input(self, size: int) -> bool:
        return size > self.cfg.inline_max_bytes

    # --- files ------------------------------------------------------------------------

    async def stage(self, path: Path, filename: str, tap: Tap | None = None) -> str | None:
        size = path.stat().st_size

        async def once() -> str:
            head = {
                "X-Goog-Upload-Protocol": "resumable",
                "X-Goog-Upload-Command": "start",
                "X-Goog-Upload-Header-Content-Length": str(size),
                "X-Goog-Upload-Header-Content-Type": "application/jsonl",
            }
            body = {"file": {"displayName": filename}}
            url = f"/upload/{self.version}/files"
            async with self._http.request(
                "upload_file", "POST", url, json=body, headers=head
            ) as resp:
                upload_url = resp.headers.get("x-goog-upload-url")
                await resp.read()
            if not upload_url:
                raise Transient("upload_file: no x-goog-upload-url in the answer")
            send = {"X-Goog-Upload-Command": "upload, finalize", "X-Goog-Upload-Offset": "0"}
            data = transport.FileSlice(
                path, 0, size, tap.feed if tap else None, content_type="application/jsonl"
            )
            done = await self._http.json("upload_data", "POST", upload_url, data=data, headers=send)
            f = done.get("file")
            if not isinstance(f, dict) or not f.get("name"):
                raise Transient("upload_data: no file in the answer")
            self._http.counted_upload(size)
            return str(f["name"])

        return await self._http.retrying(once)

    async def find_staged(self, filename: str, not_before: float, size: int) -> str | None:
        token: str | None = None
        for _ in range(5):
            params = {"pageSize": "100", **({"pageToken": token} if token else {})}
            page = await self._http.call("list_files", "GET", self._v("files"), params=params)
            for f in page.get("files") or []:
                if f.get("displayName") != filename:
                    continue
                if str(f.get("sizeBytes")) == str(size):
                    return str(f["name"])
                await self.delete_file(str(f["name"]))  # partial or foreign: don't leak it
                return None
            token = page.get("nextPageToken")
            if not token:
                return None
        return None

    async def delete_file(self, file_id: str) -> None:
        await self._http.call("delete_file", "DELETE", self._v(file_id))

    # --- batches ----------------------------------------------------------------------

    def _inline(self, path: Path) -> bytes:
        """The inline requests of a small input: `{request, metadata: {key}}` each."""
        reqs = []
        for line in iter_lines(path):
            rec = orjson.loads(line)
            reqs.append({"request": rec["request"], "metadata": {"key": str(rec["key"])}})
        return orjson.dumps({"requests": reqs})

    async def create(self, req: Create) -> Snapshot:
        model = (req.model or self.cfg.model or "").removeprefix("models/")
        if not model:
            raise Transient("create_batch: no model for a Gemini batch")
        batch: dict[str, Any] = {"displayName": f"{TAG}{req.attempt_id}"}
        if req.file_id:
            batch["inputConfig"] = {"fileName": req.file_id}
            body = orjson.dumps({"batch": batch})
        else:
            inline = await asyncio.to_thread(self._inline, req.input_path)
            # {"batch": {"displayName", "inputConfig": {"requests": …}}}, spliced as bytes
            head = orjson.dumps({"batch": batch})[:-2]
            body = head + b',"inputConfig":{"requests":' + inline + b"}}}"
            self._http.counted_upload(len(body))
        url = self._v(f"models/{model}:batchGenerateContent")
        op = await self._http.call(
            "create_batch",
            "POST",
            url,
            (RateLimited,),
            data=body,
            headers={"Content-Type": "application/json"},
        )
        return self.snapshot(op)

    async def find(self, req: Create, sent_at: float, owned: Owned) -> Snapshot | None:
        want = f"{TAG}{req.attempt_id}"
        async for s in self.newest_first(sent_at - 600):
            if (s.raw.get("metadata") or {}).get("displayName") == want:
                return s
        return None

    async def get(self, batch_id: str) -> Snapshot:
        return self.snapshot(await self._http.call("get_batch", "GET", self._v(batch_id)))

    async def list_raw(self, cursor: str | None) -> bytes:
        params = {"pageSize": "100", **({"pageToken": cursor} if cursor else {})}
        return await self._http.raw("list_batches", "GET", self._v("batches"), params=params)

    def parse_page(self, raw: bytes, cursor: str | None = None) -> Page:
        data = orjson.loads(raw)
        if not isinstance(data, dict):
            raise Transient("list_batches: unexpected response body")
        ops = [self.snapshot(op) for op in data.get("operations") or [] if isinstance(op, dict)]
        token = data.get("nextPageToken")
        return Page(ops, str(token) if token and ops else None)

    def snapshot(self, op: Mapping[str, Any]) -> Snapshot:
        meta = obj(op, "metadata")
        raw = str(meta.get("state") or "")
        state = raw.removeprefix("BATCH_STATE_").removeprefix("JOB_STATE_")
        status = _STATES.get(state, "validating")
        stats = obj(meta, "batchStats")
        err = obj(op, "error")
        errors: tuple[dict[str, Any], ...] = ()
        if err and status == "failed":
            errors = ({"code": str(err.get("code")), "message": err.get("message")},)
        end = unix(meta.get("endTime"))
        times: dict[str, float | None] = {"ended_at": end}
        if status in _ENDS:
            times[_ENDS[status]] = end
        elif status == "expired":
            times["expired_at"] = end
        return Snapshot(
            id=str(op.get("name") or meta.get("name")),
            status=status,
            raw_status=raw,
            completed=_count(stats, "successfulRequestCount"),
            failed=_count(stats, "failedRequestCount"),
            total=_count(stats, "requestCount"),
            created_at=unix(meta.get("createTime")) or 0.0,
            raw=_strip(op),
            errors=errors,
            times=times,
        )

    async def cancel(self, batch_id: str) -> None:
        await self._http.call("cancel_batch", "POST", self._v(f"{batch_id}:cancel"))

    async def probe(self) -> int:
        page = await self._http.call(
            "list_batches", "GET", self._v("batches"), params={"pageSize": "1"}
        )
        return len(page.get("operations") or [])

    # --- results ----------------------------------------------------------------------

    def _output(self, snap: Snapshot) -> dict[str, Any]:
        meta = snap.raw.get("metadata") or {}
        out = meta.get("output") or (snap.raw.get("response") or {})
        return out if isinstance(out, dict) else {}

    def result_files(self, snap: Snapshot) -> list[ResultFile]:
        if not snap.ended:
            return []
        out = self._output(snap)
        n = snap.completed + snap.failed
        if out.get("responsesFile"):
            return [ResultFile("results", "file:" + str(out["responsesFile"]), n)]
        if "inlinedResponses" in out:
            return [ResultFile("results", "inline:" + snap.id, n)]
        return []

    def results_pending(self, snap: Snapshot) -> bool:
        return snap.status == "completed" and not self.result_files(snap)

    async def download(self, rf: ResultFile, dest: Path, lines: Lines) -> int:
        kind, _, ref = rf.ref.partition(":")
        if kind == "file":
            url = self._v(f"{ref}:download")
            return await self._http.download(
                "download_results", url, dest, lines, params={"alt": "media"}
            )
        op = await self._http.call("get_batch", "GET", self._v(ref))
        meta = op.get("metadata") or {}
        out = meta.get("output") or op.get("response") or {}
        items = (out.get("inlinedResponses") or {}).get("inlinedResponses") or []
        data = b"".join(orjson.dumps(_keyed(item, i)) + b"\n" for i, item in enumerate(items))
        await asyncio.to_thread(_write, dest, data)
        lines.reset()
        lines.feed(data)
        lines.end()
        self.metrics.downloaded_bytes.inc(len(data))
        return len(data)

    def result_id(self, line: bytes) -> str:
        return custom_id_of(line, b'"key"')

    def classify(self, line: bytes) -> tuple[str, Verdict]:
        rec = orjson.loads(line)
        key = str(rec.get("key"))
        if isinstance(rec.get("response"), dict):
            return key, Verdict.SUCCEEDED
        err = obj(rec, "error")
        code = err.get("code")
        retry = isinstance(code, int) and (code in _RETRYABLE or code >= 500)
        return key, Verdict.RETRYABLE if retry else Verdict.FAILED

    def tally_line(self, tally: AttemptTally, request_id: str, line: bytes) -> None:
        if (u := self.line_usage(line)) is not None:
            tally.add_usage(request_id, u)

    def line_usage(self, line: bytes) -> Usage | None:
        u = (orjson.loads(line).get("response") or {}).get("usageMetadata")
        if not isinstance(u, dict):
            return None

        def n(k: str) -> int:
            v = u.get(k)
            return v if type(v) is int and v > 0 else 0

        thoughts = n("thoughtsTokenCount")
        return Usage(
            input_tokens=n("promptTokenCount"),
            cached_tokens=n("cachedContentTokenCount"),
            output_tokens=n("candidatesTokenCount") + thoughts,
            reasoning_tokens=thoughts,
        )

    def request_error(self, rec: Mapping[str, Any]) -> dict[str, Any]:
        err: dict[str, Any] = rec["error"] if isinstance(rec.get("error"), dict) else {}
        code = err.get("code")
        return {
            "custom_id": rec.get("key"),
            "status_code": code if isinstance(code, int) else None,
            "code": err.get("status") or (str(code) if code is not None else None),
            "message": err.get("message"),
        }

    def missing_line(self, request_id: str, message: str) -> dict[str, Any]:
        return {
            "key": request_id,
            "error": {"code": 0, "status": "BATCHD_NO_RESULT", "message": message},
        }

    # --- the provider's copies --------------------------------------------------------

    def remote_copies(self, snap: Snapshot, file_id: str | None) -> list[tuple[str, str]]:
        out = [(file_id, "input")] if file_id else []
        f = self._output(snap).get("responsesFile")
        if f:
            out.append((str(f), "output"))
        if snap.ended:
            out.append((snap.id, "batch"))
        return out

    async def delete_remote(self, ref: str, kind: str) -> None:
        await self._http.call(
            f"delete_{'batch' if kind == 'batch' else 'file'}", "DELETE", self._v(ref)
        )


def _keyed(item: Mapping[str, Any], i: int) -> dict[str, Any]:
    """An inline response as a result file line: `{key, response | error}`."""
    meta = obj(item, "metadata")
    out: dict[str, Any] = {"key": str(meta.get("key", i))}
    for k in ("response", "error"):
        if k in item:
            out[k] = item[k]
    return out


def _write(dest: Path, data: bytes) -> None:
    tmp = dest.with_name(f".{dest.name}.part")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(dest)
