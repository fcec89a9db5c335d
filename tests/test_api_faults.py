"""The Batch API client against each of the emulator's fault knobs, over real loopback HTTP.

One test per knob: what is retried (and how long the client waits), what is raised at
once, what ends as `Transient` for the caller to reconcile, and that no message ever
carries the API key.
"""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from batchd.api import (
    ApiError,
    AuthError,
    BatchApi,
    InvalidRequest,
    NotFound,
    RateLimited,
    Tap,
    Transient,
)
from batchd.config import ApiConfig
from batchd.emulator.faults import FaultConfig
from batchd.metrics import Metrics
from tests.conftest import API_KEY, Emulator, chat_lines, start_emulator

CHAT = "/v1/chat/completions"
LIST = "GET /v1/batches"
CREATE = "POST /v1/batches"
CONTENT = "GET /v1/files/{id}/content"


def seed_for(p: float, pattern: Sequence[bool]) -> int:
    """A fault seed whose first draws hit (True) or miss (False) one knob in `pattern`.

    Valid while a single single-draw knob (rate_limit, drop_connection, truncated_download)
    is on and `routes` keeps it to the route under test: then each call is one draw.
    """
    for seed in range(100_000):
        rng = random.Random(seed)
        if [rng.random() < p for _ in pattern] == list(pattern):
            return seed
    raise AssertionError("no seed found")  # pragma: no cover


@asynccontextmanager
async def emulated(**kw: Any) -> AsyncIterator[Emulator]:
    emu, runner = await start_emulator(**kw)
    try:
        yield emu
    finally:
        await runner.cleanup()
        emu.state.close()


@asynccontextmanager
async def client(
    url: str,
    max_retries: int = 4,
    key: str | None = API_KEY,
    timeout: float = 10.0,
    metrics: Metrics | None = None,
) -> AsyncIterator[BatchApi]:
    cfg = ApiConfig(base_url=url, max_retries=max_retries, request_timeout_seconds=timeout)
    # Short backoff keeps the suite fast; a 429's Retry-After is still honoured in full.
    async with BatchApi(cfg, key, metrics or Metrics(), max_backoff_seconds=0.02) as api:
        yield api


def sample(m: Metrics, name: str, **labels: str) -> float:
    return m.registry.get_sample_value(name, labels) or 0.0


def retries(m: Metrics, reason: str) -> float:
    return sample(m, "batchd_retries_total", reason=reason)


async def uploaded(api: BatchApi, tmp_path: Path, data: bytes) -> str:
    p = tmp_path / "in.jsonl"
    p.write_bytes(data)
    return str((await api.upload_file(p, "in.jsonl"))["id"])


# --- 429 --------------------------------------------------------------------------------


async def test_rate_limit_waits_retry_after_then_succeeds() -> None:
    seed = seed_for(0.5, [True, True, False])
    faults = FaultConfig(
        rate_limit=0.5, retry_after_seconds=0.2, seed=seed, routes=frozenset({LIST})
    )
    async with emulated(faults=faults) as emu:
        m = Metrics()
        async with client(emu.url, max_retries=4, metrics=m) as api:
            start = time.monotonic()
            page = await api.list_batches()
            elapsed = time.monotonic() - start
        assert page["object"] == "list"
        assert elapsed >= 2 * 0.2  # two 429s, each waited out in full
        assert emu.state.calls[LIST] == 3 and emu.state.fault_counts["rate_limit"] == 2
        assert retries(m, "rate_limited") == 2 and retries(m, "transient") == 0
        assert (
            sample(
                m,
                "batchd_api_requests_total",
                operation="list_batches",
                code="429",
                provider="openai",
            )
            == 2
        )


async def test_rate_limit_exhausted_raises_rate_limited_with_retry_after() -> None:
    faults = FaultConfig(rate_limit=1.0, retry_after_seconds=0.2, routes=frozenset({CREATE}))
    async with emulated(faults=faults) as emu:
        m = Metrics()
        async with client(emu.url, max_retries=2, metrics=m) as api:
            start = time.monotonic()
            with pytest.raises(RateLimited) as ei:
                await api.create_batch("file-x", CHAT, "24h", {})
            assert time.monotonic() - start >= 0.2
        assert ei.value.status == 429 and ei.value.retry_after == pytest.approx(0.2)
        # A 429 was not acted on, so even create_batch retries it.
        assert emu.state.calls[CREATE] == 2 and emu.state.batches_created == 0
        assert retries(m, "rate_limited") == 1


# --- 5xx --------------------------------------------------------------------------------


async def test_server_errors_500_502_503_are_retried_then_succeed() -> None:
    faults = FaultConfig(server_error=0.5, seed=1, routes=frozenset({LIST}))
    async with emulated(faults=faults) as emu:
        m = Metrics()
        async with client(emu.url, max_retries=10, metrics=m) as api:
            for _ in range(20):
                assert (await api.list_batches())["object"] == "list"
        faulted = emu.state.fault_counts["server_error"]
        assert faulted > 0 and emu.state.calls[LIST] == 20 + faulted
        assert retries(m, "transient") == faulted
        for code in ("500", "502", "503"):
            assert (
                sample(
                    m,
                    "batchd_api_requests_total",
                    operation="list_batches",
                    code=code,
                    provider="openai",
                )
                > 0
            )
        assert (
            sample(
                m,
                "batchd_api_requests_total",
                operation="list_batches",
                code="200",
                provider="openai",
            )
            == 20
        )


async def test_server_error_on_create_is_not_retried(tmp_path: Path) -> None:
    faults = FaultConfig(server_error=1.0, routes=frozenset({CREATE}))
    async with emulated(faults=faults) as emu, client(emu.url) as api:
        fid = await uploaded(api, tmp_path, chat_lines(2))
        with pytest.raises(Transient) as ei:
            await api.create_batch(fid, CHAT, "24h", {"batchd_attempt": "a1"})
        assert ei.value.status in (500, 502, 503)
        # Outcome unknown for a create: the caller reconciles by metadata, not by retrying.
        assert emu.state.calls[CREATE] == 1 and emu.state.batches_created == 0


# --- other 4xx --------------------------------------------------------------------------


async def test_bad_request_is_not_retried_and_carries_the_api_message() -> None:
    async with emulated() as emu:
        m = Metrics()
        async with client(emu.url, metrics=m) as api:
            with pytest.raises(InvalidRequest) as ei:
                await api.create_batch("file-nope", CHAT, "24h", {})
            e = ei.value
            assert type(e) is InvalidRequest and e.status == 400
            assert e.message == "Invalid 'input_file_id': 'file-nope'. File not found."
            assert e.param == "input_file_id" and e.code == "invalid_value"
            assert emu.state.calls[CREATE] == 1
            # The same for an operation that does retry transient errors.
            with pytest.raises(InvalidRequest, match="Invalid 'after'"):
                await api.list_batches(after="batch_nope")
            assert emu.state.calls[LIST] == 1
            with pytest.raises(NotFound, match="No batch found"):
                await api.get_batch("batch_nope")
            assert emu.state.calls["GET /v1/batches/{id}"] == 1
        assert retries(m, "transient") == retries(m, "rate_limited") == 0


async def test_unauthorized_raises_auth_error_without_retry() -> None:
    wrong = "sk-wrong-key-0123456789abcdef"
    async with emulated() as emu:
        m = Metrics()
        async with client(emu.url, key=wrong, metrics=m) as api:
            with pytest.raises(AuthError) as ei:
                await api.list_batches()
        assert ei.value.status == 401 and ei.value.code == "invalid_api_key"
        assert wrong not in str(ei.value)
        assert emu.state.calls[LIST] == 1 and retries(m, "transient") == 0
        async with client(emu.url, key=None) as api:
            with pytest.raises(AuthError, match="didn't provide an API key"):
                await api.list_batches()


# --- dropped connections ----------------------------------------------------------------


async def test_dropped_connections_end_transient_after_max_retries() -> None:
    faults = FaultConfig(drop_connection=1.0, routes=frozenset({LIST}))
    async with emulated(faults=faults) as emu:
        m = Metrics()
        async with client(emu.url, max_retries=3, metrics=m) as api:
            with pytest.raises(Transient) as ei:
                await api.list_batches()
        assert ei.value.status == 0 and ei.value.message.startswith("list_batches: ")
        assert retries(m, "transient") == 2
        # aiohttp may resend an idempotent request once on a reused pooled connection.
        assert emu.state.calls[LIST] >= 3
        assert (
            sample(
                m,
                "batchd_api_requests_total",
                operation="list_batches",
                code="0",
                provider="openai",
            )
            == 3
        )


async def test_dropped_connections_sometimes_still_succeed() -> None:
    faults = FaultConfig(drop_connection=0.3, seed=5, routes=frozenset({LIST}))
    async with emulated(faults=faults) as emu:
        m = Metrics()
        async with client(emu.url, max_retries=8, metrics=m) as api:
            for _ in range(15):
                assert (await api.list_batches())["object"] == "list"
        assert emu.state.fault_counts["drop_connection"] > 0
        assert retries(m, "transient") > 0


# --- slow responses ---------------------------------------------------------------------


async def test_slow_responses_still_succeed() -> None:
    faults = FaultConfig(slow=1.0, slow_seconds=0.3, routes=frozenset({LIST}))
    async with emulated(faults=faults) as emu:
        m = Metrics()
        async with client(emu.url, timeout=5.0, metrics=m) as api:
            start = time.monotonic()
            assert (await api.list_batches())["object"] == "list"
            assert time.monotonic() - start >= 0.3
        assert emu.state.calls[LIST] == 1 and retries(m, "transient") == 0


async def test_slower_than_the_request_timeout_is_transient() -> None:
    faults = FaultConfig(slow=1.0, slow_seconds=0.4, routes=frozenset({LIST}))
    async with emulated(faults=faults) as emu, client(emu.url, 2, timeout=0.1) as api:
        with pytest.raises(Transient, match=r"list_batches: .*Timeout"):
            await api.list_batches()
        assert emu.state.calls[LIST] == 2


# --- ghost creates ----------------------------------------------------------------------


async def test_ghost_create_raises_transient_but_find_batch_finds_it(tmp_path: Path) -> None:
    faults = FaultConfig(ghost_create=1.0, seed=3, routes=frozenset({CREATE}))
    async with emulated(faults=faults) as emu, client(emu.url) as api:
        fid = await uploaded(api, tmp_path, chat_lines(3))
        assert await api.find_batch("never-sent", time.time() - 600) is None
        statuses: set[int] = set()
        for i in range(6):
            attempt = f"att-{i}"
            sent_at = time.time()
            with pytest.raises(Transient) as ei:
                await api.create_batch(fid, CHAT, "24h", {"batchd_attempt": attempt})
            statuses.add(ei.value.status)
            found = await api.find_batch(attempt, not_before=sent_at - 600)
            assert found is not None and found["metadata"]["batchd_attempt"] == attempt
            assert found["input_file_id"] == fid
        assert statuses == {0, 500}  # both variants: dropped connection and a 500
        assert emu.state.calls[CREATE] == emu.state.batches_created == 6
        assert emu.state.fault_counts["ghost_create"] == 6


# --- truncated downloads ----------------------------------------------------------------


async def test_truncated_download_is_retried_and_complete(tmp_path: Path) -> None:
    seed = seed_for(0.5, [True, True, False])
    faults = FaultConfig(truncated_download=0.5, seed=seed, routes=frozenset({CONTENT}))
    data = chat_lines(3000)  # a few hundred KB: more than one chunk
    async with emulated(faults=faults) as emu:
        m = Metrics()
        async with client(emu.url, metrics=m) as api:
            fid = await uploaded(api, tmp_path, data)
            dest = tmp_path / "out.jsonl"
            n = await api.download(fid, dest)
        assert n == len(data) and dest.read_bytes() == data
        assert emu.state.fault_counts["truncated_download"] == 2
        assert emu.state.calls[CONTENT] == 3 and retries(m, "transient") == 2
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


async def test_always_truncated_download_leaves_no_file(tmp_path: Path) -> None:
    faults = FaultConfig(truncated_download=1.0, routes=frozenset({CONTENT}))
    async with emulated(faults=faults) as emu, client(emu.url, max_retries=2) as api:
        fid = await uploaded(api, tmp_path, chat_lines(3000))
        with pytest.raises(Transient, match="download_file"):
            await api.download(fid, tmp_path / "out.jsonl")
        assert not (tmp_path / "out.jsonl").exists()


# --- uploads validated on the fly -------------------------------------------------------


@pytest.mark.parametrize("knob", ["rate_limit", "server_error", "drop_connection"])
@pytest.mark.parametrize("parts", [False, True], ids=["files", "uploads"])
async def test_retried_upload_feeds_its_tap_every_byte_once(
    tmp_path: Path, knob: str, parts: bool
) -> None:
    """A request answered early (429, 5xx, dropped) must not lose or repeat tapped bytes.

    Regression: the tap counted a chunk as fed before consuming it, and aiohttp cancels
    the body writer of an early-answered request, so the validator saw an empty file.
    """
    routes = frozenset({"POST /v1/files", "POST /v1/uploads/{id}/parts"})
    faults = FaultConfig(**{knob: 0.3}, seed=1, routes=routes)  # type: ignore[arg-type]
    data = chat_lines(7000 if parts else 20)  # two 1 MiB chunks per part when split
    path = tmp_path / "in.jsonl"
    path.write_bytes(data)
    async with emulated(faults=faults) as emu, client(emu.url, max_retries=10) as api:
        for _ in range(12 if parts else 30):
            seen: list[bytes] = []
            threshold = 1 if parts else 1 << 40
            f = await api.upload(path, "in.jsonl", threshold, 1 << 20, Tap(seen.append))
            assert b"".join(seen) == data  # every byte once, in order
            assert emu.state.get_file(f["id"]).path.read_bytes() == data
        assert emu.state.fault_counts[knob] > 0


# --- the key stays secret ---------------------------------------------------------------


async def test_no_exception_message_contains_the_api_key(tmp_path: Path) -> None:
    """Every error kind from the emulator, and a proxy that echoes the Authorization header."""
    seen: list[ApiError] = []

    async def collect(coro: Any) -> None:
        try:
            await coro
        except ApiError as e:
            seen.append(e)
        else:  # pragma: no cover
            raise AssertionError("expected an ApiError")

    everything = FaultConfig(rate_limit=1.0, routes=frozenset({LIST}))
    async with emulated(faults=everything) as emu, client(emu.url, 1) as api:
        await collect(api.list_batches())  # 429
        await collect(api.create_batch("file-nope", CHAT, "24h", {}))  # 400
        await collect(api.get_batch("batch_nope"))  # 404
    for faults in (FaultConfig(server_error=1.0), FaultConfig(drop_connection=1.0)):
        async with emulated(faults=faults) as emu, client(emu.url, 1) as api:
            await collect(api.list_batches())
            await collect(api.create_batch("file-nope", CHAT, "24h", {}))
    ghost = FaultConfig(ghost_create=1.0, routes=frozenset({CREATE}))
    async with emulated(faults=ghost) as emu, client(emu.url, 1) as api:
        fid = await uploaded(api, tmp_path, chat_lines(1))
        await collect(api.create_batch(fid, CHAT, "24h", {}))
    async with emulated() as emu, client(emu.url, key=API_KEY + "x") as api:
        await collect(api.list_batches())  # 401 echoing a prefix of the (wrong) key

    async def echo(request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        if request.path.endswith("/json"):
            body = orjson.dumps({"error": {"message": f"bad header: {auth}"}})
            return web.Response(body=body, status=400, content_type="application/json")
        return web.Response(text=f"<html>proxy error for {auth}</html>", status=502)

    app = web.Application()
    app.router.add_get("/v1/batches/{id}", echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    try:
        async with client(url, 1) as api:
            await collect(api.get_batch("json"))
            await collect(api.get_batch("html"))
    finally:
        await runner.cleanup()
    async with client("http://127.0.0.1:1/v1", 1) as api:  # connection refused
        await collect(api.list_batches())

    assert len(seen) == 12
    kinds = {type(e).__name__ for e in seen}
    assert kinds == {"RateLimited", "InvalidRequest", "NotFound", "Transient", "AuthError"}
    for e in seen:
        for text in (str(e), repr(e), e.message, orjson.dumps(e.to_dict()).decode()):
            assert API_KEY not in text and API_KEY[3:] not in text, text
