"""Queue sources: messages per second for small jobs (Redis stream, RabbitMQ queue).

    python -m bench.sources [--smoke] [--messages N] [--kinds redis,amqp]

N messages, each a 3-line chat job, wait in the stream / queue before the daemon
starts (emulator at time_scale 0.01, tracking every 0.2 s). Timed on the daemon's own
log clock, from its source connecting to (1) the last message recorded (then
acknowledged) and (2) the last outcome published (after done/NAME/). Baseline (redis):
the script teams run today instead, in front of the same daemon: XREADGROUP, write
each message into inbox/ (temp name, fsync, rename), XACK; its end is the last job
claimed, then the last job in done/ (it publishes no outcome). --smoke: redis only,
N = 10, no baseline: checks the bench runs (timings not meaningful; RabbitMQ's start
alone takes ~15 s). Target: >= 100 messages/s recorded and acknowledged.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from datetime import datetime
from pathlib import Path

import orjson

from bench.common import Daemon, Emulator, Row, fmt_ratio, parser, print_table, small_chat, workdir
from tests.brokers import RabbitServer, RedisServer

TARGET = 100.0  # messages/s recorded and acknowledged
SOURCE = "bench"
POLL = {"poll_interval_seconds": 0.2}


def _ts(line: dict[str, object]) -> float:
    return datetime.fromisoformat(str(line["timestamp"]).replace("Z", "+00:00")).timestamp()


def log_times(log: Path, event: str) -> list[float]:
    """Unix times of every `event` in a daemon's JSON log."""
    out = []
    for raw in log.read_bytes().splitlines():
        if raw.startswith(b"{") and f'"{event}"'.encode() in raw:
            line = orjson.loads(raw)
            if line.get("event") == event:
                out.append(_ts(line))
    return out


def wait(pred: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached in {timeout} s")
        time.sleep(0.05)


def source_toml(kind: str, url: str, where: str) -> str:
    key = "stream" if kind == "redis_stream" else "queue"
    return (
        f'[sources.{SOURCE}]\nkind = "{kind}"\nurl = "{url}"\n{key} = "{where}"\n'
        f'results = "{where}.results"\nmax_pending_jobs = 100000\n'
    )


def jobs(n: int) -> list[tuple[str, bytes]]:
    return [(f"job{i}", small_chat(3, tag=str(i))) for i in range(n)]


# --- redis ---------------------------------------------------------------------------------


def redis_side(tmp: Path, emu: Emulator, n: int) -> tuple[float, float, float]:
    """(recorded+acked, in done/, outcomes published) per s of the redis_stream source."""
    import redis

    srv = RedisServer(shutil.which("redis-server") or "redis-server", tmp / "redis-a")
    srv.dir.mkdir()
    srv.start()
    try:
        r = redis.Redis.from_url(srv.url)
        with r.pipeline(transaction=False) as p:
            for name, data in jobs(n):
                p.xadd("jobs", {"name": name, "jsonl": data})
            p.execute()
        with Daemon(
            tmp / "redis-d",
            emu.url,
            toml_tail=source_toml("redis_stream", srv.url, "jobs"),
            batch=POLL,
        ) as d:
            wait(lambda: r.xlen("jobs.results") >= n, 600, "every outcome")
            log = d.work / "batchd.log"
        r.close()
    finally:
        srv.stop()
    return _rates(log, n)


def _rates(log: Path, n: int) -> tuple[float, float, float]:
    [start] = log_times(log, "source_connected")[:1] or [0.0]
    ends = [log_times(log, e) for e in ("job_claimed", "job_finished", "outcome_published")]
    assert all(len(t) >= n for t in ends), [len(t) for t in ends]
    rec, done, out = (n / (max(t) - start) for t in ends)
    return rec, done, out


def script_side(tmp: Path, emu: Emulator, n: int) -> tuple[float, float]:
    """The baseline: a script turning messages into files in inbox/, then XACK."""
    import redis

    srv = RedisServer(shutil.which("redis-server") or "redis-server", tmp / "redis-b")
    srv.dir.mkdir()
    srv.start()
    try:
        r = redis.Redis.from_url(srv.url)
        with r.pipeline(transaction=False) as p:
            for name, data in jobs(n):
                p.xadd("jobs", {"name": name, "jsonl": data})
            p.execute()
        r.xgroup_create("jobs", "script", id="0")
        with Daemon(tmp / "script-d", emu.url, batch=POLL) as d:
            start = time.time()
            acked = _script(r, d.spool, n)
            done = d.spool / "done"
            wait(lambda: len(os.listdir(done)) >= n, 600, "every job in done/")
            log = d.work / "batchd.log"
        r.close()
    finally:
        srv.stop()
    claimed, finished = log_times(log, "job_claimed"), log_times(log, "job_finished")
    return n / (max(acked, *claimed) - start), n / (max(finished) - start)


def _script(r: object, spool: Path, n: int) -> float:
    """Read, write to inbox/ (fsynced, renamed in), ack; returns the time of the last ack."""
    inbox, seen, last = spool / "inbox", 0, 0.0
    while seen < n:
        resp = r.xreadgroup("script", "s1", {"jobs": ">"}, count=16, block=1000)  # type: ignore[attr-defined]
        for _stream, entries in resp or []:
            for eid, fields in entries:
                name = fields[b"name"].decode()
                tmp = spool / f".{name}.part"
                with tmp.open("wb") as f:
                    f.write(fields[b"jsonl"])
                    f.flush()
                    os.fsync(f.fileno())
                os.rename(tmp, inbox / f"{name}.jsonl")
                r.xack("jobs", "script", eid)  # type: ignore[attr-defined]
                seen += 1
        last = time.time()
    return last


# --- amqp ----------------------------------------------------------------------------------


async def _publish(url: str, n: int) -> None:
    import aio_pika

    conn = await aio_pika.connect(url)
    async with conn:
        ch = await conn.channel()
        await ch.declare_queue("jobs", durable=True)
        for name, data in jobs(n):
            msg = aio_pika.Message(data, headers={"name": name}, message_id=name)
            await ch.default_exchange.publish(msg, routing_key="jobs")


async def _outcomes(url: str) -> int:
    import aio_pika

    conn = await aio_pika.connect(url)
    async with conn:
        ch = await conn.channel()
        try:
            q = await ch.declare_queue("jobs.results", passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return 0
        return int(q.declaration_result.message_count or 0)


def amqp_side(tmp: Path, emu: Emulator, n: int) -> tuple[float, float, float]:
    """(recorded+acked, in done/, outcomes published) per s of the amqp source."""
    srv = RabbitServer(tmp / "rabbit")
    srv.dir.mkdir()
    srv.start()
    try:
        asyncio.run(_publish(srv.url, n))
        toml = source_toml("amqp", srv.url, "jobs")
        with Daemon(tmp / "amqp-d", emu.url, toml_tail=toml, batch=POLL) as d:
            wait(lambda: asyncio.run(_outcomes(srv.url)) >= n, 600, "every outcome")
            log = d.work / "batchd.log"
    finally:
        srv.shutdown()
    return _rates(log, n)


def main() -> int:
    """Run the sides and print the table."""
    p = parser(__doc__)
    p.add_argument("--messages", type=int, help="messages per side (default 2000; smoke 10)")
    p.add_argument("--kinds", default=None, help="redis,amqp (default both; smoke: redis)")
    a = p.parse_args()
    n = a.messages or (10 if a.smoke else 2000)
    kinds = (a.kinds or ("redis" if a.smoke else "redis,amqp")).split(",")
    rows: list[Row] = []
    notes = [
        f"{n} messages of a 3-line chat job each, queued before the daemon starts; "
        "rates from the daemon's log clock (source connected -> last job recorded / "
        "last outcome published); baseline: a script writing each message into inbox/ "
        "(fsync + rename) and acking, in front of the same daemon (ends at done/)"
    ]
    with workdir("sources") as tmp, Emulator(time_scale=0.01) as emu:
        if "redis" in kinds:
            rec, done, out = redis_side(tmp, emu, n)
            # --smoke checks the bench runs: the baseline (a second broker and daemon)
            # only at full size.
            base_rec, base_out = script_side(tmp, emu, n) if not a.smoke else (rec, done)
            rows.append(
                Row(
                    "redis: messages/s recorded + acked",
                    f"{rec:.0f}",
                    f"{base_rec:.0f}",
                    fmt_ratio(rec, base_rec),
                    f">= {TARGET:.0f}/s",
                    rec >= TARGET,
                )
            )
            rows.append(
                Row(
                    "redis: small jobs/s into done/",
                    f"{done:.0f}",
                    f"{base_out:.0f}",
                    fmt_ratio(done, base_out),
                    "-",
                    None,
                )
            )
            e2e = "redis: small jobs/s end to end (outcome out)"
            rows.append(Row(e2e, f"{out:.0f}", "-", "-", "-", None))
        if "amqp" in kinds:
            rec, done, out = amqp_side(tmp, emu, n)
            rows.append(
                Row(
                    "amqp: messages/s recorded + acked",
                    f"{rec:.0f}",
                    "-",
                    "-",
                    f">= {TARGET:.0f}/s",
                    rec >= TARGET,
                )
            )
            rows.append(Row("amqp: small jobs/s into done/", f"{done:.0f}", "-", "-", "-", None))
            e2e = "amqp: small jobs/s end to end (outcome out)"
            rows.append(Row(e2e, f"{out:.0f}", "-", "-", "-", None))
    print_table("Queue sources (bench.sources)", rows, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
