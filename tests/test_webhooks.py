"""Webhooks: deliveries signed independently with the `standardwebhooks` package, sent to
the real daemon over loopback."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from standardwebhooks.webhooks import Webhook

from batchd.config import Config, ConfigError
from batchd.daemon import Daemon
from batchd.store import Store
from batchd.webhooks import RecentIds
from tests.conftest import Emulator, chat_lines, drop, make_config, start_emulator
from tests.daemon_http import free_port, running_daemon, until

SECRET = "whsec_" + base64.b64encode(b"batchd-test-webhook-secret-32byt").decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"some-other-secret-of-32-bytes-xx").decode()


class Recording(set[str]):
    """A set that remembers every add, even after the tracker drained it."""

    def __init__(self) -> None:
        super().__init__()
        self.added: list[str] = []

    def add(self, item: str) -> None:
        self.added.append(item)
        super().add(item)


def event(batch_id: str, kind: str = "batch.completed") -> dict[str, Any]:
    return {
        "id": "evt_123",
        "object": "event",
        "type": kind,
        "created_at": int(time.time()),
        "data": {"id": batch_id},
    }


def signed(
    payload: dict[str, Any],
    msg_id: str,
    at: datetime | None = None,
    secret: str = SECRET,
) -> tuple[bytes, dict[str, str]]:
    """Body and headers of one delivery, signed by the reference implementation."""
    body = orjson.dumps(payload).decode()
    at = at or datetime.now(tz=UTC)
    headers = {
        "Content-Type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, at, body),
    }
    return body.encode(), headers


def webhook_config(
    tmp_path: Path, base_url: str, secret: str | None = SECRET, **sections: Any
) -> Config:
    """A test config with the HTTP endpoint on a free port and (optionally) a secret file."""
    webhooks: dict[str, Any] = dict(sections.pop("webhooks", {}))
    if secret is not None:
        (tmp_path / "whsec").write_text(secret + "\n")
        webhooks["secret_file"] = "whsec"
    sections.setdefault("http", {})["listen"] = f"127.0.0.1:{free_port()}"
    return make_config(tmp_path, base_url, webhooks=webhooks, **sections)


@dataclass
class Served:
    daemon: Daemon
    session: aiohttp.ClientSession
    handed: Recording


@pytest.fixture
async def served(tmp_path: Path, emulator: Emulator) -> AsyncIterator[Served]:
    cfg = webhook_config(tmp_path, emulator.url)
    async with running_daemon(cfg) as (d, base), aiohttp.ClientSession(base) as s:
        assert d.ctx is not None
        handed = d.ctx.webhook_batches = Recording()
        yield Served(d, s, handed)


async def post(s: aiohttp.ClientSession, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    async with s.post("/webhooks/openai", data=body, headers=headers) as r:
        assert r.content_type == "application/json"
        return r.status, await r.json()


async def test_good_event_is_handed_to_the_tracker(served: Served) -> None:
    assert served.daemon.ctx is not None and served.daemon.ctx.webhooks_enabled
    status, body = await post(served.session, *signed(event("batch_abc"), "msg_1"))
    assert (status, body) == (200, {"status": "accepted"})
    assert served.handed.added == ["batch_abc"]


@pytest.mark.parametrize("kind", ["batch.failed", "batch.expired", "batch.cancelled"])
async def test_every_batch_ending_is_handed(served: Served, kind: str) -> None:
    status, _ = await post(served.session, *signed(event("batch_x", kind), f"msg_{kind}"))
    assert status == 200
    assert served.handed.added == ["batch_x"]


async def test_replay_is_answered_but_ignored(served: Served) -> None:
    body, headers = signed(event("batch_once"), "msg_replayed")
    assert await post(served.session, body, headers) == (200, {"status": "accepted"})
    assert await post(served.session, body, headers) == (200, {"status": "duplicate"})
    assert served.handed.added == ["batch_once"]


async def test_bad_signature_is_401(served: Served) -> None:
    body, headers = signed(event("batch_a"), "msg_bad")
    tampered = body.replace(b"batch_a", b"batch_b")
    status, err = await post(served.session, tampered, headers)
    assert status == 401 and err["error"]["code"] == "invalid_signature"
    status, err = await post(served.session, *signed(event("batch_a"), "m2", secret=OTHER_SECRET))
    assert status == 401
    headers = {**headers, "webhook-signature": "v1,not-base64!! v2,AAAA"}
    status, err = await post(served.session, body, headers)
    assert status == 401
    assert served.handed.added == []


async def test_any_listed_signature_may_match(served: Served) -> None:
    body, headers = signed(event("batch_rot"), "msg_rot")
    wrong = signed(event("batch_rot"), "msg_rot", secret=OTHER_SECRET)[1]["webhook-signature"]
    headers["webhook-signature"] = f"{wrong} {headers['webhook-signature']}"
    assert (await post(served.session, body, headers))[0] == 200
    assert served.handed.added == ["batch_rot"]


@pytest.mark.parametrize("skew", [-301, 301])
async def test_stale_or_future_timestamp_is_400(served: Served, skew: int) -> None:
    at = datetime.now(tz=UTC) + timedelta(seconds=skew)
    status, err = await post(served.session, *signed(event("batch_old"), "msg_old", at))
    assert status == 400 and err["error"]["code"] == "stale_timestamp"
    assert served.handed.added == []


async def test_missing_headers_and_bad_payload_are_400(served: Served) -> None:
    body, headers = signed(event("batch_h"), "msg_h")
    for name in ("webhook-id", "webhook-timestamp", "webhook-signature"):
        partial = {k: v for k, v in headers.items() if k != name}
        status, err = await post(served.session, body, partial)
        assert status == 400 and err["error"]["code"] == "missing_headers"
    bad = {"type": "batch.completed", "data": {}}
    status, err = await post(served.session, *signed(bad, "msg_nodata"))
    assert status == 400 and err["error"]["code"] == "invalid_payload"
    assert served.handed.added == []


async def test_other_events_are_acknowledged_and_ignored(served: Served) -> None:
    payload = event("ftjob_1", "fine_tuning.job.succeeded")
    assert await post(served.session, *signed(payload, "msg_ft")) == (200, {"status": "ignored"})
    assert served.handed.added == []


async def test_route_absent_without_secret(
    tmp_path: Path, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_WEBHOOK_SECRET", raising=False)
    cfg = webhook_config(tmp_path, emulator.url, secret=None)
    async with running_daemon(cfg) as (d, base), aiohttp.ClientSession(base) as s:
        async with s.post("/webhooks/openai", data=b"{}") as r:
            assert r.status == 404
        assert d.ctx is not None and not d.ctx.webhooks_enabled


async def test_secret_from_environment(
    tmp_path: Path, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_WEBHOOK_SECRET", OTHER_SECRET)
    cfg = webhook_config(tmp_path, emulator.url, secret=None)
    async with running_daemon(cfg) as (d, base), aiohttp.ClientSession(base) as s:
        status, _ = await post(s, *signed(event("batch_e"), "msg_e", secret=OTHER_SECRET))
        assert status == 200
        assert d.ctx is not None and d.ctx.webhooks_enabled


async def test_webhook_brings_results_without_waiting_for_a_poll(tmp_path: Path) -> None:
    """Polling is slow (30 s); the signed event for the ended batch finishes the job now."""
    emu, runner = await start_emulator(time_scale=0.1)
    try:
        cfg = webhook_config(
            tmp_path,
            emu.url,
            batch={"poll_interval_seconds": 30.0},
            webhooks={"poll_interval_seconds": 30.0},
        )
        drop(cfg, "pushed.jsonl", chat_lines(3))
        async with running_daemon(cfg) as (_d, base), aiohttp.ClientSession(base) as s:
            await until(lambda: [b["status"] for b in emu.state.batches()] == ["completed"])
            [batch] = emu.state.batches()
            assert (await post(s, *signed(event(batch["id"]), "msg_done")))[0] == 200
            store = await Store.open(cfg.state.database)
            try:
                for _ in range(200):  # 4 s, well under one poll interval
                    [job] = await store.list_jobs()
                    if job.state == "done":
                        break
                    await asyncio.sleep(0.02)
            finally:
                await store.close()
        assert job.state == "done"
        assert (cfg.spool.dir / "done" / "pushed" / "output.jsonl").exists()
    finally:
        await runner.cleanup()
        emu.state.close()


def test_recent_ids_is_bounded() -> None:
    seen = RecentIds(maxlen=3)
    assert all(seen.add(i) for i in ("a", "b", "c"))
    assert not seen.add("a")  # refreshed: now the newest
    assert seen.add("d")  # evicts "b", the oldest
    assert seen.add("b")
    assert not seen.add("a")


@pytest.mark.parametrize(
    ("secret", "named"),
    [("whsec_%%%not-base64", r"\[webhooks\] secret_file"), ("   \n", r"is empty")],
)
async def test_bad_secret_file_is_a_config_error(tmp_path: Path, secret: str, named: str) -> None:
    cfg = webhook_config(tmp_path, "http://127.0.0.1:1/v1", secret=secret)
    with pytest.raises(ConfigError, match=named):
        await Daemon(cfg).run()


def test_webhooks_config(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, "http://x/v1")
    assert cfg.webhooks.poll_interval_seconds == 300.0
    assert cfg.webhooks.secret(env={}) is None
    raw = b"batchd-test-webhook-secret-32byt"
    assert cfg.webhooks.secret(env={"OPENAI_WEBHOOK_SECRET": SECRET}) == raw
    with pytest.raises(ConfigError, match="OPENAI_WEBHOOK_SECRET"):
        cfg.webhooks.secret(env={"OPENAI_WEBHOOK_SECRET": "whsec_!!"})
    for bad in (0, -1, "soon"):
        with pytest.raises(ConfigError, match=r"\[webhooks\] poll_interval_seconds"):
            make_config(tmp_path, "http://x/v1", webhooks={"poll_interval_seconds": bad})
