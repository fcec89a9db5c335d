"""Several replicas on one PostgreSQL store and one shared spool."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from batchd import logs
from batchd.admission import Candidate, admit
from batchd.api import ATTEMPT_KEY
from batchd.leases import Leases
from batchd.metrics import Metrics
from batchd.providers import Providers
from batchd.spool import Spool
from batchd.stages import Context
from batchd.stages.submit import Submit
from batchd.stages.track import budget
from batchd.states import JobState
from batchd.store import NewJob, Pending, Piece, Store
from batchd.store.claims import Claims
from tests.conftest import API_KEY, Emulator, chat_lines, drop, make_config, read_jsonl, run_once
from tests.test_crash import (
    FAULT_RATE,
    check_results,
    drop_job,
    free_port,
    make_jobs,
    poll_until_ok,
    remote_batches,
    stop,
)
from tests.test_crash import KEY_ENV as CRASH_KEY_ENV
from tests.test_crash import Job as CrashJob


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
        # Cost on PostgreSQL: estimated at intake, admitted, charged once per attempt.
        split = next(j for j in await store.list_jobs() if j.name == "split")
        info = orjson.loads((done / "split" / "job.json").read_bytes())
        assert split.admitted_at is not None and split.estimate
        assert info["cost"]["nanousd"] == split.cost_nanos > 0
        charged = [c for c in await store.charges_since(0.0) if c["cost_nanos"]]
        # small: one batch of 3; split: three batches (4+4+2), 9 billed (one request failed)
        assert len(charged) == 4 and sum(c["requests"] for c in charged) == 3 + 9
        assert sum(c["cost_nanos"] for c in charged) == info["cost"]["nanousd"] + (
            next(j for j in await store.list_jobs() if j.name == "small").cost_nanos
        )


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
        assert await Claims(store).pending("x", 30, time.time(), 10, lambda p, f: p) == []
        await store.admit_job("J", None)  # budget admission first (no [budget] limit)
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
        seen: list[dict[str, tuple[int, int]]] = []

        def look(pending: list[Pending], flight: dict[str, tuple[int, int]]) -> list[Pending]:
            seen.append(flight)
            return []

        await claims.pending("e", 30, now, 10, look)
        assert seen == [{"m": (80, 2)}]  # tokens and requests: request limits decide on both


async def test_money_budgets_are_admitted_by_one_replica_at_a_time(
    pg_url: str, tmp_path: Path
) -> None:
    """Two replicas deciding budgets at once never admit more than the budget holds:
    one holds the `budget` role and admits; the other leaves it (without the role each
    would spend what it thinks is left)."""
    cfg = make_config(tmp_path, "http://127.0.0.1:9/v1", budget={"daily_usd": 0.0065})
    stages: list[Submit] = []
    async with (
        Store.connect(pg_url) as store,
        Store.connect(pg_url) as other,
        Providers.build(cfg, Metrics()) as providers,
    ):
        for name in ("one", "two", "three"):  # $0.0030 each: two fit
            job = await store.create_job(name, name, f"processing/{name}.jsonl", "inbox")
            await store.transition(job.id, JobState.VALIDATING)
            high = 3_000_000  # nano-dollars
            est = {"cost_high_nanousd": high, "cost_low_nanousd": high // 2}
            await store.validated(job.id, [], [], {}, model="gpt-4o-mini", estimate=est)
        for s in (store, other):
            leases = Leases.for_store(s, cfg.replicas, logs.get(), Metrics())
            ctx = Context(cfg, s, Spool(cfg.spool.dir), providers, Metrics(), logs.get())
            ctx.leases = leases
            stages.append(Submit(ctx))
        for _ in range(3):
            await asyncio.gather(*(st._budget() for st in stages))
        admitted = [j for j in await store.list_jobs() if j.admitted_at is not None]
        assert len(admitted) == 2
        roles = [st.ctx.leases.has_role("budget") for st in stages]
        assert sorted(roles) == [False, True]
        for st in stages:
            await st.ctx.leases.close()


# --- three replicas, SIGKILLed at random, one PostgreSQL, one emulator with faults --------

SOAK = os.environ.get("BATCHD_SOAK") == "1"
SEED = int(os.environ.get("BATCHD_CRASH_SEED", "20240611"))
POLL = 0.5  # [batch] poll_interval_seconds of the replicas: the interval calls are counted in
TOKEN = "replica-queue-token"


@dataclass(frozen=True)
class Scale:
    files: int  # dropped into the shared inbox or POSTed to a replica's HTTP queue
    ticks: int  # rounds of submitting, then SIGKILLing a random replica (every other round)
    finish_timeout: float  # seconds for every file to end once the kills stop


CI_SCALE = Scale(files=20, ticks=6, finish_timeout=150)
SOAK_SCALE = Scale(files=200, ticks=60, finish_timeout=600)


def replica_config(path: Path, work: Path, url: str, emu_port: int, port: int) -> None:
    """One replica's config: the same store, spool and API; its own HTTP port."""
    path.write_text(
        f"""
[api]
base_url = "http://127.0.0.1:{emu_port}/v1"
api_key_env = "{CRASH_KEY_ENV}"
max_retries = 3
request_timeout_seconds = 5
[spool]
dir = "{work / "spool"}"
[state]
database = "{url}"
[batch]
poll_interval_seconds = {POLL}
[http]
listen = "127.0.0.1:{port}"
token_file = "{work / "token"}"
[limits]
max_requests_per_batch = 10
[replicas]
lease_seconds = 6
role_lease_seconds = 3
adopt_after_seconds = 5
[log]
level = "info"
format = "json"
""",
        encoding="utf-8",
    )


@dataclass
class Replica:
    """One replica's config and port, and the process now running it."""

    n: int
    config: Path
    port: int
    logs: Path
    proc: asyncio.subprocess.Process | None = None
    starts: int = 0

    async def start(self, env: dict[str, str]) -> None:
        self.starts += 1
        log = self.logs / f"replica-{self.n}-{self.starts:03d}.log"
        with log.open("wb") as out:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "batchd",
                "run",
                f"--config={self.config}",
                stdout=out,
                stderr=out,
                env=env,
            )


async def jobs_gauge(http: aiohttp.ClientSession, r: Replica) -> float:
    """The sum of batchd_jobs{state} a replica reports (-1 while it is not listening yet)."""
    try:
        async with http.get(f"http://127.0.0.1:{r.port}/metrics") as resp:
            text = await resp.text()
    except aiohttp.ClientConnectionError:
        return -1.0
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("batchd_jobs{")
    )


async def post_job(
    http: aiohttp.ClientSession, replicas: list[Replica], job: CrashJob, rng: random.Random
) -> int:
    """POST a file to the HTTP queue of a replica that answers (a killed one is being
    restarted); returns the replica that took it."""
    for _ in range(400):
        r = rng.choice(replicas)
        url = f"http://127.0.0.1:{r.port}/v1/jobs?name={job.name}"
        try:
            async with http.post(
                url,
                data=job.data,
                headers={"Authorization": f"Bearer {TOKEN}"},
                timeout=aiohttp.ClientTimeout(total=10),
            ) as resp:
                if resp.status == 202:
                    return r.n
                body = await resp.text()
                raise AssertionError(f"POST to replica {r.n}: {resp.status} {body}")
        except (aiohttp.ClientConnectionError, TimeoutError):
            await asyncio.sleep(0.05)
    raise AssertionError(f"no replica took {job.name}")


def max_per_window(times: list[float], span: float) -> int:
    """The most calls in any window of `span` seconds."""
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= span:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


async def tracker_of(url: str) -> str | None:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(
            "SELECT owner FROM leases WHERE key = 'role:tracker' AND expires_at >= batchd_now()"
        )
    finally:
        await conn.close()


@dataclass
class ReplicaSoak:
    """What a replica soak did and saw."""

    jobs: list[CrashJob]
    via_http: dict[str, int] = field(default_factory=dict)  # name -> replica that took it
    kills: int = 0
    tracker_kills: int = 0  # kills of the replica that held the tracker role
    submitted_in: float = 0.0  # seconds to submit every file (kills meanwhile)
    finished_in: float = 0.0  # seconds more until every file had ended
    stats: dict[str, Any] = field(default_factory=dict)
    polls: list[list[Any]] = field(default_factory=list)
    batches: list[dict[str, Any]] = field(default_factory=list)


async def _submit_and_kill(
    http: aiohttp.ClientSession,
    soak: ReplicaSoak,
    replicas: list[Replica],
    scale: Scale,
    rng: random.Random,
    spool: Path,
    url: str,
    env: dict[str, str],
) -> None:
    """Each tick: this tick's files (half dropped, half POSTed), a pause, and every other
    tick a SIGKILL to a random replica, restarted at once."""
    ticks: dict[int, list[CrashJob]] = {}
    for i, job in enumerate(soak.jobs):
        ticks.setdefault(i * scale.ticks // len(soak.jobs), []).append(job)
    for tick in range(scale.ticks):
        for i, job in enumerate(ticks.get(tick, [])):
            if i % 2:  # every replica's HTTP queue ...
                soak.via_http[job.name] = await post_job(http, replicas, job, rng)
            else:  # ... and the shared drop folder
                drop_job(spool, job)
        await asyncio.sleep(rng.uniform(0.5, 2.0))
        if tick % 2 == 1:
            victim = rng.choice(replicas)
            assert victim.proc is not None
            if victim.proc.returncode is not None:
                raise AssertionError(f"replica {victim.n} exited by itself")
            owner = await tracker_of(url)
            soak.tracker_kills += owner is not None and f":{victim.proc.pid}:" in owner
            await stop(victim.proc)  # SIGKILL
            soak.kills += 1
            await victim.start(env)


async def _until_ended(spool: Path, jobs: list[CrashJob], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    expected = {j.name for j in jobs}
    while True:
        ended = {p.name for d in ("done", "failed") for p in (spool / d).iterdir()}
        if expected <= ended:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"not ended after {timeout}s: {sorted(expected - ended)[:20]}")
        await asyncio.sleep(0.5)


async def run_replica_soak(tmp_path: Path, url: str, scale: Scale) -> ReplicaSoak:
    """The emulator (faults on) and three replicas up; files submitted while replicas are
    SIGKILLed and restarted; then every file must end."""
    rng = random.Random(SEED)
    soak = ReplicaSoak(make_jobs(rng, scale.files))
    logs = tmp_path / "logs"
    logs.mkdir()
    (tmp_path / "token").write_text(TOKEN)
    spool = tmp_path / "spool"
    env = {**os.environ, CRASH_KEY_ENV: API_KEY, "TMPDIR": str(tmp_path)}
    env.pop("OPENAI_BASE_URL", None)
    emu_port = free_port()
    emu_url = f"http://127.0.0.1:{emu_port}"
    knobs = ("rate-limit", "server-error", "drop", "slow", "ghost-create", "truncate")
    emu_args = [
        f"--port={emu_port}",
        "--time-scale=0.01",
        f"--api-key={API_KEY}",
        *(f"--fault-{knob}={FAULT_RATE}" for knob in knobs),
        "--fault-slow-seconds=0.05",
        f"--fault-seed={SEED}",
        "--fault-force-first",
    ]
    replicas = []
    for n in range(3):
        r = Replica(n, tmp_path / f"replica-{n}.toml", free_port(), logs)
        replica_config(r.config, tmp_path, url, emu_port, r.port)
        replicas.append(r)
    emulator = None
    with (logs / "emulator.log").open("wb") as emu_log:
        try:
            emulator = await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "batchd", "emulator", *emu_args),
                stdout=emu_log,
                stderr=emu_log,
                env=env,
            )
            async with aiohttp.ClientSession() as http:
                assert await poll_until_ok(http, f"{emu_url}/_emulator/stats", emulator)
                for r in replicas:
                    await r.start(env)
                t0 = time.monotonic()
                await _submit_and_kill(http, soak, replicas, scale, rng, spool, url, env)
                soak.submitted_in = time.monotonic() - t0
                await _until_ended(spool, soak.jobs, scale.finish_timeout)
                soak.finished_in = time.monotonic() - t0 - soak.submitted_in
                soak.stats = await (await http.get(f"{emu_url}/_emulator/stats")).json()
                polls = await (await http.get(f"{emu_url}/_emulator/polls")).json()
                soak.polls = polls["polls"]
            soak.batches = await remote_batches(f"{emu_url}/v1")
        finally:
            for r in replicas:
                if r.proc is not None:
                    await stop(r.proc, signal.SIGTERM)
            if emulator is not None:
                await stop(emulator, signal.SIGINT)
    return soak


@pytest.mark.parametrize(
    "scale",
    [
        pytest.param(CI_SCALE, id="ci", marks=[pytest.mark.timeout(400)]),
        pytest.param(
            SOAK_SCALE,
            id="soak",
            marks=[
                pytest.mark.slow,
                pytest.mark.timeout(1800),
                pytest.mark.skipif(not SOAK, reason="set BATCHD_SOAK=1 for the soak"),
            ],
        ),
    ],
)
async def test_three_replicas_sigkilled_lose_nothing_and_submit_nothing_twice(
    tmp_path: Path, pg_url: str, scale: Scale
) -> None:
    """Every file ends in done/ or failed/ (with a reason), byte for byte, each request
    answered once; one batch per attempt (the emulator's count); the tracker's status
    calls per interval within one daemon's ceiling."""
    soak = await run_replica_soak(tmp_path, pg_url, scale)
    jobs, batches, stats = soak.jobs, soak.batches, soak.stats
    problems: list[str] = []
    lost_files, bad_requests = check_results(tmp_path / "spool", jobs, problems)
    conn = await asyncpg.connect(pg_url)
    try:
        states = Counter(r[0] for r in await conn.fetch("SELECT state FROM jobs"))
        rows = await conn.fetch("SELECT id, batch_id FROM attempts WHERE batch_id IS NOT NULL")
        attempts = {r[0]: r[1] for r in rows}
        unsent = await conn.fetchval(
            "SELECT COUNT(*) FROM attempts WHERE batch_id IS NULL AND abandoned = 0"
        )
    finally:
        await conn.close()
    per_attempt = Counter((b.get("metadata") or {}).get(ATTEMPT_KEY) for b in batches)
    duplicates = sum(n - 1 for a, n in per_attempt.items() if a is not None)
    invalid = sum(j.invalid for j in jobs)
    if states != {"done": len(jobs) - invalid, "failed": invalid}:
        problems.append(f"job states {dict(states)}")
    if unsent:
        problems.append(f"{unsent} attempt(s) neither sent nor abandoned")
    if duplicates:
        problems.append(f"attempts with more than one batch: {per_attempt.most_common(3)}")
    if not len(batches) == stats["batches_created"] == len(attempts):
        problems.append(
            f"{len(batches)} batches listed, {stats['batches_created']} created, "
            f"{len(attempts)} attempts with a batch"
        )
    elif {b["metadata"].get(ATTEMPT_KEY): b["id"] for b in batches} != attempts:
        problems.append("the emulator's batches are not the attempts' batches")
    # One tracker at a time: status calls per interval within one daemon's ceiling.
    tracked = [t for t, agent in soak.polls if "tracker" in agent]
    worst = max_per_window(tracked, POLL)
    ceiling = budget(len(batches))
    if worst > ceiling:
        problems.append(
            f"{worst} tracker status calls in one {POLL}s interval (one daemon: at most {ceiling})"
        )
    print(
        f"\nreplica soak: seed={SEED} files={len(jobs)} (http={len(soak.via_http)}, by "
        f"replica {dict(Counter(soak.via_http.values()))}) kills={soak.kills} "
        f"(tracker={soak.tracker_kills}) submitted_in={soak.submitted_in:.1f}s "
        f"finished_in={soak.finished_in:.1f}s batches={len(batches)} duplicates={duplicates} "
        f"lost={lost_files} bad_requests={bad_requests} tracker_calls={len(tracked)} "
        f"max_per_interval={worst} ceiling={ceiling} faults={stats.get('fault_counts')}"
    )
    assert not problems, "\n".join(problems)


async def test_the_tracker_role_is_taken_over_when_its_holder_dies(
    tmp_path: Path, pg_url: str, emulator: Emulator
) -> None:
    """Two replicas: one tracks. SIGKILL it: the other tracks within about
    [replicas] role_lease_seconds (the default, 5 s); the figure is printed."""
    (tmp_path / "token").write_text(TOKEN)
    env = {**os.environ, CRASH_KEY_ENV: API_KEY}
    replicas = []
    for n in range(2):
        r = Replica(n, tmp_path / f"replica-{n}.toml", free_port(), tmp_path)
        replica_config(r.config, tmp_path, pg_url, emulator.port, r.port)
        text = r.config.read_text().replace("role_lease_seconds = 3\n", "")
        r.config.write_text(text)
        await r.start(env)
        replicas.append(r)
    try:
        deadline = time.monotonic() + 30
        while (owner := await tracker_of(pg_url)) is None:
            assert time.monotonic() < deadline, "no replica took the tracker role"
            await asyncio.sleep(0.05)
        holder = next(r for r in replicas if r.proc and f":{r.proc.pid}:" in owner)
        assert holder.proc is not None
        # The group's gauges (jobs by state, ...) come from the tracker alone: summed
        # over the replicas, as the dashboard does, a job counts once.
        async with aiohttp.ClientSession() as http:
            job = CrashJob("gauged", chat_lines(2))
            await post_job(http, replicas, job, random.Random(1))
            deadline = time.monotonic() + 30
            while (seen := [await jobs_gauge(http, r) for r in replicas]) != [
                1.0 if r is holder else 0.0 for r in replicas
            ]:
                assert time.monotonic() < deadline, f"jobs gauges {seen}"
                await asyncio.sleep(0.1)
        await stop(holder.proc)  # SIGKILL
        killed = time.monotonic()
        while (now := await tracker_of(pg_url)) in (None, owner):
            assert time.monotonic() - killed < 30, "the tracker role was not taken over"
            await asyncio.sleep(0.05)
        print(f"\ntracker takeover after SIGKILL: {time.monotonic() - killed:.2f}s ({now})")
    finally:
        for r in replicas:
            if r.proc is not None:
                await stop(r.proc, signal.SIGTERM)
