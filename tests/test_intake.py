"""Intake while running: a file renamed into inbox/ is claimed on its inotify event
(not at the next rescan), a burst is claimed whole, and the job's SHA-256 (hashed by
the collect stage, off the path to the batch) lands in job.json."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from pathlib import Path

import orjson

from batchd.daemon import Daemon
from batchd.stages import intake as watch
from tests.conftest import Emulator, chat_lines, drop, make_config


async def _wait(pred: Callable[[], bool], timeout: float) -> float:
    start = time.monotonic()
    while not pred():
        assert time.monotonic() - start < timeout, "timed out"
        await asyncio.sleep(0.005)
    return time.monotonic() - start


async def test_files_dropped_while_running_are_claimed_at_once(
    tmp_path: Path, emulator: Emulator
) -> None:
    cfg = make_config(tmp_path, emulator.url)
    d = Daemon(cfg, serve_http=False)
    task = asyncio.create_task(d.run())
    try:
        await _wait(lambda: (cfg.spool.dir / "inbox").is_dir(), 5)
        await asyncio.sleep(0.2)  # idle: past the start-up scan
        data = chat_lines(5)
        drop(cfg, "one.jsonl", data)
        inbox = cfg.spool.dir / "inbox"
        took = await _wait(lambda: not any(inbox.iterdir()), 5)
        assert took < watch.RESCAN_SECONDS / 2  # the event, not the rescan
        for i in range(50):
            drop(cfg, f"burst-{i}.jsonl", chat_lines(2))
        await _wait(lambda: emulator.state.batches_created == 51, 30)
        done = cfg.spool.dir / "done" / "one" / "job.json"
        await _wait(done.exists, 30)
        info = orjson.loads(done.read_bytes())
        assert info["sha256"] == hashlib.sha256(data).hexdigest()
    finally:
        d.request_stop()
        await asyncio.wait_for(task, 10)
