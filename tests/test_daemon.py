"""End to end: the real daemon against the emulator over loopback, real spool and SQLite."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson

from batchd.daemon import Daemon
from batchd.states import JobState
from batchd.store import Store
from tests.conftest import (
    Emulator,
    chat_lines,
    drop,
    embedding_lines,
    make_config,
    read_jsonl,
    run_once,
    start_emulator,
)


async def test_chat_happy_path(tmp_path: Path, emulator: Emulator) -> None:
    cfg = make_config(tmp_path, emulator.url, batch={"metadata": {"team": "search"}})
    data = chat_lines(20)
    drop(cfg, "requests.jsonl", data)
    await run_once(cfg)
    done = cfg.spool.dir / "done" / "requests"
    assert (done / "input.jsonl").read_bytes() == data
    out = read_jsonl(done / "output.jsonl")
    assert sorted(r["custom_id"] for r in out) == sorted(f"req-{i}" for i in range(20))
    assert all(r["response"]["status_code"] == 200 for r in out)
    assert not (done / "errors.jsonl").exists()
    info = orjson.loads((done / "job.json").read_bytes())
    assert info["status"] == "done"
    assert info["request_counts"] == {"total": 20, "completed": 20, "failed": 0}
    assert info["usage"]["total_tokens"] > 0
    assert len(info["batch_ids"]) == 1
    assert emulator.state.batches_created == 1
    [batch] = emulator.state.batches()
    assert batch["metadata"]["team"] == "search"
    assert batch["metadata"]["batchd_job"] == info["job_id"]
    assert not list((cfg.spool.dir / "inbox").iterdir())
    assert not list((cfg.spool.dir / "processing").iterdir())


async def test_embeddings_happy_path(tmp_path: Path, emulator: Emulator) -> None:
    cfg = make_config(tmp_path, emulator.url)
    drop(cfg, "emb.jsonl", embedding_lines(9))
    await run_once(cfg)
    done = cfg.spool.dir / "done" / "emb"
    out = read_jsonl(done / "output.jsonl")
    assert len(out) == 9
    assert out[0]["response"]["body"]["object"] == "list"
    [batch] = emulator.state.batches()
    assert batch["endpoint"] == "/v1/embeddings"


async def test_mixed_success_and_failed_requests(tmp_path: Path, emulator: Emulator) -> None:
    cfg = make_config(tmp_path, emulator.url)
    drop(cfg, "mixed.jsonl", chat_lines(10, fail=[2, 7]))
    await run_once(cfg)
    done = cfg.spool.dir / "done" / "mixed"
    ok = read_jsonl(done / "output.jsonl")
    bad = read_jsonl(done / "errors.jsonl")
    assert {r["custom_id"] for r in bad} == {"req-2", "req-7"}
    assert len(ok) == 8
    assert all(r["response"]["status_code"] == 400 for r in bad)
    info = orjson.loads((done / "job.json").read_bytes())
    assert info["request_counts"]["failed"] == 2


async def test_invalid_file_goes_to_failed_and_daemon_carries_on(
    tmp_path: Path, emulator: Emulator
) -> None:
    cfg = make_config(tmp_path, emulator.url)
    bad = b'{"custom_id": "a", "method": "GET", "url": "/v1/chat/completions", "body": {}}\n'
    drop(cfg, "bad.jsonl", bad)
    drop(cfg, "good.jsonl", chat_lines(3))
    await run_once(cfg)
    failed = cfg.spool.dir / "failed" / "bad"
    assert (failed / "input.jsonl").read_bytes() == bad
    report = orjson.loads((failed / "report.json").read_bytes())
    assert report["reason"] == "invalid_input"
    assert report["problems"][0]["line"] == 1
    assert report["problems"][0]["code"] == "invalid_method"
    assert (cfg.spool.dir / "done" / "good" / "output.jsonl").exists()
    assert emulator.state.batches_created == 1


async def test_server_side_validation_failure(tmp_path: Path, emulator: Emulator) -> None:
    # Locally valid, but the server knows no such model: the batch goes `failed`.
    cfg = make_config(tmp_path, emulator.url)
    drop(cfg, "unknown.jsonl", chat_lines(3, model="x-emulator-unknown-model"))
    await run_once(cfg)
    report = orjson.loads((cfg.spool.dir / "failed" / "unknown" / "report.json").read_bytes())
    assert report["reason"] == "batch_failed"
    assert report["errors"][0]["code"] == "model_not_found"
    assert report["errors"][0]["line"] == 1
    assert (cfg.spool.dir / "failed" / "unknown" / "input.jsonl").exists()


async def test_name_collision_never_overwrites(tmp_path: Path, emulator: Emulator) -> None:
    cfg = make_config(tmp_path, emulator.url)
    for i in range(3):
        drop(cfg, "same.jsonl", chat_lines(2 + i))  # other content: not a duplicate
        await run_once(cfg)
    names = sorted(p.name for p in (cfg.spool.dir / "done").iterdir())
    assert names == ["same", "same-2", "same-3"]


async def test_ignored_names_stay_in_inbox(tmp_path: Path, emulator: Emulator) -> None:
    cfg = make_config(tmp_path, emulator.url)
    inbox = cfg.spool.dir / "inbox"
    inbox.mkdir(parents=True)
    for name in (".hidden.jsonl", "x.jsonl.tmp", "y.jsonl.part", "notes.txt"):
        (inbox / name).write_bytes(chat_lines(1))
    await run_once(cfg)
    assert sorted(p.name for p in inbox.iterdir()) == [
        ".hidden.jsonl",
        "notes.txt",
        "x.jsonl.tmp",
        "y.jsonl.part",
    ]
    assert emulator.state.batches_created == 0


async def test_rejected_key_holds_the_job_and_once_exits_1(tmp_path: Path) -> None:
    """A 401 is the operator's problem: the job waits (before: it went to failed/)."""
    emu, runner = await start_emulator(api_key="sk-the-right-key-000000")
    try:
        cfg = make_config(tmp_path, emu.url)
        drop(cfg, "denied.jsonl", chat_lines(2))
        d = await run_once(cfg)
        assert d.exit_code == 1
        assert not (cfg.spool.dir / "failed").exists() or not any(
            (cfg.spool.dir / "failed").iterdir()
        )
        store = await Store.open(cfg.state.database)
        try:
            [job] = await store.list_jobs()
            assert not job.ended
            held = await store.setting("api_hold")
            assert held is not None and "Incorrect API key" in held[0]
        finally:
            await store.close()
        assert emu.state.calls["POST /v1/files"] == 1  # a 401 is not retried
    finally:
        await runner.cleanup()
        emu.state.close()


async def _dump(db: Path) -> str:
    import sqlite3

    con = sqlite3.connect(db)
    try:
        rows = [
            con.execute(q).fetchall()
            for q in (
                "SELECT id, state, reason FROM jobs",
                "SELECT id, piece, file_id, batch_id, create_sent_at, status, collected, abandoned,"
                " outcome, upload_started_at FROM attempts",
                "SELECT * FROM pieces",
                "SELECT kind, old_state, new_state, detail FROM events",
            )
        ]
    finally:
        con.close()
    return "\n".join(map(str, rows))


async def test_restart_while_in_flight_creates_no_second_batch(tmp_path: Path) -> None:
    emu, runner = await start_emulator(time_scale=0.2)  # ~1 s in flight
    try:
        cfg = make_config(tmp_path, emu.url)
        drop(cfg, "r.jsonl", chat_lines(5))
        d = Daemon(cfg)
        task = asyncio.create_task(d.run())
        for _ in range(1000):
            if emu.state.batches_created:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError(f"no batch created; calls={dict(emu.state.calls)}")
        d.request_stop()
        await asyncio.wait_for(task, 10)
        store = await Store.open(cfg.state.database)
        [job] = await store.list_jobs()
        await store.close()
        # Stopped right after the create: either recorded, or its outcome unknown
        # (then the restart finds the batch by its attempt id instead of creating again).
        assert job.state in (JobState.SUBMITTING, JobState.TRACKING)
        try:
            await run_once(cfg, timeout=30)
        except TimeoutError:
            raise AssertionError(await _dump(cfg.state.database)) from None
        assert emu.state.batches_created == 1
        assert len(read_jsonl(cfg.spool.dir / "done" / "r" / "output.jsonl")) == 5
    finally:
        await runner.cleanup()
        emu.state.close()


async def test_events_record_every_transition(tmp_path: Path, emulator: Emulator) -> None:
    cfg = make_config(tmp_path, emulator.url)
    drop(cfg, "ev.jsonl", chat_lines(2))
    await run_once(cfg)
    store = await Store.open(cfg.state.database)
    try:
        [job] = await store.list_jobs()
        events = await store.events(job.id)
    finally:
        await store.close()
    states = [e.new_state for e in events if e.new_state]
    assert states == ["queued", "validating", "submitting", "tracking", "collecting", "done"]
    kinds = [e.kind for e in events]
    assert "uploaded" in kinds and "batch_status" in kinds


async def test_orphan_claimed_file_is_adopted(tmp_path: Path, emulator: Emulator) -> None:
    # A crash between the claim's rename and the job insert leaves a file in processing/.
    cfg = make_config(tmp_path, emulator.url)
    proc = cfg.spool.dir / "processing"
    proc.mkdir(parents=True)
    (proc / "01J00000000000000000000000--orphan.jsonl").write_bytes(chat_lines(2))
    await run_once(cfg)
    assert len(read_jsonl(cfg.spool.dir / "done" / "orphan" / "output.jsonl")) == 2


async def test_upload_whose_id_was_never_recorded_is_adopted(
    tmp_path: Path, emulator: Emulator
) -> None:
    # A crash after the upload finished but before its file id was written down.
    from batchd.api import BatchApi
    from batchd.metrics import Metrics

    cfg = make_config(tmp_path, emulator.url)
    data = chat_lines(3)
    drop(cfg, "lost.jsonl", data)
    spool_file = cfg.spool.dir / "inbox" / "lost.jsonl"
    from batchd.spool import Spool

    spool = Spool(cfg.spool.dir)
    spool.ensure()
    claimed = spool.claim("lost.jsonl")
    assert claimed is not None and not spool_file.exists()
    store = await Store.open(cfg.state.database)
    await store.create_job(claimed.job_id, claimed.name, claimed.rel_path, "inbox")
    await store.transition(claimed.job_id, JobState.VALIDATING)
    await store.add_attempt("01ATTEMPTLOST0000000000000", claimed.job_id, 0, claimed.rel_path)
    await store.update_attempt("01ATTEMPTLOST0000000000000", upload_started_at=1.0)
    await store.close()
    async with BatchApi(cfg.api, cfg.api.api_key(), Metrics()) as api:
        f = await api.upload_file(
            spool.path(claimed.rel_path), "batchd-01ATTEMPTLOST0000000000000.jsonl"
        )
    await run_once(cfg)
    assert emulator.state.calls["POST /v1/files"] == 1  # adopted, not uploaded again
    [batch] = emulator.state.batches()
    assert batch["input_file_id"] == f["id"]
    assert len(read_jsonl(cfg.spool.dir / "done" / "lost" / "output.jsonl")) == 3
