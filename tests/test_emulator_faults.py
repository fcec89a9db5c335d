"""Fault knobs of the emulator, seen by a real aiohttp client over loopback."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import pytest

from batchd.emulator.faults import FaultConfig
from tests.test_emulator import CHAT, call, emulator, req, upload

ENVELOPE = ["message", "type", "param", "code"]


async def stats(s: aiohttp.ClientSession) -> dict[str, Any]:
    return (await call(s, "GET", "/_emulator/stats"))[1]


async def test_rate_limit_headers_envelope_and_auth_first() -> None:
    async with emulator(api_key="sk-test", faults=FaultConfig(rate_limit=1.0)) as (s, state):
        for _ in range(3):
            async with s.get("/v1/batches") as r:
                body = await r.json()
                assert r.status == 429 and list(body["error"]) == ENVELOPE
                assert body["error"]["code"] == "rate_limit_exceeded"
                assert r.headers["Retry-After"] == "0.05" and r.headers["retry-after-ms"] == "50"
        bad = {"Authorization": "Bearer sk-wrong"}
        assert (await call(s, "GET", "/v1/batches", headers=bad))[0] == 401  # never faulted
        st = await stats(s)  # /_emulator/* is never faulted either
        assert st["fault_counts"] == {"rate_limit": 3} == dict(state.fault_counts)


async def test_rate_is_configured_probability_and_seeded() -> None:
    seqs = []
    for _ in range(2):
        async with emulator(faults=FaultConfig(rate_limit=0.25, seed=7)) as (s, state):
            seqs.append([(await call(s, "GET", "/v1/batches"))[0] for _ in range(400)])
            assert state.fault_counts["rate_limit"] == seqs[-1].count(429)
    assert seqs[0] == seqs[1] and set(seqs[0]) == {200, 429}
    assert 60 <= seqs[0].count(429) <= 140


async def test_server_error_is_not_acted_on() -> None:
    async with emulator(faults=FaultConfig(server_error=1.0, seed=3)) as (s, state):
        f = (await upload(s, [req(1)]))["error"]
        assert f["type"] == "server_error"
        seen = {(await call(s, "GET", "/v1/batches"))[0] for _ in range(30)}
        assert seen == {500, 502, 503}
        assert state.fault_counts["server_error"] == 31 and not state.files


async def test_drop_connection() -> None:
    cfg = FaultConfig(drop_connection=1.0, routes=frozenset({"GET /v1/batches"}))
    async with emulator(faults=cfg) as (s, state):
        for _ in range(2):
            with pytest.raises(aiohttp.ClientConnectionError):
                await call(s, "GET", "/v1/batches")
        assert (await upload(s, [req(1)]))["_status"] == 200  # other routes unaffected
        # aiohttp itself retries an idempotent request once on a reused pooled connection
        drops = (await stats(s))["fault_counts"]["drop_connection"]
        assert drops == state.calls["GET /v1/batches"] >= 2


async def test_slow() -> None:
    cfg = FaultConfig(slow=1.0, slow_seconds=0.2, routes=frozenset({"GET /v1/batches"}))
    async with emulator(faults=cfg) as (s, state):
        start = time.monotonic()
        assert (await call(s, "GET", "/v1/batches"))[0] == 200
        assert time.monotonic() - start >= 0.2
        start = time.monotonic()
        assert (await call(s, "GET", "/v1/batches/batch_x"))[0] == 404
        assert time.monotonic() - start < 0.2 and state.fault_counts == {"slow": 1}


async def test_ghost_create_really_creates() -> None:
    async with emulator(faults=FaultConfig(ghost_create=1.0, seed=1)) as (s, state):
        f = await upload(s, [req(1)])
        body = {"input_file_id": f["id"], "endpoint": CHAT, "completion_window": "24h"}
        outcomes = []
        for i in range(6):
            try:
                status, _ = await call(
                    s, "POST", "/v1/batches", json=body | {"metadata": {"i": str(i)}}
                )
                outcomes.append(status)
            except aiohttp.ClientConnectionError:
                outcomes.append(0)
        assert set(outcomes) == {0, 500}  # both flavours: dropped and 500
        _, page = await call(s, "GET", "/v1/batches")
        assert sorted(b["metadata"]["i"] for b in page["data"]) == [str(i) for i in range(6)]
        bad = await call(s, "POST", "/v1/batches", json=body | {"endpoint": "/v1/nope"})
        assert bad[0] == 400  # nothing created: not a ghost
        assert state.fault_counts == {"ghost_create": 6} and state.batches_created == 6


async def test_truncated_download_is_detectable() -> None:
    async with emulator(faults=FaultConfig(truncated_download=1.0)) as (s, _):
        f = await upload(s, [req(i) for i in range(200)])
        for _ in range(2):
            async with s.get(f"/v1/files/{f['id']}/content") as r:
                assert r.status == 200 and r.content_length == f["bytes"]
                with pytest.raises(aiohttp.ClientPayloadError):
                    await r.read()
        assert (await stats(s))["fault_counts"] == {"truncated_download": 2}
        assert (await call(s, "GET", f"/v1/files/{f['id']}"))[1]["bytes"] == f["bytes"]


async def test_stats_without_faults_has_no_fault_counts() -> None:
    async with emulator() as (s, _):
        assert "fault_counts" not in await stats(s)
