"""Big files and hard endings: split/merge, Uploads API, expiry, token-limit admission,
request retries, cancel and retry — the real daemon against the emulator."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson

from batchd.daemon import Daemon
from batchd.store import Store
from tests.conftest import (
    Emulator,
    chat_lines,
    config_file,
    drop,
    embedding_lines,
    make_config,
    read_jsonl,
    run_cli,
    run_once,
    start_emulator,
)

ROOT = Path(__file__).resolve().parent.parent


async def test_split_merge_in_input_order(tmp_path: Path, emulator: Emulator) -> None:
    cfg = make_config(
        tmp_path, emulator.url, limits={"max_requests_per_batch": 4}, output={"order": "input"}
    )
    data = chat_lines(10)
    drop(cfg, "big.jsonl", data)
    await run_once(cfg)
    done = cfg.spool.dir / "done" / "big"
    assert (done / "input.jsonl").read_bytes() == data
    out = read_jsonl(done / "output.jsonl")
    assert [r["custom_id"] for r in out] == [f"req-{i}" for i in range(10)]
    info = orjson.loads((done / "job.json").read_bytes())
    assert info["pieces"] == 3 and len(info["batch_ids"]) == 3
    assert emulator.state.batches_created == 3
    assert sorted(b["request_counts"]["total"] for b in emulator.state.batches()) == [2, 4, 4]
    assert not list((cfg.spool.dir / "processing").iterdir())


async def test_split_by_bytes(tmp_path: Path, emulator: Emulator) -> None:
    """The byte limit alone cuts the file (before, no test set max_bytes_per_batch)."""
    data = chat_lines(30)
    line = max(len(x) + 1 for x in data.splitlines())
    limit = max(1024, 4 * line)  # about four lines per piece; the smallest limit allowed
    cfg = make_config(
        tmp_path,
        emulator.url,
        limits={"max_bytes_per_batch": limit},
        retention={"delete_remote_files": False},  # the inputs stay to be measured
    )
    drop(cfg, "heavy.jsonl", data)
    await run_once(cfg)
    out = read_jsonl(cfg.spool.dir / "done" / "heavy" / "output.jsonl")
    assert sorted(r["custom_id"] for r in out) == sorted(f"req-{i}" for i in range(30))
    expected = -(-len(data) // limit)  # at least this many pieces
    assert emulator.state.batches_created >= expected > 1
    inputs = [f for f in emulator.state.files.values() if f.purpose == "batch"]
    assert len(inputs) == emulator.state.batches_created
    assert all(f.bytes <= limit for f in inputs)


async def test_split_by_embedding_inputs_api_order(tmp_path: Path, emulator: Emulator) -> None:
    cfg = make_config(tmp_path, emulator.url, limits={"max_embedding_inputs_per_batch": 5})
    drop(cfg, "emb.jsonl", embedding_lines(9))  # 12 inputs -> at least 3 pieces
    await run_once(cfg)
    out = read_jsonl(cfg.spool.dir / "done" / "emb" / "output.jsonl")
    ids = [r["custom_id"] for r in out]
    assert sorted(ids) == sorted(f"emb-{i}" for i in range(9)) and len(set(ids)) == 9
    assert emulator.state.batches_created >= 3
    for b in emulator.state.batches():
        assert b["request_counts"]["total"] <= 5


async def test_uploads_api_for_large_files(tmp_path: Path, emulator: Emulator) -> None:
    cfg = make_config(
        tmp_path, emulator.url, upload={"uploads_api_threshold_bytes": 1000, "part_bytes": 1024}
    )
    data = chat_lines(40)
    assert len(data) > 3 * 1024
    drop(cfg, "up.jsonl", data)
    await run_once(cfg)
    calls = emulator.state.calls
    assert calls["POST /v1/uploads"] == 1
    assert calls["POST /v1/uploads/{id}/parts"] == -(-len(data) // 1024)
    assert calls["POST /v1/uploads/{id}/complete"] == 1
    assert calls["POST /v1/files"] == 0
    assert len(read_jsonl(cfg.spool.dir / "done" / "up" / "output.jsonl")) == 40


async def test_expired_batch_keeps_results_and_resubmits_the_rest(tmp_path: Path) -> None:
    emu, runner = await start_emulator(time_scale=0.01, expire_after_seconds=1.0)
    try:
        cfg = make_config(tmp_path, emu.url)
        drop(cfg, "exp.jsonl", chat_lines(10, hooks={3: {"expire": True}, 8: {"expire": True}}))
        d = Daemon(cfg, once=True)
        task = asyncio.create_task(d.run())
        while not any(b["status"] == "expired" for b in emu.state.batches()):
            await asyncio.sleep(0.01)
        emu.state.config.expire_after_seconds = None  # the second attempt runs in time
        await asyncio.wait_for(task, 30)
        done = cfg.spool.dir / "done" / "exp"
        ids = sorted(r["custom_id"] for r in read_jsonl(done / "output.jsonl"))
        assert ids == sorted(f"req-{i}" for i in range(10))
        assert not (done / "errors.jsonl").exists()
        first, second = emu.state.batches()
        assert first["status"] == "expired" and second["status"] == "completed"
        assert second["request_counts"]["total"] == 2
    finally:
        await runner.cleanup()
        emu.state.close()


async def test_retryable_failures_resubmitted_non_retryable_kept(
    tmp_path: Path, emulator: Emulator
) -> None:
    cfg = make_config(tmp_path, emulator.url, retry={"max_attempts_per_piece": 3})
    drop(
        cfg,
        "rf.jsonl",
        chat_lines(6, hooks={1: {"status": 500}, 2: {"status": 400}, 4: {"status": 429}}),
    )
    await run_once(cfg)
    done = cfg.spool.dir / "done" / "rf"
    errs = {r["custom_id"]: r for r in read_jsonl(done / "errors.jsonl")}
    assert set(errs) == {"req-1", "req-2", "req-4"}  # each exactly once
    assert len(read_jsonl(done / "errors.jsonl")) == 3
    assert len(read_jsonl(done / "output.jsonl")) == 3
    totals = [b["request_counts"]["total"] for b in emulator.state.batches()]
    assert totals == [6, 2, 2]  # the 400 is never resubmitted


async def test_token_limit_refusal_requeues_then_admission_respects_learned_limit(
    tmp_path: Path,
) -> None:
    line_tokens = len(orjson.dumps(orjson.loads(chat_lines(1))["body"])) // 4
    limit = line_tokens * 6  # two pieces of 4 lines do not fit together
    emu, runner = await start_emulator(time_scale=0.02, token_limits={"gpt-4o-mini": limit})
    try:
        cfg = make_config(
            tmp_path,
            emu.url,
            limits={"max_requests_per_batch": 4},
            admission={"refusal_backoff_seconds": 0.05},
        )
        drop(cfg, "tok.jsonl", chat_lines(12))
        await run_once(cfg)
        out = read_jsonl(cfg.spool.dir / "done" / "tok" / "output.jsonl")
        assert sorted(r["custom_id"] for r in out) == sorted(f"req-{i}" for i in range(12))
        batches = emu.state.batches()
        refused = [b for b in batches if b["status"] == "failed"]
        assert refused and all(
            b["errors"]["data"][0]["code"] == "token_limit_exceeded" for b in refused
        )
        # Pieces 1 and 2 went out with piece 0 before any limit was known and were
        # refused; once learned, admission never again put more in flight than the
        # limit (the emulator would have refused again).
        assert len(refused) == 2
        assert len(batches) == 5
        store = await Store.open(cfg.state.database)
        try:
            assert await store.learned_limits() == {"gpt-4o-mini": limit}
        finally:
            await store.close()
    finally:
        await runner.cleanup()
        emu.state.close()


async def test_cancel_collects_partial_results_then_retry(tmp_path: Path) -> None:
    # long enough in progress for a CLI started on a busy machine to cancel it
    emu, runner = await start_emulator(
        time_scale=1.0, validating_seconds=0.2, in_progress_seconds=8.0
    )
    try:
        cfg = make_config(tmp_path, emu.url)
        conf = config_file(tmp_path, emu.url)
        drop(cfg, "slow.jsonl", chat_lines(10))
        d = Daemon(cfg)
        task = asyncio.create_task(d.run())
        while not any(b["status"] == "in_progress" for b in emu.state.batches()):
            await asyncio.sleep(0.02)
        r = await asyncio.to_thread(run_cli, "cancel", "slow", "--config", str(conf))
        assert r.returncode == 0, r.stderr
        assert "cancelled" in r.stdout
        d.request_stop()
        await asyncio.wait_for(task, 10)
        done = cfg.spool.dir / "done" / "slow"
        info = orjson.loads((done / "job.json").read_bytes())
        assert info["status"] == "cancelled"
        [batch] = emu.state.batches()
        assert batch["status"] == "cancelled"
        partial = read_jsonl(done / "output.jsonl")
        assert 0 < len(partial) < 10
        # retry: the unfinished requests become a new job
        r = await asyncio.to_thread(run_cli, "retry", "slow", "--config", str(conf))
        assert r.returncode == 0, r.stderr
        emu.state.config.time_scale = 0.01
        await run_once(cfg)
        rest = read_jsonl(cfg.spool.dir / "done" / "slow-retry" / "output.jsonl")
        assert sorted(x["custom_id"] for x in partial + rest) == sorted(
            f"req-{i}" for i in range(10)
        )
    finally:
        await runner.cleanup()
        emu.state.close()


async def test_batch_created_during_a_cancel_is_cancelled_and_collected(tmp_path: Path) -> None:
    # Regression: a create in flight when the cancel arrived made a batch that nobody
    # cancelled or collected (billed, results never fetched).
    from batchd.emulator.faults import FaultConfig

    faults = FaultConfig(slow=1.0, slow_seconds=0.4, routes=frozenset({"POST /v1/batches"}))
    emu, runner = await start_emulator(time_scale=0.5, faults=faults)
    try:
        cfg = make_config(tmp_path, emu.url, limits={"max_requests_per_batch": 2})
        drop(cfg, "racy.jsonl", chat_lines(6))
        d = Daemon(cfg)
        task = asyncio.create_task(d.run())
        while emu.state.calls["POST /v1/batches"] == 0:
            await asyncio.sleep(0.01)
        store = await Store.open(cfg.state.database)
        try:
            [job] = await store.list_jobs()
            assert await store.request_cancel(job.id)
            d.ctx.wake_collect.set()  # type: ignore[union-attr]
            for _ in range(1500):
                if (await store.job(job.id)).state.value == "cancelled":
                    break
                await asyncio.sleep(0.02)
            assert (await store.job(job.id)).state.value == "cancelled"
        finally:
            await store.close()
        d.request_stop()
        await asyncio.wait_for(task, 10)
        batches = emu.state.batches()
        assert batches, "the slow create should have made a batch"
        assert {b["status"] for b in batches} <= {"cancelled", "cancelling"}
        info = orjson.loads((cfg.spool.dir / "done" / "racy" / "job.json").read_bytes())
        assert sorted(info["batch_ids"]) == sorted(b["id"] for b in batches)
    finally:
        await runner.cleanup()
        emu.state.close()


async def test_failed_job_keeps_results_of_finished_pieces(tmp_path: Path) -> None:
    # Regression: failing a job deleted the output its finished pieces had produced.
    line_tokens = len(orjson.dumps(orjson.loads(chat_lines(1))["body"])) // 4
    emu, runner = await start_emulator(
        time_scale=0.01, token_limits={"gpt-4o-mini": line_tokens * 3}
    )
    try:
        cfg = make_config(
            tmp_path,
            emu.url,
            limits={"max_requests_per_batch": 4},
            admission={"refusal_backoff_seconds": 0.01},
        )
        drop(cfg, "partly.jsonl", chat_lines(10))  # pieces of 4, 4, 2: only 2 lines fit
        await run_once(cfg)
        failed = cfg.spool.dir / "failed" / "partly"
        report = orjson.loads((failed / "report.json").read_bytes())
        assert report["reason"] == "token_limit" and "max_requests_per_batch" in report["message"]
        out = read_jsonl(failed / "output.jsonl")
        assert sorted(r["custom_id"] for r in out) == ["req-8", "req-9"]
        assert not list((cfg.spool.dir / "processing").iterdir())
    finally:
        await runner.cleanup()
        emu.state.close()


async def test_key_rejected_for_a_while_does_not_fail_the_job(tmp_path: Path) -> None:
    # A rotated key (401 on polls and downloads) holds the job, never fails it; once the
    # key works again (a probe; here made at once, as SIGHUP does) it carries on.
    emu, runner = await start_emulator(time_scale=0.05)
    try:
        cfg = make_config(tmp_path, emu.url)
        drop(cfg, "rotated.jsonl", chat_lines(3))
        d = Daemon(cfg)
        task = asyncio.create_task(d.run())
        while not emu.state.batches():
            await asyncio.sleep(0.01)
        good = emu.state.config.api_key
        emu.state.config.api_key = "sk-rotated-elsewhere-0000000000"
        while d.ctx is None or not d.ctx.hold.blocked:
            await asyncio.sleep(0.02)
        polls = emu.state.calls["GET /v1/batches/{id}"] + emu.state.calls["GET /v1/batches"]
        await asyncio.sleep(0.5)
        now = emu.state.calls["GET /v1/batches/{id}"] + emu.state.calls["GET /v1/batches"]
        assert now == polls  # held: no polling meanwhile (the prober waits 5 s)
        assert not (cfg.spool.dir / "failed" / "rotated").exists()
        emu.state.config.api_key = good
        d.ctx.hold.changed.set()
        for _ in range(1000):
            if (cfg.spool.dir / "done" / "rotated").exists():
                break
            await asyncio.sleep(0.02)
        d.request_stop()
        await asyncio.wait_for(task, 10)
        assert len(read_jsonl(cfg.spool.dir / "done" / "rotated" / "output.jsonl")) == 3
    finally:
        await runner.cleanup()
        emu.state.close()
