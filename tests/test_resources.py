"""Resource trouble: a spool that cannot take results gives a clear error and is retried
later, without losing the file or corrupting the store; a failing stage is restarted."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from batchd.daemon import Daemon
from batchd.states import JobState
from batchd.store import Store
from tests.conftest import Emulator, chat_lines, drop, make_config, read_jsonl


async def _wait(pred: object, timeout: float = 20) -> None:
    for _ in range(int(timeout / 0.02)):
        if await pred():  # type: ignore[operator]
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition never held")


async def test_unwritable_results_dir_is_retried_then_finishes(
    tmp_path: Path, emulator: Emulator
) -> None:
    cfg = make_config(tmp_path, emulator.url)
    d = Daemon(cfg)
    task = asyncio.create_task(d.run())
    try:
        await _wait(lambda: asyncio.sleep(0, d.ctx is not None))
        done = cfg.spool.dir / "done"
        done.rmdir()
        done.write_text("not a directory")  # every publish into done/ now fails
        drop(cfg, "stuck.jsonl", chat_lines(3))
        store = await Store.open(cfg.state.database)
        try:

            async def collecting() -> bool:
                jobs = await store.list_jobs()
                return (
                    bool(jobs)
                    and jobs[0].state == JobState.COLLECTING
                    and bool(list((cfg.spool.dir / "processing").glob("*.d/output.jsonl")))
                )

            await _wait(collecting)
            await asyncio.sleep(0.3)  # a few failed retries
            [job] = await store.list_jobs()
            assert job.state == JobState.COLLECTING  # not failed, not lost
            done.unlink()
            done.mkdir()

            async def finished() -> bool:
                return (await store.list_jobs())[0].state == JobState.DONE

            await _wait(finished)
        finally:
            await store.close()
        assert len(read_jsonl(done / "stuck" / "output.jsonl")) == 3
    finally:
        d.request_stop()
        await asyncio.wait_for(task, 10)
    con = sqlite3.connect(cfg.state.database)
    assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    con.close()


async def test_a_failing_stage_is_restarted(
    tmp_path: Path, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batchd.stages import track

    calls = {"n": 0}
    real = track.Tracker.step

    async def flaky(self: track.Tracker) -> float | None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise sqlite3.OperationalError("database is locked")
        return await real(self)

    monkeypatch.setattr(track.Tracker, "step", flaky)
    cfg = make_config(tmp_path, emulator.url)
    drop(cfg, "r.jsonl", chat_lines(2))
    d = Daemon(cfg, once=True)
    await asyncio.wait_for(d.run(), 30)
    assert len(read_jsonl(cfg.spool.dir / "done" / "r" / "output.jsonl")) == 2
    restarts = d.metrics.stage_restarts.labels("track")._value.get()
    assert restarts == 1
