"""Nothing grows for ever: the provider's copies, old job rows and result dirs go, in
bounded steps, never before the local copy is durable; a shutdown mid-burst leaves
nothing half-done."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import orjson

from batchd import logs
from batchd.metrics import Metrics
from batchd.providers import Providers
from batchd.spool import Spool
from batchd.stages import Context
from batchd.stages.retention import Retention
from batchd.store import Store
from tests.conftest import (
    API_KEY,
    KEY_ENV,
    Emulator,
    chat_lines,
    config_file,
    drop,
    make_config,
    read_jsonl,
    run_once,
)
from tests.procs import ROOT


async def test_provider_copies_are_deleted_once_results_are_on_disk(
    tmp_path: Path, emulator: Emulator
) -> None:
    cfg = make_config(tmp_path, emulator.url)
    drop(cfg, "kept.jsonl", chat_lines(4, fail=[1]))
    d = await run_once(cfg)
    done = cfg.spool.dir / "done" / "kept"
    assert len(read_jsonl(done / "output.jsonl")) == 3  # the local copy is there
    [batch] = emulator.state.batches()
    gone = {batch["input_file_id"], batch["output_file_id"], batch["error_file_id"]}
    assert gone.isdisjoint(emulator.state.files)  # the emulator deleted all three
    assert emulator.state.calls["DELETE /v1/files/{id}"] == 3
    for kind in ("input", "output", "error"):
        assert d.metrics.remote_files_deleted.labels(kind)._value.get() == 1
    async with Store.connect(cfg.state.database) as store:
        [job] = await store.list_jobs()
        deleted = [e.detail for e in await store.events(job.id) if e.kind == "remote_file_deleted"]
    assert sorted(x["kind"] for x in deleted if x) == ["error", "input", "output"]


async def test_provider_copies_stay_when_retention_says_so(
    tmp_path: Path, emulator: Emulator
) -> None:
    cfg = make_config(tmp_path, emulator.url, retention={"delete_remote_files": False})
    drop(cfg, "kept.jsonl", chat_lines(2))
    await run_once(cfg)
    assert emulator.state.calls["DELETE /v1/files/{id}"] == 0


async def test_old_rows_and_result_dirs_go_in_bounded_steps(
    tmp_path: Path, emulator: Emulator
) -> None:
    cfg = make_config(tmp_path, emulator.url, retention={"jobs_days": 30, "results_days": 10})
    for i in range(3):
        drop(cfg, f"old-{i}.jsonl", chat_lines(1 + i))
    drop(cfg, "new.jsonl", chat_lines(5))
    await run_once(cfg)
    con = sqlite3.connect(cfg.state.database)
    day = 86400
    con.execute(
        "UPDATE jobs SET finished_at = finished_at - ? WHERE name LIKE 'old-%'", (40 * day,)
    )
    con.execute("UPDATE jobs SET finished_at = finished_at - ? WHERE name = 'new'", (12 * day,))
    con.commit()
    con.close()
    async with (
        Store.connect(cfg.state.database) as store,
        Providers.build(cfg, Metrics()) as providers,
    ):
        ctx = Context(cfg, store, Spool(cfg.spool.dir), providers, Metrics(), logs.get())
        retention = Retention(ctx)
        await retention.step()
        names = sorted(j.name for j in await store.list_jobs())
        assert names == ["new"]  # rows older than 30 days are gone, with their history
        [new] = await store.list_jobs()
        assert new.results_deleted_at is not None
    assert not (cfg.spool.dir / "done" / "new").exists()  # results older than 10 days
    con = sqlite3.connect(cfg.state.database)
    orphans = con.execute("SELECT COUNT(*) FROM events WHERE job_id NOT IN (SELECT id FROM jobs)")
    assert orphans.fetchone() == (0,)
    assert con.execute("SELECT state, n FROM job_counts WHERE n > 0").fetchall() == [("done", 1)]
    con.close()


def test_results_kept_longer_than_rows_is_refused(tmp_path: Path) -> None:
    from batchd import config

    try:
        config.parse({"retention": {"jobs_days": 30, "results_days": 60}}, tmp_path, env={})
    except config.ConfigError as e:
        assert "[retention] results_days" in str(e)
    else:
        raise AssertionError("accepted results_days > jobs_days")


async def test_sigterm_mid_burst_drops_nothing_on_the_floor(
    tmp_path: Path, emulator: Emulator
) -> None:
    """Before: stopping in the middle of a burst printed `RuntimeWarning: coroutine
    'submit_attempt' was never awaited` (and 'advance'): scheduled work dropped."""
    conf = config_file(tmp_path, emulator.url, extra='[intake]\nduplicate_window = "0"\n')
    spool = tmp_path / "spool"
    Spool(spool).ensure()
    env = {**os.environ, KEY_ENV: API_KEY, "PYTHONWARNINGS": "default"}
    p = subprocess.Popen(  # noqa: ASYNC220 - starting it does not block
        [sys.executable, "-X", "dev", "-m", "batchd", "run", "-c", str(conf)],
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env=env,
    )
    try:
        for i in range(200):
            part = spool / f".b{i}.part"
            part.write_bytes(chat_lines(1 + i % 3))
            os.replace(part, spool / "inbox" / f"burst-{i}.jsonl")
        deadline = time.monotonic() + 30
        while emulator.state.batches_created < 5 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        p.send_signal(signal.SIGTERM)
        _, err = await asyncio.to_thread(p.communicate, timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    text = err.decode(errors="replace")
    assert p.returncode == 0, text[-3000:]
    assert "never awaited" not in text and "Traceback" not in text, text[-3000:]
    con = sqlite3.connect(tmp_path / "batchd.db")
    assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    con.close()
    # Whatever was left is taken up: every file ends in done/ exactly once.
    r = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "batchd", "run", "--once", "-c", str(conf)],
        capture_output=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    done = sorted(p.name for p in (spool / "done").iterdir())
    assert done == sorted(f"burst-{i}" for i in range(200))
    infos = [orjson.loads((spool / "done" / n / "job.json").read_bytes()) for n in done]
    assert all(len(i["batch_ids"]) == 1 for i in infos)
    assert emulator.state.batches_created == 200
