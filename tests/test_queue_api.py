"""HTTP queue: the real daemon over loopback, the emulator behind it, real spool and SQLite."""

from __future__ import annotations

import asyncio
import errno
import os
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from batchd.config import Config, ConfigError
from batchd.daemon import Daemon
from batchd.spool import enter_inbox
from tests.conftest import Emulator, chat_lines, make_config, skip_without, start_emulator
from tests.daemon_http import free_port, running_daemon, until

TOKEN = "tok-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSONL = {**AUTH, "Content-Type": "application/jsonl"}
ENDED = {"done", "failed", "cancelled"}


def http_config(tmp_path: Path, base_url: str, token: str | None = TOKEN, **http: Any) -> Config:
    """A test config with the HTTP endpoint on a free port and (optionally) a token file."""
    section: dict[str, Any] = {"listen": f"127.0.0.1:{free_port()}", **http}
    if token is not None:
        (tmp_path / "token").write_text(f"  {token}\n")
        section["token_file"] = str(tmp_path / "token")
    return make_config(tmp_path, base_url, http=section)


def leftovers(cfg: Config) -> list[str]:
    """Everything in inbox/ and processing/ (must be empty after an aborted upload)."""
    return [p.name for d in ("inbox", "processing") for p in (cfg.spool.dir / d).iterdir()]


async def wait_ended(s: aiohttp.ClientSession, url: str, timeout: float = 30) -> dict[str, Any]:
    """Poll GET `url` until the job has ended; return its JSON."""
    deadline = time.monotonic() + timeout
    while True:
        async with s.get(url, headers=AUTH) as r:
            assert r.status == 200
            job: dict[str, Any] = await r.json()
        if job["state"] in ENDED or time.monotonic() > deadline:
            return job
        await asyncio.sleep(0.05)


async def assert_error(r: aiohttp.ClientResponse, status: int, code: str) -> None:
    """The response is a JSON error envelope with this status and code."""
    assert r.status == status, await r.text()
    assert r.content_type == "application/json"
    body = await r.json()
    assert body["error"]["code"] == code
    assert body["error"]["message"]


@pytest.fixture
async def served(
    tmp_path: Path, emulator: Emulator
) -> AsyncIterator[tuple[Config, str, aiohttp.ClientSession]]:
    cfg = http_config(tmp_path, emulator.url, max_upload_bytes=20_000)
    async with running_daemon(cfg) as (_d, base), aiohttp.ClientSession(base) as s:
        yield cfg, base, s


async def test_post_jsonl_poll_until_done_and_stream_output(
    served: tuple[Config, str, aiohttp.ClientSession], emulator: Emulator
) -> None:
    cfg, _base, s = served
    data = chat_lines(5)
    headers = {**JSONL, "X-Batchd-Metadata": '{"team": "search"}'}
    async with s.post("/v1/jobs?name=req", data=data, headers=headers) as r:
        assert r.status == 202, await r.text()
        created = await r.json()
        location = r.headers["Location"]
    assert created["name"] == "req" and created["state"] == "queued"
    assert location == f"/v1/jobs/{created['id']}"
    job = await wait_ended(s, location)
    assert job["state"] == "done"
    assert job["result_dir"] == "done/req"
    assert job["request_counts"] == {"total": 5, "completed": 5, "failed": 0}
    assert job["source"] == "http"
    assert job["metadata"] == {"team": "search"}
    [batch_view] = job["batches"]
    assert batch_view["id"].startswith("batch_") and job["batch_ids"] == [batch_view["id"]]
    done = cfg.spool.dir / "done" / "req"
    assert (done / "input.jsonl").read_bytes() == data
    assert orjson.loads((done / "metadata.json").read_bytes()) == {"team": "search"}
    [batch] = emulator.state.batches()  # the metadata reached the batch itself
    assert batch["metadata"]["team"] == "search" and batch["metadata"]["batchd_job"]

    async with s.get(f"{location}/output", headers=AUTH) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("application/jsonl")
        lines = [orjson.loads(x) for x in (await r.read()).splitlines()]
    assert sorted(x["custom_id"] for x in lines) == [f"req-{i}" for i in range(5)]
    async with s.get(f"{location}/errors", headers=AUTH) as r:
        assert r.status == 200 and await r.read() == b""  # nothing failed: empty, not 404

    # {id} may be the NAME or a unique id prefix too; the listing filters by state.
    for ref in ("req", created["id"][:20]):
        async with s.get(f"/v1/jobs/{ref}", headers=AUTH) as r:
            assert (await r.json())["id"] == created["id"]
    async with s.get("/v1/jobs?state=done,failed&limit=10", headers=AUTH) as r:
        listing = await r.json()
    assert [j["id"] for j in listing["data"]] == [created["id"]]
    assert listing["has_more"] is False
    async with s.get("/v1/jobs?state=queued", headers=AUTH) as r:
        assert (await r.json())["data"] == []
    async with s.get(f"/v1/jobs?since={time.time() + 60}", headers=AUTH) as r:
        assert (await r.json())["data"] == []
    assert leftovers(cfg) == []


async def test_multipart_upload_and_failed_requests(
    served: tuple[Config, str, aiohttp.ClientSession],
) -> None:
    _cfg, _base, s = served
    form = aiohttp.FormData()
    form.add_field("metadata", '{"run": "7"}')
    form.add_field("file", chat_lines(4, fail=[1]), filename="ignored.jsonl")
    form.add_field("name", "multi")  # after the file: still used
    async with s.post("/v1/jobs", data=form, headers=AUTH) as r:
        assert r.status == 202, await r.text()
        created = await r.json()
    assert created["name"] == "multi"
    job = await wait_ended(s, f"/v1/jobs/{created['id']}")
    assert job["state"] == "done" and job["metadata"] == {"run": "7"}
    async with s.get("/v1/jobs/multi/errors", headers=AUTH) as r:
        assert r.status == 200
        [bad] = [orjson.loads(x) for x in (await r.read()).splitlines()]
    assert bad["custom_id"] == "req-1"

    # Without a name the file name gives one.
    form = aiohttp.FormData()
    form.add_field("file", chat_lines(2), filename="from-file.jsonl")
    async with s.post("/v1/jobs", data=form, headers=AUTH) as r:
        assert (await r.json())["name"] == "from-file"
        location = r.headers["Location"]
    assert (await wait_ended(s, location))["state"] == "done"


async def test_default_name(served: tuple[Config, str, aiohttp.ClientSession]) -> None:
    _cfg, _base, s = served
    async with s.post("/v1/jobs", data=chat_lines(1), headers=JSONL) as r:
        assert r.status == 202
        assert (await r.json())["name"].startswith("http-")
    async with s.post("/v1/jobs?name=given.jsonl", data=chat_lines(1), headers=JSONL) as r:
        assert (await r.json())["name"] == "given"
    assert (await wait_ended(s, "/v1/jobs/given"))["state"] == "done"


@pytest.mark.parametrize("hard_links", [True, False])
def test_place_never_clobbers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hard_links: bool
) -> None:
    if not hard_links:

        def no_link(*_a: object) -> None:
            raise OSError(errno.EPERM, "no hard links")

        monkeypatch.setattr(os, "link", no_link)
    (tmp_path / "x.jsonl").write_bytes(b"theirs")
    (tmp_path / "x-2.jsonl").write_bytes(b"theirs too")
    part = tmp_path / ".http-1.jsonl.part"
    part.write_bytes(b"mine")
    assert enter_inbox(tmp_path, part, "x") == "x-3.jsonl"
    assert (tmp_path / "x.jsonl").read_bytes() == b"theirs"
    assert (tmp_path / "x-2.jsonl").read_bytes() == b"theirs too"
    assert (tmp_path / "x-3.jsonl").read_bytes() == b"mine"
    assert not part.exists()


async def test_errors_are_json(served: tuple[Config, str, aiohttp.ClientSession]) -> None:
    cfg, _base, s = served
    data = chat_lines(2)
    async with s.get("/v1/jobs") as r:
        await assert_error(r, 401, "unauthorized")
        assert r.headers["WWW-Authenticate"] == "Bearer"
    async with s.get("/v1/jobs", headers={"Authorization": f"Basic {TOKEN}"}) as r:
        await assert_error(r, 401, "unauthorized")
    async with s.post("/v1/jobs", data=data, headers={"Authorization": "Bearer nope"}) as r:
        await assert_error(r, 403, "forbidden")
    async with s.get("/v1/jobs/01NOSUCHJOB", headers=AUTH) as r:
        await assert_error(r, 404, "not_found")
    async with s.get("/v1/jobs/01NOSUCHJOB/output", headers=AUTH) as r:
        await assert_error(r, 404, "not_found")
    async with s.post("/v1/jobs/01NOSUCHJOB/cancel", headers=AUTH) as r:
        await assert_error(r, 404, "not_found")
    for query in ("name=../x", "name=.hidden", "name=" + "a" * 101, "name=sp%20ace"):
        async with s.post(f"/v1/jobs?{query}", data=data, headers=JSONL) as r:
            await assert_error(r, 400, "invalid_name")
    for meta in ("{", "[1]", '{"n": 1}', '{"batchd_job": "x"}', '{"k": "' + "v" * 513 + '"}'):
        headers = {**JSONL, "X-Batchd-Metadata": meta}
        async with s.post("/v1/jobs", data=data, headers=headers) as r:
            await assert_error(r, 400, "invalid_metadata")
    async with s.post("/v1/jobs", data=b"", headers=JSONL) as r:
        await assert_error(r, 400, "empty_body")
    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("name", "nofile")
    async with s.post("/v1/jobs", data=form, headers=AUTH) as r:
        await assert_error(r, 400, "missing_file")
    async with s.get("/v1/jobs?state=bogus", headers=AUTH) as r:
        await assert_error(r, 400, "invalid_state")
    async with s.get("/v1/jobs?limit=0", headers=AUTH) as r:
        await assert_error(r, 400, "invalid_limit")
    async with s.get("/v1/jobs?since=yesterday", headers=AUTH) as r:
        await assert_error(r, 400, "invalid_since")
    assert leftovers(cfg) == []


async def test_since_takes_ages_epoch_and_iso_with_or_without_zone(
    served: tuple[Config, str, aiohttp.ClientSession],
) -> None:
    # The same parser as `batchd jobs --since`: a zone-less ISO time is UTC (it was a 400).
    _cfg, _base, s = served
    for since in ("2h", "1700000000", "2023-11-14T22:13:20", "2023-11-14T22:13:20%2B00:00"):
        async with s.get(f"/v1/jobs?since={since}", headers=AUTH) as r:
            assert r.status == 200, (since, await r.text())
    async with s.get("/v1/jobs?since=2023-11-14T22:13:20x", headers=AUTH) as r:
        await assert_error(r, 400, "invalid_since")


async def test_too_large_is_413_and_leaves_nothing(
    served: tuple[Config, str, aiohttp.ClientSession],
) -> None:
    cfg, _base, s = served
    big = chat_lines(400)  # > max_upload_bytes = 20_000
    assert len(big) > 20_000
    async with s.post("/v1/jobs", data=big, headers=JSONL) as r:  # Content-Length: early
        await assert_error(r, 413, "too_large")

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(big), 4096):
            yield big[i : i + 4096]

    async with s.post("/v1/jobs", data=chunks(), headers=JSONL) as r:  # chunked: counted
        await assert_error(r, 413, "too_large")
    form = aiohttp.FormData()
    form.add_field("file", big, filename="big.jsonl")
    async with s.post("/v1/jobs", data=form, headers=AUTH) as r:
        await assert_error(r, 413, "too_large")
    assert leftovers(cfg) == []
    async with s.post("/v1/jobs", data=chat_lines(2), headers=JSONL) as r:
        assert r.status == 202
        location = r.headers["Location"]
    assert (await wait_ended(s, location))["state"] == "done"


def _cut_requests() -> dict[str, bytes]:
    body = chat_lines(60)
    head = (
        "POST /v1/jobs?name=cut HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {TOKEN}\r\nContent-Type: {{ct}}\r\n{{len}}\r\n"
    )
    sized = head.format(ct="application/jsonl", len="Content-Length: 19000\r\n")
    chunked = head.format(ct="application/x-ndjson", len="Transfer-Encoding: chunked\r\n")
    multipart = head.format(ct="multipart/form-data; boundary=XyZ", len="Content-Length: 19000\r\n")
    part = (
        b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n'
        b"Content-Type: application/jsonl\r\n\r\n"
    )
    return {
        "content-length": sized.encode() + body[:6000],
        "chunked": chunked.encode() + f"{6000:x}\r\n".encode() + body[:6000] + b"\r\n",
        "multipart": multipart.encode() + part + body[:6000],
    }


@pytest.mark.parametrize("kind", ["content-length", "chunked", "multipart"])
async def test_cut_off_upload_leaves_nothing_and_daemon_keeps_serving(
    served: tuple[Config, str, aiohttp.ClientSession], kind: str
) -> None:
    cfg, base, s = served
    inbox = cfg.spool.dir / "inbox"
    host, _, port = base.removeprefix("http://").rpartition(":")
    _reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(_cut_requests()[kind])
    await writer.drain()
    await until(lambda: any(p.name.endswith(".part") for p in inbox.iterdir()))
    writer.close()
    await writer.wait_closed()
    await until(lambda: leftovers(cfg) == [])
    async with s.get("/healthz") as r:
        assert r.status == 200
    async with s.post("/v1/jobs?name=after", data=chat_lines(2), headers=JSONL) as r:
        assert r.status == 202
    async with s.get("/v1/jobs", headers=AUTH) as r:
        assert [j["name"] for j in (await r.json())["data"]] == ["after"]
    assert (await wait_ended(s, "/v1/jobs/after"))["state"] == "done"


async def test_cancel(tmp_path: Path) -> None:
    emu, runner = await start_emulator(time_scale=1.0)  # batches stay in flight
    try:
        cfg = http_config(tmp_path, emu.url)
        async with running_daemon(cfg), aiohttp.ClientSession(f"http://{cfg.http.listen}") as s:
            async with s.post("/v1/jobs?name=slow", data=chat_lines(3), headers=JSONL) as r:
                job_id = (await r.json())["id"]
            await until(lambda: emu.state.batches_created == 1)
            async with s.post(f"/v1/jobs/{job_id}/cancel", headers=AUTH) as r:
                assert r.status == 202
                assert (await r.json())["cancel_requested"] is True
            job = await wait_ended(s, f"/v1/jobs/{job_id}")
            assert job["state"] == "cancelled"
            [batch] = emu.state.batches()
            assert batch["status"] in ("cancelling", "cancelled")
            async with s.post(f"/v1/jobs/{job_id}/cancel", headers=AUTH) as r:
                await assert_error(r, 409, "job_ended")
    finally:
        await runner.cleanup()
        emu.state.close()


async def test_cancel_of_ended_job_is_409(
    served: tuple[Config, str, aiohttp.ClientSession],
) -> None:
    _cfg, _base, s = served
    async with s.post("/v1/jobs?name=quick", data=chat_lines(1), headers=JSONL) as r:
        location = r.headers["Location"]
    assert (await wait_ended(s, location))["state"] == "done"
    async with s.post(f"{location}/cancel", headers=AUTH) as r:
        await assert_error(r, 409, "job_ended")


async def test_routes_absent_without_token(
    tmp_path: Path, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BATCHD_HTTP_TOKEN", raising=False)
    cfg = http_config(tmp_path, emulator.url, token=None)
    async with running_daemon(cfg) as (_d, base), aiohttp.ClientSession(base) as s:
        async with s.post("/v1/jobs", data=chat_lines(1), headers=JSONL) as r:
            assert r.status == 404
        async with s.get("/v1/jobs", headers=AUTH) as r:
            assert r.status == 404
        for path in ("/metrics", "/healthz", "/readyz"):
            async with s.get(path) as r:
                assert r.status == 200
    assert leftovers(cfg) == []


async def test_token_from_environment(
    tmp_path: Path, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BATCHD_HTTP_TOKEN", "from-env")
    cfg = http_config(tmp_path, emulator.url, token=None)
    async with running_daemon(cfg) as (_d, base), aiohttp.ClientSession(base) as s:
        async with s.get("/v1/jobs", headers={"Authorization": "Bearer from-env"}) as r:
            assert r.status == 200
        async with s.get("/v1/jobs", headers=AUTH) as r:
            assert r.status == 403


async def test_unreadable_token_file_is_a_config_error(tmp_path: Path) -> None:
    cfg = make_config(
        tmp_path, "http://127.0.0.1:1/v1", http={"token_file": str(tmp_path / "missing")}
    )
    with pytest.raises(ConfigError, match=r"\[http\] token_file"):
        await Daemon(cfg).run()
    (tmp_path / "empty").write_text("\n")
    cfg = make_config(tmp_path, "http://127.0.0.1:1/v1", http={"token_file": "empty"})
    with pytest.raises(ConfigError, match=r"\[http\] token_file: .* is empty"):
        await Daemon(cfg).run()


@pytest.mark.parametrize("value", [0, -5, "big", 1.5])
def test_max_upload_bytes_is_validated(tmp_path: Path, value: object) -> None:
    with pytest.raises(ConfigError, match=r"\[http\] max_upload_bytes"):
        make_config(tmp_path, "http://x/v1", http={"max_upload_bytes": value})


def test_http_defaults(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, "http://x/v1")
    assert cfg.http.max_upload_bytes == 210 * 1024 * 1024
    assert cfg.http.token_file is None
    assert cfg.http.token(env={}) is None
    assert cfg.http.token(env={"BATCHD_HTTP_TOKEN": " t \n"}) == "t"


# --- issue 19 item 13: JSON everywhere, curl's defaults, early 413, job objects -------------


async def test_unknown_routes_and_methods_are_json(
    served: tuple[Config, str, aiohttp.ClientSession],
) -> None:
    _cfg, _base, s = served
    for path in ("/nowhere", "/v1/nope", "/v1/jobs/x/y/z"):
        async with s.get(path, headers=AUTH) as r:
            await assert_error(r, 404, "not_found")
    for method, path in (("DELETE", "/v1/jobs"), ("PATCH", "/v1/jobs/x"), ("POST", "/metrics")):
        async with s.request(method, path, headers=AUTH) as r:
            await assert_error(r, 405, "method_not_allowed")
            assert r.headers["Allow"]


async def _run_curl(*args: str) -> tuple[int, bytes]:
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-o", "-", "-w", "\n%{http_code}", *args,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await proc.communicate()
    body, _, code = out.rpartition(b"\n")
    return int(code), body


async def test_what_people_type_first_with_curl(
    served: tuple[Config, str, aiohttp.ClientSession], tmp_path: Path
) -> None:
    skip_without("curl")
    # curl --data-binary says application/x-www-form-urlencoded; -T sends PUT (to
    # URL/FILE when the URL ends in '/'), with no Content-Type and Expect: 100-continue
    # for a large body. All of them are the JSONL file.
    _cfg, base, s = served
    src = tmp_path / "requests.jsonl"
    src.write_bytes(chat_lines(3))
    auth = f"Authorization: Bearer {TOKEN}"
    code, body = await _run_curl("--data-binary", f"@{src}", "-H", auth, f"{base}/v1/jobs")
    assert code == 202, body
    first = orjson.loads(body)
    code, body = await _run_curl("-T", str(src), "-H", auth, f"{base}/v1/jobs/")
    assert code == 202, body
    assert orjson.loads(body)["name"] == "requests"
    code, body = await _run_curl("-T", str(src), "-H", auth, f"{base}/v1/jobs?name=put")
    assert code == 202, body
    for ref in (first["id"], "requests", "put"):
        assert (await wait_ended(s, f"/v1/jobs/{ref}"))["state"] == "done"


async def _raw(base: str, head: str, body: bytes = b"") -> bytes:
    """Send a request head on a raw connection; return what comes back first."""
    host, _, port = base.removeprefix("http://").rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head.encode())
        await writer.drain()
        first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        if body and first.startswith(b"HTTP/1.1 100"):
            writer.write(body)
            await writer.drain()
            first += await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        return first
    finally:
        writer.close()


async def test_too_large_is_refused_before_100_continue(
    served: tuple[Config, str, aiohttp.ClientSession],
) -> None:
    cfg, base, s = served
    head = (
        "PUT /v1/jobs?name=big HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\n"
        "Content-Length: {n}\r\nExpect: 100-continue\r\n\r\n"
    )
    answer = await _raw(base, head.format(tok=TOKEN, n=cfg.http.max_upload_bytes + 1))
    assert answer.startswith(b"HTTP/1.1 413"), answer  # no "100 Continue" first
    answer = await _raw(base, head.format(tok="wrong", n=10))
    assert answer.startswith(b"HTTP/1.1 403"), answer
    data = chat_lines(2)
    answer = await _raw(base, head.format(tok=TOKEN, n=len(data)), data)
    assert answer.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 202"), answer
    assert (await wait_ended(s, "/v1/jobs/big"))["state"] == "done"
    assert leftovers(cfg) == []


def _iso(text: str) -> float:
    assert text.endswith("Z"), text
    return datetime.fromisoformat(text).timestamp()


async def test_job_objects_and_paging(
    served: tuple[Config, str, aiohttp.ClientSession],
) -> None:
    cfg, _base, s = served
    ids = []
    for i in range(3):
        async with s.post(f"/v1/jobs?name=page{i}", data=chat_lines(2), headers=JSONL) as r:
            created = await r.json()
            assert created["object"] == "job" and created["state"] == "queued"
            ids.append(created["id"])
    for job_id in ids:
        job = await wait_ended(s, f"/v1/jobs/{job_id}")
        assert job["state"] == "done"
    # No internal fields; ISO times; the paths are where the files are now.
    for internal in ("input_path", "est_tokens", "reason", "updated_at_epoch", "attempt"):
        assert internal not in job
    assert set(job) >= {"id", "name", "state", "request_counts", "paths", "batch_ids"}
    assert abs(_iso(job["created_at"]) - time.time()) < 120
    assert _iso(job["finished_at"]) >= _iso(job["created_at"])
    result = cfg.spool.dir / "done" / "page2"
    assert job["paths"] == {"input": str(result / "input.jsonl"), "result_dir": str(result)}
    assert Path(job["paths"]["input"]).is_file()
    [batch] = job["batches"]
    assert job["batch_ids"] == [batch["id"]] and batch["status"] == "completed"
    assert batch["output_file_id"] and _iso(batch["created_at"])
    # Paging: newest first, `after` = the previous page's last_id.
    async with s.get("/v1/jobs?limit=2", headers=AUTH) as r:
        page = await r.json()
    assert [j["id"] for j in page["data"]] == ids[:0:-1]
    assert page["has_more"] is True and page["last_id"] == ids[1]
    assert page["first_id"] == ids[2]
    async with s.get(f"/v1/jobs?limit=2&after={page['last_id']}", headers=AUTH) as r:
        page = await r.json()
    assert [j["id"] for j in page["data"]] == ids[:1] and page["has_more"] is False
    async with s.get("/v1/jobs?after=01NOSUCH", headers=AUTH) as r:
        await assert_error(r, 400, "invalid_after")
