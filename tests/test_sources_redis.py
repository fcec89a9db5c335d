"""Redis Streams source: a real redis-server, the emulator, the real daemon.

Messages in -> done/ -> outcome messages out; a SIGKILL between the record and the
XACK (redelivered, recognised: no second job, no second batch); a broker restart
mid-run; an invalid message dead-lettered; two daemons in one consumer group sharing
the work with no job done twice; back-pressure; `batchd check`.
"""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from batchd import logs
from batchd.config import Config, load
from batchd.sources.outcome import usd
from batchd.states import JobState
from batchd.store import Store
from tests.brokers import RedisServer, free_port, unique
from tests.conftest import Emulator, chat_lines, config_file, make_config, run_cli, run_once
from tests.procs import daemon, wait_for
from tests.sources_helpers import crash_daemon, db_jobs, metric, redelivered

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
async def r(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_server.url)
    yield client
    await client.aclose()


def source(srv: RedisServer, stream: str, **keys: Any) -> dict[str, Any]:
    return {
        "kind": "redis_stream",
        "url": srv.url,
        "stream": stream,
        "results": f"{stream}:results",
        **keys,
    }


def cfg_for(tmp_path: Path, emu: Emulator, srv: RedisServer, stream: str, **keys: Any) -> Config:
    return make_config(tmp_path, emu.url, sources={"nightly": source(srv, stream, **keys)})


def toml_for(srv: RedisServer, stream: str, extra: str = "") -> str:
    """The source's section (and the duplicate check off: tests send the same lines)."""
    return (
        '[intake]\nduplicate_window = "0"\n'
        f'[sources.nightly]\nkind = "redis_stream"\nurl = "{srv.url}"\n'
        f'stream = "{stream}"\nresults = "{stream}:results"\n{extra}'
    )


async def outcomes(r: aioredis.Redis, stream: str) -> list[dict[str, Any]]:
    """The outcome bodies published on STREAM:results, in order."""
    entries = await r.xrange(f"{stream}:results")
    return [orjson.loads(fields[b"outcome"]) for _id, fields in entries]


async def test_messages_in_done_out_and_outcomes_published(
    tmp_path: Path, emulator: Emulator, redis_server: RedisServer, r: aioredis.Redis
) -> None:
    stream = unique("jobs")
    data = tmp_path / "shared"
    data.mkdir()
    (data / "from-path.jsonl.gz").write_bytes(gzip.compress(chat_lines(3)))
    # Added before batchd ever ran: the group it creates starts at the stream's start.
    first = await r.xadd(
        stream, {"name": "inline", "jsonl": chat_lines(4, fail=[2]), "metadata": '{"team":"a"}'}
    )
    await r.xadd(stream, {"path": str(data / "from-path.jsonl.gz")})
    bad = await r.xadd(stream, {"name": "nothing-in-it"})
    cfg = cfg_for(tmp_path, emulator, redis_server, stream)
    d = await run_once(cfg)
    assert d.exit_code == 1  # a job failed (the invalid message's)

    done = cfg.spool.dir / "done"
    assert sorted(p.name for p in done.iterdir()) == ["from-path", "inline"]
    assert (done / "inline" / "input.jsonl").read_bytes() == chat_lines(4, fail=[2])
    report = orjson.loads((cfg.spool.dir / "failed" / "nothing-in-it" / "report.json").read_bytes())
    assert report["reason"] == "invalid_message" and report["code"] == "missing_content"
    assert report["message_id"] == bad.decode()

    outs = {o["name"]: o for o in await outcomes(r, stream)}
    assert sorted(outs) == ["from-path", "inline", "nothing-in-it"]
    inline = outs["inline"]
    assert inline["state"] == "done" and inline["source_message_id"] == first.decode()
    assert inline["request_counts"] == {"total": 4, "completed": 3, "failed": 1}
    assert inline["usage"]["input_tokens"] > 0 and inline["cost"]["usd"] is not None
    assert inline["paths"]["output"] == str(done / "inline" / "output.jsonl")
    assert outs["nothing-in-it"]["state"] == "failed"
    assert outs["nothing-in-it"]["error"]["code"] == "missing_content"
    # Every message acknowledged; the invalid one copied to the dead-letter stream.
    assert (await r.xpending(stream, "batchd"))["pending"] == 0
    [(_id, dead)] = await r.xrange(f"{stream}:dead")
    assert dead[b"source_message_id"] == bad and b"missing_content" in dead[b"error"]
    async with Store.connect(cfg.state.database) as store:
        jobs = await store.list_jobs()
        assert {j.source for j in jobs} == {"nightly"} and all(j.announced_at for j in jobs)
        meta = await store.job_by_source_msg("nightly", first.decode())
        assert meta is not None and meta.state == JobState.DONE
        # The outcome's cost is the job's recorded charges (what `batchd show` says).
        assert meta.cost_nanos and inline["cost"]["usd"] == usd(meta.cost_nanos)
        assert inline["cost"]["requests"] == 3  # the failed request billed nothing
    assert orjson.loads((done / "inline" / "metadata.json").read_bytes()) == {"team": "a"}


async def test_sigkill_between_record_and_ack_makes_no_second_job(
    tmp_path: Path, emulator: Emulator, redis_server: RedisServer, r: aioredis.Redis
) -> None:
    stream = unique("jobs")
    ids = sorted(
        [
            (await r.xadd(stream, {"name": f"j{i}", "jsonl": chat_lines(3)})).decode()
            for i in range(3)
        ]
    )
    conf = config_file(tmp_path, emulator.url, extra=toml_for(redis_server, stream))
    await crash_daemon("source_ack", conf)
    # Killed with the jobs durably recorded and the messages still pending.
    assert sorted(j["source_msg"] for j in db_jobs(tmp_path / "batchd.db")) == ids
    assert (await r.xpending(stream, "batchd"))["pending"] == 3

    d = await run_once(load(conf))  # the restart (in process: its metrics are at hand)
    assert d.exit_code == 0
    assert redelivered(d) == 3
    jobs = db_jobs(tmp_path / "batchd.db")
    assert sorted(j["source_msg"] for j in jobs) == ids
    assert {j["state"] for j in jobs} == {"done"}
    assert emulator.state.batches_created == 3  # no second batch either
    assert (await r.xpending(stream, "batchd"))["pending"] == 0
    assert sorted(o["name"] for o in await outcomes(r, stream)) == ["j0", "j1", "j2"]


async def test_sigkill_between_publishing_and_marking_publishes_at_most_twice(
    tmp_path: Path, emulator: Emulator, redis_server: RedisServer, r: aioredis.Redis
) -> None:
    stream = unique("jobs")
    await r.xadd(stream, {"name": "once", "jsonl": chat_lines(2)})
    conf = config_file(tmp_path, emulator.url, extra=toml_for(redis_server, stream))
    await crash_daemon("source_announce", conf)
    assert len(await outcomes(r, stream)) == 1  # published; not marked
    # Published again at the restart, then marked (a marked outcome is never published
    # again: test_sources.py, the store's unannounced jobs).
    assert (await run_once(load(conf))).exit_code == 0
    outs = await outcomes(r, stream)
    assert len(outs) == 2 and outs[0] == outs[1]  # the same outcome, the same job id
    [job] = db_jobs(tmp_path / "batchd.db")
    assert job["announced_at"] is not None and outs[0]["job_id"] == job["id"]


async def test_a_dead_consumers_pending_message_is_claimed(
    tmp_path: Path, emulator: Emulator, redis_server: RedisServer, r: aioredis.Redis
) -> None:
    stream = unique("jobs")
    await r.xgroup_create(stream, "batchd", id="0", mkstream=True)
    msg = await r.xadd(stream, {"name": "orphan", "jsonl": chat_lines(2)})
    await r.xreadgroup("batchd", "ghost", {stream: ">"})  # read, never acknowledged
    await asyncio.sleep(0.3)
    cfg = cfg_for(tmp_path, emulator, redis_server, stream, claim_idle_seconds=0.2)
    await run_once(cfg)
    [out] = await outcomes(r, stream)
    assert out["source_message_id"] == msg.decode() and out["state"] == "done"
    assert (await r.xpending(stream, "batchd"))["pending"] == 0


async def _outcome_count(r: aioredis.Redis, stream: str) -> int:
    return int(await r.xlen(f"{stream}:results"))


async def test_broker_restart_mid_run(
    tmp_path: Path, emulator: Emulator, redis_server: RedisServer, r: aioredis.Redis
) -> None:
    stream = unique("jobs")
    conf = config_file(tmp_path, emulator.url, extra=toml_for(redis_server, stream))
    async with daemon(conf) as p:
        await r.xadd(stream, {"name": "before", "jsonl": chat_lines(2)})
        await wait_for(lambda: _outcome_count(r, stream), what="the first outcome")

        async def up() -> float | None:
            return metric((await p.get("/metrics"))[1], "batchd_source_up", source="nightly")

        assert await up() == 1
        redis_server.stop()
        try:
            await wait_for(lambda: _is(up(), 0), what="batchd_source_up 0")
            check = await asyncio.to_thread(run_cli, "check", "-c", str(conf))
            assert check.returncode == 1
            assert any(
                line.startswith("FAIL  source nightly") for line in check.stdout.splitlines()
            ), check.stdout
        finally:
            redis_server.start()
        r = aioredis.from_url(redis_server.url)  # the old connection died with the server
        try:
            await r.xadd(stream, {"name": "after", "jsonl": chat_lines(2)})
            await wait_for(
                lambda: _at_least(_outcome_count(r, stream), 2),
                timeout=60,
                what="the second outcome",
            )
        finally:
            await r.aclose()
        assert await up() == 1
        assert '"source_unavailable"' in p.text() and '"source_connected"' in p.text()
    jobs = db_jobs(tmp_path / "batchd.db")
    assert sorted(j["name"] for j in jobs) == ["after", "before"]
    assert {j["state"] for j in jobs} == {"done"}


async def _is(value: Any, want: float) -> bool:
    return bool(await value == want)


async def _at_least(value: Any, want: int) -> bool:
    return bool(await value >= want)


async def test_two_daemons_in_one_group_share_the_work_without_doing_a_job_twice(
    tmp_path: Path, emulator: Emulator, redis_server: RedisServer, r: aioredis.Redis
) -> None:
    stream = unique("jobs")
    confs = []
    for who in ("a", "b"):
        (tmp_path / who).mkdir()
        confs.append(
            config_file(
                tmp_path / who, emulator.url, extra=toml_for(redis_server, stream, "prefetch = 2\n")
            )
        )
    n = 12
    async with daemon(confs[0]), daemon(confs[1]):
        await asyncio.sleep(0.5)  # both are reading
        ids = []
        for i in range(n):
            ids.append((await r.xadd(stream, {"name": f"job{i}", "jsonl": chat_lines(2)})).decode())
            await asyncio.sleep(0.02)
        await wait_for(
            lambda: _at_least(_outcome_count(r, stream), n), timeout=90, what="every outcome"
        )
    a, b = (db_jobs(tmp_path / who / "batchd.db") for who in ("a", "b"))
    assert a and b, "both daemons took some of the work"
    assert sorted(j["source_msg"] for j in a + b) == sorted(ids)  # each message exactly once
    assert {j["state"] for j in a + b} == {"done"}
    assert emulator.state.batches_created == n
    assert sorted(o["source_message_id"] for o in await outcomes(r, stream)) == sorted(ids)


async def test_back_pressure_keeps_live_jobs_at_max_pending(
    tmp_path: Path, emulator: Emulator, redis_server: RedisServer, r: aioredis.Redis
) -> None:
    stream = unique("jobs")
    for i in range(6):
        await r.xadd(stream, {"name": f"job{i}", "jsonl": chat_lines(2)})
    extra = toml_for(redis_server, stream, "max_pending_jobs = 2\n")
    conf = config_file(tmp_path, emulator.url, extra=extra)
    most = 0
    async with daemon(conf) as p:
        while await _outcome_count(r, stream) < 6:
            live = [j for j in db_jobs(tmp_path / "batchd.db") if j["finished_at"] is None]
            most = max(most, len(live))
            await asyncio.sleep(0.01)
        assert '"source_paused"' in p.text()
    assert 1 <= most <= 2
    assert len(db_jobs(tmp_path / "batchd.db")) == 6


async def test_check_says_reachable_and_creates_nothing(
    tmp_path: Path, emulator: Emulator, redis_server: RedisServer, r: aioredis.Redis
) -> None:
    stream = unique("jobs")
    conf = config_file(tmp_path, emulator.url, extra=toml_for(redis_server, stream))
    proc = await asyncio.to_thread(run_cli, "check", "-c", str(conf))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [line] = [ln for ln in proc.stdout.splitlines() if "source nightly" in ln]
    assert line.startswith("ok") and "does not exist yet" in line, line
    assert not await r.exists(stream)  # nothing created
    await r.xgroup_create(stream, "batchd", id="0", mkstream=True)
    await r.xadd(stream, {"name": "x", "jsonl": chat_lines(1)})
    proc = await asyncio.to_thread(run_cli, "check", "-c", str(conf))
    assert "group 'batchd': 0 pending, 1 not yet read" in proc.stdout, proc.stdout


async def test_an_unreachable_broker_is_given_up_by_run_once_and_no_password_shows(
    tmp_path: Path, emulator: Emulator, capfd: pytest.CaptureFixture[str]
) -> None:
    secret = "hunter2-SECRET"
    url = f"redis://:{secret}@127.0.0.1:{free_port()}/0"  # nothing listens there
    extra = (
        f'[sources.nightly]\nkind = "redis_stream"\nurl = "{url}"\nstream = "s"\nresults = "r"\n'
    )
    conf = config_file(tmp_path, emulator.url, extra=extra)
    check = await asyncio.to_thread(run_cli, "check", "-c", str(conf))
    assert check.returncode == 1
    [line] = [ln for ln in check.stdout.splitlines() if "source nightly" in ln]
    assert line.startswith("FAIL") and ":***@" in line, line
    logs.setup("info", "json")  # every line the daemon writes, not only warnings
    assert (await run_once(load(conf))).exit_code == 1
    run = capfd.readouterr()
    assert '"source_given_up"' in run.err and '"source_unavailable"' in run.err, run.err
    for text in (check.stdout, check.stderr, run.out, run.err):
        assert secret not in text
