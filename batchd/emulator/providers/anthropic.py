"""Anthropic Message Batches under ``/anthropic/v1/messages/batches``.

Inline ``requests`` of ``{custom_id, params}`` (checked at create: 1..100,000 requests, 256 MB,
``custom_id`` ``^[a-zA-Z0-9_-]{1,64}$`` and unique); ``params`` are checked per request while
the batch runs (an invalid one ends ``errored`` with ``invalid_request_error``). Statuses
``in_progress`` / ``canceling`` / ``ended``; ``request_counts`` stay in ``processing`` until the
batch ends; RFC 3339 timestamps; results as one JSONL stream at ``results_url`` with
``succeeded`` / ``errored`` / ``canceled`` / ``expired`` lines. Auth ``x-api-key`` (or Bearer)
plus ``anthropic-version``.
"""

from __future__ import annotations

import re
import secrets
from typing import Any, ClassVar

import orjson
from aiohttp import web

from batchd.emulator.dialect import Dialect
from batchd.emulator.http import json_response, send_file
from batchd.emulator.ids import rfc3339
from batchd.emulator.lines import Json, Problem, Req, Rules, estimate_tokens
from batchd.emulator.providers.base import Handler, Provider, bearer_token
from batchd.emulator.state import DAY, TERMINAL, ApiError, Batch

BASE = "/anthropic/v1/messages/batches"
CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
ENDPOINT = "/v1/messages"
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}
_STATUS = {"cancelling": "canceling", **{t: "ended" for t in TERMINAL}}


def error_type(status: int) -> str:
    """Anthropic's error ``type`` for an HTTP status."""
    return _TYPES.get(status, "api_error")


def _msg_id() -> str:
    return "msg_" + secrets.token_hex(12)


class _Rules(Rules):
    """Lines ``{custom_id, params}`` (the create call already checked the envelope)."""

    same_model = False
    max_tasks = 10**9  # the create call enforces the limit

    def problem(self, obj: Any, seen: set[str], model: str | None) -> Problem | None:
        return None

    def body(self, obj: Json) -> Json:
        return dict(obj["params"])

    def model(self, obj: Json) -> str | None:
        return None

    def request_error(self, obj: Json) -> str | None:
        params = obj["params"]
        for key, typ in (("model", str), ("max_tokens", int), ("messages", list)):
            if not isinstance(params.get(key), typ):
                return f"{key}: Field required"
        if params.get("stream"):
            return "stream: streaming is not supported in Message Batches"
        if params["max_tokens"] < 1:
            return "max_tokens: Input should be greater than or equal to 1"
        return None

    def meta(self, obj: Json) -> Any:
        return obj["params"].get("model")  # echoed as the reply's model


class AnthropicDialect(Dialect):
    """One results stream; canceled and expired requests get their own lines."""

    name = "anthropic"
    split_errors = False
    webhooks = False
    token_limit_at_validation = False
    cancel_keeps_requests = True  # request_counts always sum to the batch's size

    def rules(self, endpoint: str, model: str | None) -> Rules:
        return _Rules(endpoint)

    def result_line(self, b: Batch, r: Req, outcome: str, created: int) -> tuple[Json | None, int]:
        head: Json = {"custom_id": r.custom_id}
        if outcome in ("canceled", "expired"):
            return head | {"result": {"type": outcome}}, 0
        if outcome == "errored":
            kind = error_type(r.status)
            why = r.message or f"Emulated request failure (HTTP {r.status})."
            err: Json = {"type": "error", "error": {"type": kind, "message": why}}
            err["request_id"] = "req_" + secrets.token_hex(12)
            return head | {"result": {"type": "errored", "error": err}}, 0
        text = f"Emulated reply to: {r.text}"
        n_out = 1 + len(text) // 4
        usage = {"input_tokens": r.tokens, "output_tokens": n_out}
        usage |= {"cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
        message: Json = {
            "id": _msg_id(),
            "type": "message",
            "role": "assistant",
            "model": r.meta or "claude-emulated",
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": usage | {"service_tier": "batch"},
        }
        return head | {"result": {"type": "succeeded", "message": message}}, n_out

    def pad(self, line: Json, pad: str) -> Json:
        return line | {"x_pad": pad}


class Anthropic(Provider):
    """The Message Batches API."""

    name: ClassVar[str] = "anthropic"
    prefix: ClassVar[str] = "/anthropic/"
    create_routes = frozenset({f"POST {BASE}"})
    download_routes = frozenset({f"GET {BASE}/{{id}}/results"})
    dialect = AnthropicDialect()

    def auth(self, request: web.Request) -> None:
        token = request.headers.get("x-api-key") or bearer_token(request)
        key = self.state.config.api_key
        if not token or (key is not None and token != key):
            raise ApiError(401, "invalid x-api-key")
        if not request.headers.get("anthropic-version"):
            raise ApiError(400, "anthropic-version: header is required")

    def error_body(self, err: ApiError) -> Json:
        inner = {"type": err.kind or error_type(err.status), "message": err.message}
        return {"type": "error", "error": inner, "request_id": "req_" + secrets.token_hex(12)}

    def fault(self, status: int, message: str, code: str | None, path: str = "") -> web.Response:
        return self.error(ApiError(status, message), path)

    def render(self, request: web.Request, b: Batch) -> Json:
        """The MessageBatch object."""
        status = _STATUS.get(b.status, "in_progress")
        ended = status == "ended"
        end = next((b.ts[f"{s}_at"] for s in TERMINAL if f"{s}_at" in b.ts), None)
        o = b.outcomes
        counts = {
            "processing": 0 if ended else b.total,
            "succeeded": o["succeeded"],
            "errored": o["errored"],
            "canceled": o["canceled"],
            "expired": o["expired"],
        }
        base = f"{request.scheme}://{request.host}{BASE}"
        return {
            "id": b.id,
            "type": "message_batch",
            "processing_status": status,
            "request_counts": counts,
            "created_at": rfc3339(b.created_at),
            "expires_at": rfc3339(b.created_at + DAY),
            "ended_at": rfc3339(end),
            "cancel_initiated_at": rfc3339(b.ts.get("cancelling_at")),
            "archived_at": None,
            "results_url": f"{base}/{b.id}/results" if ended else None,
        }

    async def create(self, request: web.Request) -> web.StreamResponse:
        cfg = self.state.config
        raw = await request.read()
        if len(raw) > cfg.anthropic_max_bytes:
            raise ApiError(413, f"Request exceeds the maximum size of {cfg.anthropic_max_bytes}")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        reqs = body.get("requests") if isinstance(body, dict) else None
        if not isinstance(reqs, list) or not reqs:
            raise ApiError(400, "requests: Field required (a non-empty list)")
        if len(reqs) > cfg.anthropic_max_requests:
            raise ApiError(400, f"requests: at most {cfg.anthropic_max_requests} items")
        seen: set[str] = set()
        for i, item in enumerate(reqs):
            cid = item.get("custom_id") if isinstance(item, dict) else None
            if not isinstance(cid, str) or not CUSTOM_ID.match(cid):
                raise ApiError(400, f"requests.{i}.custom_id: must match ^[a-zA-Z0-9_-]{{1,64}}$")
            if not isinstance(item.get("params"), dict):
                raise ApiError(400, f"requests.{i}.params: Field required")
            if cid in seen:
                raise ApiError(400, f"requests.{i}.custom_id: duplicate custom_id '{cid}'")
            seen.add(cid)
        bid = "msgbatch_" + secrets.token_hex(12)
        path = self.state.data_dir / f"{bid}.input.jsonl"
        path.write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in reqs))
        b = self.state.start_batch(
            self.name, self.dialect, path, ENDPOINT, bid=bid, total=len(reqs)
        )
        b.tokens = sum(estimate_tokens(x["params"]) for x in reqs)
        return json_response(self.render(request, b))

    def _batch(self, request: web.Request) -> Batch:
        try:
            return self.state.get_batch(request.match_info["id"], self.name)
        except ApiError:
            raise ApiError(404, "Message Batch not found") from None

    async def get(self, request: web.Request) -> web.StreamResponse:
        return json_response(self.render(request, self._batch(request)))

    async def list_batches(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        raw = q.get("limit", "20")
        if not raw.isdigit() or not 1 <= int(raw) <= 1000:
            raise ApiError(400, "limit: Input should be between 1 and 1000")
        limit, batches = int(raw), self.state.provider_batches(self.name)
        ids = [b.id for b in batches]
        for key in ("after_id", "before_id"):
            if key in q and q[key] not in ids:
                raise ApiError(400, f"{key}: no Message Batch '{q[key]}'")
        if "before_id" in q:  # the page of (newer) batches just before this one
            end = ids.index(q["before_id"])
            page, has_more = batches[max(0, end - limit) : end], end - limit > 0
        else:
            start = ids.index(q["after_id"]) + 1 if "after_id" in q else 0
            page, has_more = batches[start : start + limit], start + limit < len(batches)
        data = [self.render(request, b) for b in page]
        return json_response(
            {
                "data": data,
                "has_more": has_more,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
            }
        )

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        b = self._batch(request)
        if b.status in ("validating", "in_progress", "finalizing"):
            self.state.cancel_batch(b.id, self.name)
        return json_response(self.render(request, b))

    async def delete(self, request: web.Request) -> web.StreamResponse:
        b = self._batch(request)
        if b.status not in TERMINAL:
            msg = "Message Batch cannot be deleted while it is still processing; cancel it first."
            raise ApiError(400, msg)
        self.state.delete_batch(b)
        return json_response({"id": b.id, "type": "message_batch_deleted"})

    async def results(self, request: web.Request) -> web.StreamResponse:
        b = self._batch(request)
        if b.status not in TERMINAL or b.output_file_id is None:
            raise ApiError(404, f"No results available for Message Batch {b.id}: not ended")
        f = self.state.get_file(b.output_file_id, self.name)
        return await send_file(request, self.state, f.path, f.bytes, "application/binary")

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [
            ("POST", BASE, self.create),
            ("GET", BASE, self.list_batches),
            ("GET", f"{BASE}/{{id}}", self.get),
            ("DELETE", f"{BASE}/{{id}}", self.delete),
            ("POST", f"{BASE}/{{id}}/cancel", self.cancel),
            ("GET", f"{BASE}/{{id}}/results", self.results),
        ]
