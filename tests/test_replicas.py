"""Several replicas on one PostgreSQL store and one shared spool."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from batchd.admission import Candidate, admit
from batchd.states import JobState
from batchd.store import NewJob, Pending, Piece, Store
from batchd.store.claims import Claims
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


# --- leases and claims (the store's side, PostgreSQL) ------------------------------------


async def test_a_lease_is_one_owners_until_it_runs_out(pg_url: str) -> None:
    async with Store.connect(pg_url) as store:
        claims = Claims(store)
        assert await claims.take("job:J", "a", 0.3)
        assert await claims.take("job:J", "a", 0.3)  # kept by its owner
        assert not await claims.take("job:J", "b", 5)
        assert await claims.renew(["job:J", "job:K"], "a", 0.3) == {"job:J"}
        await asyncio.sleep(0.4)
        assert await claims.take("job:J", "b", 5)  # ran out: anyone's
        assert await claims.renew(["job:J"], "a", 5) == set()  # a lost it
        await claims.release(["job:J"], "b")
        assert await claims.take("job:J", "a", 5)
        assert [(o, k) for o, k, _n in await claims.counts()] == [("a", "job")]


async def test_replicas_claiming_at_once_take_different_jobs(pg_url: str) -> None:
    async with Store.connect(pg_url) as store:
        await store.create_jobs(
            [NewJob(f"J{i:02d}", f"n{i}", f"p/J{i}", "inbox") for i in range(12)]
        )
        claims = Claims(store)
        got = await asyncio.gather(*(claims.new_jobs(o, 30, 5) for o in ("a", "b", "c")))
        flat = [j for ids in got for j in ids]
        assert len(flat) == len(set(flat)) == 12  # none twice, none left out
        assert await claims.new_jobs("d", 30, 5) == []  # all leased


async def test_admission_is_decided_once_for_all_replicas(pg_url: str) -> None:
    """Two replicas claiming at once never admit more than the budget allows between
    them: what one is submitting counts as in flight for the other."""
    async with Store.connect(pg_url) as store:
        await store.create_job("J", "n", "p/J", "inbox")
        await store.transition("J", JobState.VALIDATING)
        pieces = [Piece("J", i, f"p{i}", 1, 10, 40, False) for i in range(6)]
        atts = [
            {
                "id": f"A{i}",
                "job_id": "J",
                "piece": i,
                "input_path": f"p{i}",
                "model": "m",
                "requests": 1,
                "est_tokens": 40,
            }
            for i in range(6)
        ]
        await store.validated("J", pieces, atts, {}, endpoint="/v1/chat/completions", model="m")
        claims = Claims(store)
        budget = {"m": 100}  # room for two pieces of 40 tokens

        def decide(pending: list[Pending], flight: dict[str, tuple[int, int]]) -> list[Pending]:
            used = {m: t for m, (t, _) in flight.items()}
            cands = [Candidate(p.id, p.model, p.tokens, p.waiting_since) for p in pending]
            ids = admit(cands, used, budget, time.time())
            return [p for p in pending if p.id in ids]

        now = time.time()
        got = await asyncio.gather(
            *(claims.pending(o, 30, now, 10, decide) for o in ("a", "b", "c"))
        )
        assert sum(len(g) for g in got) == 2
        await store.update_attempt(
            next(g for g in got if g)[0].id,
            batch_id="b1",
            status="in_progress",
        )
        more = await claims.pending("d", 30, now, 10, decide)
        assert more == []  # one live (40) + one being submitted (40): 20 left, no room
