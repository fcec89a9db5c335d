"""Tests for the built-in OpenAI Batch API emulator, over a real loopback server."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from batchd.emulator import EmulatorConfig, EmulatorState, create_app, estimate_tokens, serve

CHAT = "/v1/chat/completions"
TERMINAL = ("completed", "failed", "expired", "cancelled")
Json = dict[str, Any]


@asynccontextmanager
async def emulator(**kw: Any) -> AsyncIterator[tuple[aiohttp.ClientSession, EmulatorState]]:
    state = EmulatorState(EmulatorConfig(**{"time_scale": 0.001, **kw}))
    runner = web.AppRunner(create_app(state))
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        headers = {"Authorization": "Bearer sk-test"}
        async with aiohttp.ClientSession(url, headers=headers) as session:
            yield session, state
    finally:
        await runner.cleanup()
        state.close()


def req(i: int, model: str = "gpt-4o-mini", url: str = CHAT, **body: Any) -> Json:
    body = {"model": model, "messages": [{"role": "user", "content": f"hi {i}"}], **body}
    return {"custom_id": f"r{i}", "method": "POST", "url": url, "body": body}


async def upload(
    s: aiohttp.ClientSession, lines: list[Json] | bytes, purpose: str = "batch"
) -> Json:
    data = lines if isinstance(lines, bytes) else b"".join(orjson.dumps(x) + b"\n" for x in lines)
    form = aiohttp.FormData()
    form.add_field("purpose", purpose)
    form.add_field("file", data, filename="in.jsonl", content_type="application/jsonl")
    async with s.post("/v1/files", data=form) as r:
        body: Json = await r.json()
        return body | {"_status": r.status}


async def call(s: aiohttp.ClientSession, method: str, path: str, **kw: Any) -> tuple[int, Json]:
    async with s.request(method, path, **kw) as r:
        return r.status, await r.json()


async def create(s: aiohttp.ClientSession, lines: list[Json], endpoint: str = CHAT) -> Json:
    f = await upload(s, lines)
    body = {"input_file_id": f["id"], "endpoint": endpoint, "completion_window": "24h"}
    status, batch = await call(s, "POST", "/v1/batches", json=body)
    assert status == 200, batch
    return batch


async def wait(s: aiohttp.ClientSession, bid: str, until: tuple[str, ...] = TERMINAL) -> Json:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        _, batch = await call(s, "GET", f"/v1/batches/{bid}")
        if batch["status"] in until:
            return batch
        await asyncio.sleep(0.005)
    raise AssertionError(f"batch {bid} never reached {until}")


async def content(s: aiohttp.ClientSession, fid: str | None) -> list[Json]:
    assert fid is not None
    async with s.get(f"/v1/files/{fid}/content") as r:
        assert r.status == 200 and r.content_length is not None
        raw = await r.read()
        assert len(raw) == r.content_length
    return [orjson.loads(x) for x in raw.splitlines()]


async def test_auth_and_errors() -> None:
    async with emulator(api_key="sk-right") as (s, _):
        status, body = await call(s, "GET", "/v1/batches")
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        async with s.get("/v1/batches", headers={"Authorization": ""}) as r:
            body = await r.json()
            assert r.status == 401 and list(body["error"]) == ["message", "type", "param", "code"]
        good = {"Authorization": "Bearer sk-right"}
        assert (await call(s, "GET", "/v1/batches/batch_nope", headers=good))[0] == 404
        assert (await call(s, "GET", "/v1/nope", headers=good))[0] == 404
        status, stats = await call(s, "GET", "/_emulator/stats", headers={"Authorization": ""})
        assert status == 200 and stats["calls"]["GET /v1/batches"] == 2


async def test_lifecycle_completed() -> None:
    async with emulator(output_pad_bytes=10) as (s, state):
        lines = [req(i) for i in range(30)]
        batch = await create(s, lines)
        assert batch["status"] == "validating" and "model" not in batch
        assert batch["expires_at"] == batch["created_at"] + 86400
        done = await wait(s, batch["id"])
        assert done["status"] == "completed" and done["model"] == "gpt-4o-mini"
        assert done["request_counts"] == {"total": 30, "completed": 30, "failed": 0}
        assert done["error_file_id"] is None and done["errors"] is None
        assert done["usage"]["input_tokens"] == sum(estimate_tokens(x["body"]) for x in lines)
        assert done["usage"]["total_tokens"] > done["usage"]["input_tokens"]
        for key in ("in_progress_at", "finalizing_at", "completed_at"):
            assert done[key] >= done["created_at"]
        out = await content(s, done["output_file_id"])
        ids = [o["custom_id"] for o in out]
        assert sorted(ids) == sorted(x["custom_id"] for x in lines) and ids != [
            x["custom_id"] for x in lines
        ]
        first = out[0]
        assert first["error"] is None and first["id"].startswith("batch_req_")
        assert first["response"]["status_code"] == 200
        assert first["response"]["body"]["object"] == "chat.completion"
        assert first["response"]["body"]["x_pad"] == "x" * 10
        _, f = await call(s, "GET", f"/v1/files/{done['output_file_id']}")
        assert f["purpose"] == "batch_output" and f["object"] == "file"
        assert state.batches()[0]["status"] == "completed" and state.batches_created == 1
        assert {"POST /v1/files", "POST /v1/batches", "GET /v1/batches/{id}"} <= set(state.calls)
        assert state.calls["GET /v1/files/{id}/content"] == 1


@pytest.mark.parametrize(
    ("endpoint", "extra", "check"),
    [
        ("/v1/embeddings", {"input": ["a", "b", "c"]}, lambda b: len(b["data"]) == 3),
        ("/v1/responses", {"input": "hello"}, lambda b: b["object"] == "response"),
        ("/v1/moderations", {"input": "hello"}, lambda b: len(b["results"]) == 1),
        ("/v1/completions", {"prompt": "hello"}, lambda b: b["object"] == "text_completion"),
        ("/v1/images/generations", {"prompt": "cat"}, lambda b: "id" in b),
    ],
)
async def test_endpoint_bodies(endpoint: str, extra: Json, check: Any) -> None:
    async with emulator() as (s, _):
        lines = [req(i, url=endpoint, **extra) for i in range(2)]
        done = await wait(s, (await create(s, lines, endpoint))["id"])
        assert done["status"] == "completed"
        assert all(check(o["response"]["body"]) for o in await content(s, done["output_file_id"]))


async def test_validation_failure_reports_lines() -> None:
    async with emulator() as (s, _):
        bad = b"\n".join(
            [
                orjson.dumps(req(1)),
                b"{not json",
                orjson.dumps(req(1)),
                orjson.dumps(req(2, url="/v1/embeddings")),
                orjson.dumps(req(3, model="gpt-4o")),
                orjson.dumps({"method": "POST", "url": CHAT, "body": {"model": "m"}}),
                b"",
            ]
        )
        f = await upload(s, bad)
        body = {"input_file_id": f["id"], "endpoint": CHAT, "completion_window": "24h"}
        done = await wait(s, (await call(s, "POST", "/v1/batches", json=body))[1]["id"])
        assert done["status"] == "failed" and done["failed_at"] is not None
        errs = [(e["code"], e["line"]) for e in done["errors"]["data"]]
        assert errs == [
            ("invalid_json_line", 2),
            ("duplicate_custom_id", 3),
            ("url_mismatch", 4),
            ("model_mismatch", 5),
            ("missing_required_parameter", 6),
        ]
        f = await upload(s, b"\n")
        body["input_file_id"] = f["id"]
        done = await wait(s, (await call(s, "POST", "/v1/batches", json=body))[1]["id"])
        assert done["errors"]["data"][0] | {"message": ""} == {
            "code": "empty_file",
            "line": None,
            "param": None,
            "message": "",
        }


async def test_mixed_success_and_failure() -> None:
    async with emulator() as (s, _):
        lines = [req(i, x_emulator={"status": 400 if i % 3 == 0 else 200}) for i in range(9)]
        lines[1]["body"]["x_emulator"] = {"status": 503}
        done = await wait(s, (await create(s, lines))["id"])
        assert done["request_counts"] == {"total": 9, "completed": 5, "failed": 4}
        errs = await content(s, done["error_file_id"])
        assert {e["custom_id"]: e["response"]["status_code"] for e in errs} == {
            "r0": 400,
            "r1": 503,
            "r3": 400,
            "r6": 400,
        }
        assert all(e["error"] is None and "message" in e["response"]["body"]["error"] for e in errs)
        assert len(await content(s, done["output_file_id"])) == 5
        all_bad = [req(i, x_emulator={"status": 500}) for i in range(2)]
        done = await wait(s, (await create(s, all_bad))["id"])
        assert done["status"] == "completed" and done["output_file_id"] is None
        assert done["request_counts"]["failed"] == 2


async def test_cancel() -> None:
    async with emulator(in_progress_seconds=10_000) as (s, _):
        batch = await create(s, [req(i) for i in range(10)])
        await wait(s, batch["id"], ("in_progress",))
        status, cancelling = await call(s, "POST", f"/v1/batches/{batch['id']}/cancel")
        assert status == 200 and cancelling["status"] == "cancelling"
        done = await wait(s, batch["id"])
        assert done["status"] == "cancelled" and done["cancelled_at"] is not None
        assert done["request_counts"] == {"total": 10, "completed": 5, "failed": 0}
        assert len(await content(s, done["output_file_id"])) == 5
        status, err = await call(s, "POST", f"/v1/batches/{batch['id']}/cancel")
        assert status == 400 and err["error"]["type"] == "invalid_request_error"
    async with emulator(validating_seconds=10_000) as (s, _):
        batch = await create(s, [req(1)])
        await call(s, "POST", f"/v1/batches/{batch['id']}/cancel")
        done = await wait(s, batch["id"])
        assert done["status"] == "cancelled" and done["output_file_id"] is None
        assert done["request_counts"]["total"] == 0


async def test_list_pagination() -> None:
    async with emulator() as (s, _):
        f = await upload(s, [req(1)])
        body = {"input_file_id": f["id"], "endpoint": CHAT, "completion_window": "24h"}
        ids = [(await call(s, "POST", "/v1/batches", json=body))[1]["id"] for _ in range(5)]
        _, page = await call(s, "GET", "/v1/batches", params={"limit": "2"})
        assert [b["id"] for b in page["data"]] == ids[::-1][:2] and page["has_more"]
        assert page["object"] == "list" and page["first_id"] == ids[4] and page["last_id"] == ids[3]
        _, page = await call(s, "GET", "/v1/batches", params={"limit": "2", "after": ids[3]})
        assert [b["id"] for b in page["data"]] == [ids[2], ids[1]] and page["has_more"]
        _, page = await call(s, "GET", "/v1/batches", params={"after": ids[1]})
        assert [b["id"] for b in page["data"]] == [ids[0]] and not page["has_more"]
        assert (await call(s, "GET", "/v1/batches", params={"limit": "101"}))[0] == 400


async def test_uploads_api() -> None:
    async with emulator(max_part_bytes=4000) as (s, _):
        data = b"".join(orjson.dumps(req(i)) + b"\n" for i in range(20))
        half = len(data) // 2
        meta = {"filename": "in.jsonl", "purpose": "batch", "bytes": len(data)}
        status, up = await call(s, "POST", "/v1/uploads", json=meta | {"mime_type": "text/jsonl"})
        assert status == 200 and up["status"] == "pending" and up["id"].startswith("upload_")
        part_ids = []
        for chunk in (data[:half], data[half:]):
            form = aiohttp.FormData()
            form.add_field("data", chunk, filename="blob")
            status, part = await call(s, "POST", f"/v1/uploads/{up['id']}/parts", data=form)
            assert status == 200 and part["object"] == "upload.part", part
            part_ids.append(part["id"])
        big = aiohttp.FormData()
        big.add_field("data", b"x" * 4001, filename="blob")
        assert (await call(s, "POST", f"/v1/uploads/{up['id']}/parts", data=big))[0] == 400
        path = f"/v1/uploads/{up['id']}/complete"
        bad = await call(s, "POST", path, json={"part_ids": part_ids[:1]})
        assert bad[0] == 400 and bad[1]["error"]["param"] == "bytes"
        md5 = hashlib.md5(data).hexdigest()
        status, up = await call(s, "POST", path, json={"part_ids": part_ids, "md5": md5})
        assert status == 200 and up["status"] == "completed" and up["file"]["bytes"] == len(data)
        assert len(await content(s, up["file"]["id"])) == 20
        body = {"input_file_id": up["file"]["id"], "endpoint": CHAT, "completion_window": "24h"}
        assert (await call(s, "POST", "/v1/batches", json=body))[0] == 200
        _, up2 = await call(s, "POST", "/v1/uploads", json=meta | {"mime_type": "text/jsonl"})
        status, up2 = await call(s, "POST", f"/v1/uploads/{up2['id']}/cancel")
        assert status == 200 and up2["status"] == "cancelled"


async def test_token_limit() -> None:
    lines = [req(i) for i in range(10)]
    need = sum(estimate_tokens(x["body"]) for x in lines)
    limits = {"gpt-4o-mini": 2 * need - 1}
    async with emulator(in_progress_seconds=10_000, token_limits=limits) as (s, _):
        first = await create(s, lines)
        assert (await wait(s, first["id"], ("in_progress",)))["status"] == "in_progress"
        done = await wait(s, (await create(s, lines))["id"])
        assert done["status"] == "failed"
        err = done["errors"]["data"][0]
        assert err["code"] == "token_limit_exceeded" and err["line"] is None
        assert f"Limit: {2 * need - 1} enqueued tokens" in err["message"]
        other = await create(s, [req(i, model="gpt-4o") for i in range(10)])
        assert (await wait(s, other["id"], ("in_progress",)))["status"] == "in_progress"


async def test_expiry() -> None:
    async with emulator(expire_after_seconds=1.0) as (s, _):
        lines = [req(i, x_emulator={"expire": i < 3}) for i in range(8)]
        done = await wait(s, (await create(s, lines))["id"])
        assert done["status"] == "expired" and done["expired_at"] is not None
        assert done["request_counts"] == {"total": 8, "completed": 5, "failed": 3}
        errs = await content(s, done["error_file_id"])
        assert sorted(e["custom_id"] for e in errs) == ["r0", "r1", "r2"]
        assert all(e["response"] is None and e["error"]["code"] == "batch_expired" for e in errs)
        assert len(await content(s, done["output_file_id"])) == 5


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"completion_window": "1h"}, "completion_window"),
        ({"endpoint": "/v1/audio"}, "endpoint"),
        ({"input_file_id": None}, "input_file_id"),
        ({"input_file_id": "file-nope"}, "input_file_id"),
        ({"metadata": {str(i): "v" for i in range(17)}}, "metadata"),
        ({"metadata": {"k" * 65: "v"}}, "metadata"),
        ({"metadata": {"k": "v" * 513}}, "metadata"),
        ({"metadata": {"k": 1}}, "metadata"),
        ({"output_expires_after": {"anchor": "created_at", "seconds": 10}}, None),
        ({"output_expires_after": {"anchor": "now", "seconds": 3600}}, None),
    ],
)
async def test_create_checks(change: Json, param: str | None) -> None:
    async with emulator() as (s, _):
        f = await upload(s, [req(1)])
        body = {"input_file_id": f["id"], "endpoint": CHAT, "completion_window": "24h"} | change
        status, err = await call(s, "POST", "/v1/batches", json=body)
        assert status == 400 and err["error"]["type"] == "invalid_request_error"
        assert err["error"]["param"].startswith(param or "output_expires_after")
        ok = body | {"metadata": {"k": "v"}, "output_expires_after": None, "endpoint": CHAT}
        ok |= {"completion_window": "24h", "input_file_id": f["id"]}
        assert (await call(s, "POST", "/v1/batches", json=ok))[0] == 200


async def test_files_limits_delete_and_bandwidth() -> None:
    async with emulator(max_file_bytes=100_000, bandwidth_bytes_per_s=1_000_000) as (s, _):
        assert (await upload(s, b"x" * 100_001))["_status"] == 400
        assert (await upload(s, b"x", purpose="bogus"))["_status"] == 400
        f = await upload(s, b"y" * 100_000)
        assert f["bytes"] == 100_000 and f["status"] == "processed" and f["expires_at"]
        start = time.monotonic()
        async with s.get(f"/v1/files/{f['id']}/content") as r:
            assert len(await r.read()) == 100_000
        assert time.monotonic() - start >= 0.09
        status, gone = await call(s, "DELETE", f"/v1/files/{f['id']}")
        assert status == 200 and gone == {"id": f["id"], "object": "file", "deleted": True}
        assert (await call(s, "GET", f"/v1/files/{f['id']}"))[0] == 404


async def test_serve_runs_until_cancelled() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    task = asyncio.create_task(serve("127.0.0.1", port, EmulatorConfig()))
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(200):
                try:
                    async with s.get(f"http://127.0.0.1:{port}/_emulator/stats") as r:
                        stats = await r.json()
                    break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.01)
            assert stats == {"calls": {}, "batches_created": 0, "batches_by_status": {}}
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
