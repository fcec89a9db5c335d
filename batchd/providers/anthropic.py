"""Anthropic's Message Batches API (`kind = "anthropic"`).

Requests travel inline: the create's body is `{"requests": [line, …]}`, the input's
`{custom_id, params}` lines streamed from disk as they are (nothing is uploaded first).
Statuses `in_progress` / `canceling` / `ended` map to batchd's `in_progress` /
`cancelling` / `completed`, `expired` (some requests expired) or `cancelled` (a cancel was
initiated); the raw status is kept. Results are one JSONL stream at `results_url`
(`succeeded`, `errored`, `canceled`, `expired` per request), split into output.jsonl and
errors.jsonl. An ended batch is deleted once its results are on disk.

What it cannot do that OpenAI can: a batch carries no metadata, so the attempt id cannot
travel with it. After an ambiguous create batchd reconciles by listing: a batch created
since the create was sent (minus clock slack), with the attempt's request count, that no
other attempt owns; creates on an Anthropic provider are serialised (one in flight, and
its reconcile, at a time) so that two of batchd's own never match each other.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from batchd.metrics import Metrics
from batchd.provider_config import ProviderConfig
from batchd.providers.base import (
    Create,
    Owned,
    Page,
    Provider,
    ResultFile,
    Snapshot,
    Verdict,
    unix,
)
from batchd.providers.errors import RateLimited, Transient
from batchd.providers.http import HttpClient, JsonArray, Lines
from batchd.providers.openai import custom_id_of
from batchd.usage import AttemptTally, Usage, usage_of_body

BATCHES = "/v1/messages/batches"
# Errors another try will not fix; the rest (api_error, overloaded_error, rate_limit_error,
# timeouts) may pass (Anthropic's docs: only invalid requests need changing).
_FINAL = frozenset(
    {
        "invalid_request_error",
        "not_found_error",
        "authentication_error",
        "permission_error",
        "billing_error",
        "request_too_large",
    }
)
CLOCK_SLACK = 120.0  # seconds a batch's created_at may precede our clock's create_sent_at


def anthropic_auth(version: str) -> Any:
    """`x-api-key` and `anthropic-version`."""

    def auth(key: str | None) -> dict[str, str]:
        h = {"anthropic-version": version}
        if key:
            h["x-api-key"] = key
        return h

    return auth


class _Client(HttpClient):
    fixed_routes = frozenset({"create_batch", "list_batches"})


class Anthropic(Provider):
    """Message Batches."""

    kind = "anthropic"
    tag = "none"
    stages_files = False

    def __init__(self, cfg: ProviderConfig, api_key: str | None, metrics: Metrics) -> None:
        super().__init__(cfg, api_key, metrics)
        self._http = _Client(
            cfg.api,
            api_key,
            metrics,
            auth=anthropic_auth(cfg.api_version or "2023-06-01"),
            provider=cfg.name,
            section=cfg.section,
        )
        self._serial = asyncio.Lock()

    @property
    def http(self) -> HttpClient:
        return self._http

    def serial(self) -> asyncio.Lock:
        return self._serial

    # --- batches ----------------------------------------------------------------------

    async def create(self, req: Create) -> Snapshot:
        async def once() -> dict[str, Any]:
            body = JsonArray(req.input_path, b'{"requests":[', b"]}")
            size = await asyncio.to_thread(body.measure)
            data = await self._http.json("create_batch", "POST", BATCHES, data=body)
            self._http.counted_upload(size)
            return data

        # Only a 429 is retried here: after anything else the batch may exist.
        b = await self._http.retrying(once, (RateLimited,))
        return self.snapshot(b)

    async def find(self, req: Create, sent_at: float, owned: Owned) -> Snapshot | None:
        since = sent_at - CLOCK_SLACK
        best: Snapshot | None = None
        async for s in self.newest_first(since):
            if s.created_at < since:
                continue  # the last one listed: older than the create
            if s.total != req.requests or await owned(s.id):
                continue
            best = s  # newest first: the last match is the closest after `since`
        return best

    async def get(self, batch_id: str) -> Snapshot:
        return self.snapshot(await self._http.call("get_batch", "GET", f"{BATCHES}/{batch_id}"))

    async def list_raw(self, cursor: str | None) -> bytes:
        params = {"limit": "100"}
        if cursor:
            params["after_id"] = cursor
        return await self._http.raw("list_batches", "GET", BATCHES, params=params)

    def parse_page(self, raw: bytes, cursor: str | None = None) -> Page:
        data = orjson.loads(raw)
        if not isinstance(data, dict):
            raise Transient("list_batches: unexpected response body")
        batches = [self.snapshot(b) for b in data.get("data") or [] if isinstance(b, dict)]
        more = bool(data.get("has_more")) and bool(batches)
        return Page(batches, str(data.get("last_id") or batches[-1].id) if more else None)

    def snapshot(self, b: Mapping[str, Any]) -> Snapshot:
        raw = str(b.get("processing_status") or "")
        rc = b.get("request_counts") or {}
        n = {
            k: int(rc.get(k) or 0)
            for k in ("processing", "succeeded", "errored", "canceled", "expired")
        }
        ended = unix(b.get("ended_at"))
        if raw == "ended":
            if b.get("cancel_initiated_at"):
                status, end_key = "cancelled", "cancelled_at"
            elif n["expired"]:
                status, end_key = "expired", "expired_at"
            else:
                status, end_key = "completed", "completed_at"
        else:
            status, end_key = ("cancelling" if raw == "canceling" else "in_progress"), ""
        times: dict[str, float | None] = {"ended_at": ended}
        if end_key:
            times[end_key] = ended
        return Snapshot(
            id=str(b.get("id")),
            status=status,
            raw_status=raw,
            completed=n["succeeded"],
            failed=n["errored"] + n["canceled"] + n["expired"],
            total=sum(n.values()),
            created_at=unix(b.get("created_at")) or 0.0,
            raw=dict(b),
            times=times,
        )

    async def cancel(self, batch_id: str) -> None:
        await self._http.call("cancel_batch", "POST", f"{BATCHES}/{batch_id}/cancel")

    # --- results ----------------------------------------------------------------------

    def result_files(self, snap: Snapshot) -> list[ResultFile]:
        url = snap.raw.get("results_url")
        if not snap.ended or not url:
            return []
        # Every request of an ended batch has a line (succeeded/errored/canceled/expired).
        return [ResultFile("results", str(url), snap.total)]

    def results_pending(self, snap: Snapshot) -> bool:
        return snap.ended and not snap.raw.get("results_url")

    async def download(self, rf: ResultFile, dest: Path, lines: Lines) -> int:
        return await self._http.download("download_results", rf.ref, dest, lines)

    def result_id(self, line: bytes) -> str:
        return custom_id_of(line)

    def classify(self, line: bytes) -> tuple[str, Verdict]:
        rec = orjson.loads(line)
        cid = str(rec.get("custom_id"))
        result = rec.get("result") if isinstance(rec.get("result"), dict) else {}
        kind = result.get("type")
        if kind == "succeeded":
            return cid, Verdict.SUCCEEDED
        if kind == "expired":
            return cid, Verdict.EXPIRED
        if kind == "canceled":
            return cid, Verdict.CANCELED
        err = (result.get("error") or {}).get("error") or {}
        return cid, Verdict.FAILED if err.get("type") in _FINAL else Verdict.RETRYABLE

    def tally_line(self, tally: AttemptTally, request_id: str, line: bytes) -> None:
        if (u := self.line_usage(line)) is not None:
            tally.add_usage(request_id, u)

    def line_usage(self, line: bytes) -> Usage | None:
        result = orjson.loads(line).get("result") or {}
        return usage_of_body(result.get("message")) if result.get("type") == "succeeded" else None

    def request_error(self, rec: Mapping[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = rec["result"] if isinstance(rec.get("result"), dict) else {}
        kind = result.get("type")
        if kind == "errored":
            err = (result.get("error") or {}).get("error") or {}
            code, message = err.get("type"), err.get("message")
        elif kind in ("canceled", "expired"):
            code, message = kind, f"the request was {kind} before it ran"
        else:
            other: dict[str, Any] = rec["error"] if isinstance(rec.get("error"), dict) else {}
            code, message = other.get("code"), other.get("message")
        return {
            "custom_id": rec.get("custom_id"),
            "status_code": None,
            "code": code,
            "message": message,
        }

    def missing_line(self, request_id: str, message: str) -> dict[str, Any]:
        return {
            "custom_id": request_id,
            "result": {
                "type": "errored",
                "error": {
                    "type": "error",
                    "error": {"type": "batchd_no_result", "message": message},
                },
            },
        }

    # --- the provider's copies --------------------------------------------------------

    def remote_copies(self, snap: Snapshot, file_id: str | None) -> list[tuple[str, str]]:
        return [(snap.id, "batch")] if snap.ended else []

    async def delete_remote(self, ref: str, kind: str) -> None:
        await self._http.call("delete_batch", "DELETE", f"{BATCHES}/{ref}")
