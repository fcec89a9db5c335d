"""Several replicas on one PostgreSQL store and one shared spool."""

from __future__ import annotations

from pathlib import Path

from batchd.store import Store
from tests.conftest import Emulator, chat_lines, drop, make_config, read_jsonl, run_once


async def test_one_daemon_on_postgresql_runs_jobs_end_to_end(
    tmp_path: Path, emulator: Emulator, pg_url: str
) -> None:
    cfg = make_config(
        tmp_path,
        emulator.url,
        state={"database": pg_url},
        limits={"max_requests_per_batch": 4},
    )
    drop(cfg, "small.jsonl", chat_lines(3))
    drop(cfg, "split.jsonl", chat_lines(10, fail=[2]))
    drop(cfg, "bad.jsonl", b"not json\n")
    await run_once(cfg)
    done = cfg.spool.dir / "done"
    assert sorted(p.name for p in done.iterdir()) == ["small", "split"]
    assert len(read_jsonl(done / "split" / "output.jsonl")) == 9
    assert len(read_jsonl(done / "split" / "errors.jsonl")) == 1
    assert (cfg.spool.dir / "failed" / "bad" / "report.json").exists()
    async with Store.connect(pg_url) as store:
        assert await store.count_by_state() == {"done": 2, "failed": 1}
