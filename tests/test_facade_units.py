"""The facade's parts on their own: tenants in the config, key lookup, the status mapping,
what makes two creates the same, and the facade beside the HTTP queue on one listener."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from batchd.config import ConfigError, parse
from batchd.facade import tenants as tenants_mod
from batchd.facade import views
from batchd.facade.batches import dedupe_key
from batchd.states import TERMINAL_JOB_STATES, JobState
from batchd.store import Attempt, Job
from tests.conftest import Emulator, chat_lines, make_config
from tests.daemon_http import free_port, running_daemon

KEY = "sk-tenant-key-0123456789SECRET"


def _cfg(tmp_path: Path, facade: dict[str, Any]) -> Any:
    return parse({"facade": facade}, tmp_path, env={})


def test_tenants_in_the_config(tmp_path: Path) -> None:
    (tmp_path / "a.key").write_text(KEY + "\n")
    (tmp_path / "a.whsec").write_text("whsec_c2VjcmV0\n")
    digest = hashlib.sha256(b"other-key").hexdigest()
    cfg = _cfg(
        tmp_path,
        {
            "dedupe_window": "5m",
            "tenants": {
                "alpha": {
                    "key_file": "a.key",
                    "webhook_url": "https://hooks.example/b",
                    "webhook_secret_file": "a.whsec",
                },
                "beta": {"key_sha256": digest.upper()},
            },
        },
    )
    assert cfg.facade.dedupe_window_seconds == 300
    loaded = tenants_mod.load(cfg.facade)
    assert loaded["alpha"].webhook_key == b"secret"
    keys = tenants_mod.Keys(loaded)
    assert keys.tenant(KEY) is loaded["alpha"]
    assert keys.tenant("other-key") is loaded["beta"]
    assert keys.tenant("sk-nobody") is None
    assert KEY not in repr(cfg) and KEY not in repr(loaded)


@pytest.mark.parametrize(
    ("tenant", "message"),
    [
        ({}, "exactly one of key_file or key_sha256"),
        ({"key_file": "a.key", "key_sha256": "0" * 64}, "exactly one of"),
        ({"key_sha256": "xyz"}, "64 hex digits"),
        ({"key_sha256": "0" * 64, "token": "x"}, "token: unknown key"),
        ({"key_sha256": "0" * 64, "webhook_url": "https://x"}, "needs webhook_secret_file"),
        ({"key_sha256": "0" * 64, "webhook_secret": "whsec_x"}, "without webhook_url"),
        ({"key_sha256": "0" * 64, "webhook_url": "ftp://x", "webhook_secret": "w"}, "http"),
    ],
)
def test_tenant_config_errors_name_the_key(
    tmp_path: Path, tenant: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path, {"tenants": {"alpha": tenant}})
    assert "[facade.tenants.alpha]" in str(e.value) and message in str(e.value)


def test_tenant_names_and_shared_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tenant name"):
        _cfg(tmp_path, {"tenants": {"no spaces": {"key_sha256": "0" * 64}}})
    cfg = _cfg(
        tmp_path, {"tenants": {"a": {"key_sha256": "0" * 64}, "b": {"key_sha256": "0" * 64}}}
    )
    with pytest.raises(ConfigError, match="the same API key as tenant a"):
        tenants_mod.load(cfg.facade)
    (tmp_path / "empty.key").write_text("\n")
    cfg = _cfg(tmp_path, {"tenants": {"a": {"key_file": "empty.key"}}})
    with pytest.raises(ConfigError, match="key_file"):
        tenants_mod.load(cfg.facade)


def _job(state: JobState, **kw: Any) -> Job:
    values: dict[str, Any] = {
        "id": "J",
        "name": "batch_x",
        "state": state,
        "source": "facade",
        "input_path": "processing/J--batch_x.jsonl",
        "sha256": None,
        "endpoint": "/v1/chat/completions",
        "model": "m",
        "requests": 10,
        "bytes": 1,
        "est_tokens": 1,
        "completed": 0,
        "failed": 0,
        "usage": None,
        "reason": None,
        "result_dir": None,
        "cancel_requested": False,
        "created_at": 1.0,
        "updated_at": 1.0,
        "finished_at": 2.0 if state in TERMINAL_JOB_STATES else None,
    }
    return Job(**{**values, **kw})


def _att(piece: int, at: float, outcome: str | None = None, started: bool = True) -> Attempt:
    batch = {"in_progress_at": 5} if started else {"status": "failed"}
    return Attempt(
        f"A{piece}-{at}",
        "J",
        piece,
        "p",
        "f",
        f"b{at}",
        1.0,
        "completed",
        batch,
        True,
        at,
        at,
        outcome=outcome,
    )


def test_status_mapping() -> None:
    S = JobState
    assert views.live_status(None, []) == "validating"
    assert views.live_status(_job(S.QUEUED), []) == "validating"
    refused = [_att(0, 1, "requeue", started=False)]
    assert views.live_status(_job(S.SUBMITTING), refused) == "validating"  # held, not failed
    assert views.live_status(_job(S.TRACKING), [_att(0, 1)]) == "in_progress"
    resubmitting = [_att(0, 1, "resubmit")]
    assert views.live_status(_job(S.SUBMITTING), resubmitting) == "in_progress"
    assert views.live_status(_job(S.TRACKING, cancel_requested=True), [_att(0, 1)]) == "cancelling"
    assert views.live_status(_job(S.COLLECTING), [_att(0, 1)]) == "finalizing"
    assert views.live_status(_job(S.DONE), [_att(0, 1)]) == "finalizing"  # not settled yet
    done = _job(S.DONE)
    assert views.final_status(done, [_att(0, 1, "completed")]) == "completed"
    retried = [_att(0, 1, "resubmit"), _att(0, 2, "completed"), _att(1, 1, "completed")]
    assert views.final_status(done, retried) == "completed"
    exhausted = [_att(0, 1, "resubmit"), _att(0, 2, "expired"), _att(1, 1, "completed")]
    assert views.final_status(done, exhausted) == "expired"
    assert views.final_status(_job(S.FAILED), []) == "failed"
    assert views.final_status(_job(S.CANCELLED), []) == "cancelled"


def test_errors_of_a_failed_batch() -> None:
    invalid = _job(
        JobState.FAILED,
        reason={
            "reason": "invalid_input",
            "problems": [{"line": 3, "code": "invalid_json", "message": "bad"}],
        },
    )
    errs = views.errors_of(invalid)
    assert errs == {
        "object": "list",
        "data": [{"code": "invalid_json", "message": "bad", "param": None, "line": 3}],
    }
    other = views.errors_of(_job(JobState.FAILED, reason={"reason": "token_limit", "message": "m"}))
    assert other is not None and other["data"][0]["code"] == "token_limit"
    assert views.errors_of(_job(JobState.DONE)) is None


def test_what_makes_two_creates_the_same() -> None:
    base = dedupe_key("file-1", "/v1/chat/completions", "24h", {"a": "1", "b": "2"}, None)
    assert base == dedupe_key("file-1", "/v1/chat/completions", "24h", {"b": "2", "a": "1"}, None)
    for other in (
        dedupe_key("file-2", "/v1/chat/completions", "24h", {"a": "1", "b": "2"}, None),
        dedupe_key("file-1", "/v1/embeddings", "24h", {"a": "1", "b": "2"}, None),
        dedupe_key("file-1", "/v1/chat/completions", "24h", {"a": "1"}, None),
        dedupe_key("file-1", "/v1/chat/completions", "24h", {"a": "1", "b": "2"}, 3600.0),
    ):
        assert other != base
    assert dedupe_key("f", "/v1/embeddings", "24h", None, None) == dedupe_key(
        "f", "/v1/embeddings", "24h", {}, None
    )


def test_ids_are_short_and_sortable() -> None:
    ids = [views.new_id("batch_") for _ in range(3)]
    assert all(len(i) <= 64 and i.startswith("batch_") for i in ids)
    assert views.page([], True)["has_more"] is False  # an empty page never says "more"


async def test_beside_the_http_queue_on_one_listener(emulator: Emulator, tmp_path: Path) -> None:
    (tmp_path / "token").write_text("queue-token\n")
    (tmp_path / "a.key").write_text(KEY + "\n")
    cfg = make_config(
        tmp_path,
        emulator.url,
        http={"listen": f"127.0.0.1:{free_port()}", "token_file": str(tmp_path / "token")},
        facade={"tenants": {"alpha": {"key_file": str(tmp_path / "a.key")}}},
    )
    async with running_daemon(cfg) as (_d, base), aiohttp.ClientSession() as s:
        queue = {"Authorization": "Bearer queue-token"}
        tenant = {"Authorization": f"Bearer {KEY}"}
        async with s.post(f"{base}/v1/jobs?name=q", data=chat_lines(2), headers=queue) as r:
            assert r.status == 202
        async with s.get(f"{base}/v1/jobs", headers=tenant) as r:
            assert r.status == 403  # the queue's token, not a tenant's key
        async with s.get(f"{base}/v1/batches", headers=queue) as r:
            assert r.status == 401
            body = await r.json()
            assert body["error"]["code"] == "invalid_api_key" and "type" in body["error"]
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", chat_lines(2), filename="x.jsonl")
        async with s.post(f"{base}/v1/files", data=form, headers=tenant) as r:
            assert r.status == 200 and r.headers["x-request-id"].startswith("req_")
            file_id = (await r.json())["id"]
        create = {
            "input_file_id": file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        }
        async with s.post(f"{base}/v1/batches", json=create, headers=tenant) as r:
            assert r.status == 200
        async with s.delete(f"{base}/v1/batches", headers=tenant) as r:
            assert r.status == 405
            assert set((await r.json())["error"]) == {"message", "type", "param", "code"}
        async with s.get(f"{base}/v1/files/{file_id}/x/y", headers=tenant) as r:
            assert r.status == 404 and "Invalid URL" in (await r.json())["error"]["message"]
        async with s.post(f"{base}/v1/batches", data=b"{nope", headers=tenant) as r:
            assert r.status == 400
    # The tenant's key is nowhere batchd writes: not the database, not the spool.
    for p in tmp_path.rglob("*"):
        if p.is_file() and p.name != "a.key":
            assert KEY.encode() not in p.read_bytes(), p
