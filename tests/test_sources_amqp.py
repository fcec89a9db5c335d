"""RabbitMQ (AMQP) source: a real rabbitmq-server, aio-pika as the producer, the emulator,
the real daemon.

Messages in -> done/ -> outcome messages out (routed by state, message_id = job id); a
missing queue declared durable; a SIGKILL between the record and the basic.ack
(redelivered, recognised: no second job, no second batch); a broker restart mid-run;
an invalid message dead-lettered; two daemons sharing the queue with no job done twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection

from batchd.config import load
from tests.brokers import RabbitServer, unique
from tests.conftest import Emulator, chat_lines, config_file, make_config, run_cli, run_once
from tests.procs import daemon, wait_for
from tests.sources_helpers import crash_daemon, db_jobs, metric, redelivered

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
async def channel(rabbit_server: RabbitServer) -> AsyncIterator[AbstractChannel]:
    # Not connect_robust: its channels answer a passive declare from a cache.
    conn: AbstractConnection = await aio_pika.connect(rabbit_server.url)
    async with conn:
        yield await conn.channel()


def toml_for(srv: RabbitServer, queue: str, extra: str = "") -> str:
    """The source's section (and the duplicate check off: tests send the same lines)."""
    return (
        '[intake]\nduplicate_window = "0"\n'
        f'[sources.nightly]\nkind = "amqp"\nurl = "{srv.url}"\n'
        f'queue = "{queue}"\nresults = "{queue}.results"\n{extra}'
    )


async def send(
    ch: AbstractChannel, queue: str, body: bytes, msg_id: str | None = None, **headers: Any
) -> None:
    """Publish one persistent message to `queue` through the default exchange."""
    msg = aio_pika.Message(
        body, headers=headers, message_id=msg_id, delivery_mode=aio_pika.DeliveryMode.PERSISTENT
    )
    await ch.default_exchange.publish(msg, routing_key=queue)


async def drain(ch: AbstractChannel, queue: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Every message waiting in `queue` (acknowledged)."""
    q = await ch.declare_queue(queue, passive=True)
    out = []
    while (m := await q.get(fail=False)) is not None:
        await m.ack()
        out.append(m)
    return out


async def count(ch: AbstractChannel, queue: str) -> int:
    """Messages ready in `queue` (0 when it does not exist yet)."""
    try:
        q = await ch.declare_queue(queue, passive=True)
    except aio_pika.exceptions.ChannelNotFoundEntity:
        await ch.reopen()
        return 0
    return int(q.declaration_result.message_count or 0)


async def test_messages_in_done_out_and_outcomes_published(
    tmp_path: Path, emulator: Emulator, rabbit_server: RabbitServer, channel: AbstractChannel
) -> None:
    queue = unique("jobs")
    await channel.declare_queue(queue, durable=True)  # a producer that declares it itself
    (tmp_path / "shared.jsonl").write_bytes(chat_lines(3))
    await send(channel, queue, chat_lines(4, fail=[1]), "m-1", name="inline", metadata='{"a":"b"}')
    await send(channel, queue, b"", path=str(tmp_path / "shared.jsonl"))  # aiormq sets an id
    await send(channel, queue, b"", "m-3", name="empty")  # neither body nor path: invalid
    cfg = make_config(
        tmp_path,
        emulator.url,
        sources={
            "nightly": {
                "kind": "amqp",
                "url": rabbit_server.url,
                "queue": queue,
                "results": f"{queue}.results",
            }
        },
    )
    d = await run_once(cfg)
    assert d.exit_code == 1  # the invalid message's job failed

    done = cfg.spool.dir / "done"
    assert sorted(p.name for p in done.iterdir()) == ["inline", "shared"]
    report = orjson.loads((cfg.spool.dir / "failed" / "empty" / "report.json").read_bytes())
    assert (report["code"], report["message_id"]) == ("missing_content", "m-3")

    outs = await drain(channel, f"{queue}.results")  # batchd declared and bound it
    bodies = {orjson.loads(m.body)["name"]: (m, orjson.loads(m.body)) for m in outs}
    assert sorted(bodies) == ["empty", "inline", "shared"]
    m, inline = bodies["inline"]
    assert m.message_id == inline["job_id"] and m.routing_key == "done"
    assert inline["source_message_id"] == "m-1"
    assert inline["request_counts"] == {"total": 4, "completed": 3, "failed": 1}
    assert bodies["shared"][1]["source_message_id"]
    m, empty = bodies["empty"]
    assert m.routing_key == "failed" and empty["error"]["code"] == "missing_content"
    [dead] = await drain(channel, f"{queue}.dead")
    assert dead.headers["source_message_id"] == "m-3"
    assert await count(channel, queue) == 0  # every message acknowledged


async def test_missing_queue_declared_durable_and_check_creates_nothing(
    tmp_path: Path, emulator: Emulator, rabbit_server: RabbitServer, channel: AbstractChannel
) -> None:
    queue = unique("jobs")
    conf = config_file(tmp_path, emulator.url, extra=toml_for(rabbit_server, queue))
    proc = await asyncio.to_thread(run_cli, "check", "-c", str(conf))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "does not exist yet" in proc.stdout, proc.stdout
    assert await count(channel, queue) == 0
    with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
        await channel.declare_queue(queue, passive=True)  # check declared nothing
    await channel.reopen()
    async with daemon(conf) as p:
        await wait_for(lambda: '"source_connected"' in p.text(), what="connected")
        await channel.declare_queue(queue, durable=True)  # equivalent: it is durable
        await send(channel, queue, chat_lines(2), "m-1", name="late")
        await wait_for(lambda: count(channel, f"{queue}.results"), what="an outcome")
        proc = await asyncio.to_thread(run_cli, "check", "-c", str(conf))
        assert f"queue '{queue}': 0 ready, 1 consumer(s)" in proc.stdout, proc.stdout


async def test_sigkill_between_record_and_ack_makes_no_second_job(
    tmp_path: Path, emulator: Emulator, rabbit_server: RabbitServer, channel: AbstractChannel
) -> None:
    queue = unique("jobs")
    await channel.declare_queue(queue, durable=True)
    for i in range(3):
        await send(channel, queue, chat_lines(2), f"m-{i}", name=f"j{i}")
    conf = config_file(tmp_path, emulator.url, extra=toml_for(rabbit_server, queue))
    await crash_daemon("source_ack", conf)
    assert sorted(j["source_msg"] for j in db_jobs(tmp_path / "batchd.db")) == [
        "m-0",
        "m-1",
        "m-2",
    ]
    d = await run_once(load(conf))  # the restart (in process: its metrics are at hand)
    assert d.exit_code == 0
    assert redelivered(d) == 3
    jobs = db_jobs(tmp_path / "batchd.db")
    assert len(jobs) == 3 and {j["state"] for j in jobs} == {"done"}
    assert emulator.state.batches_created == 3
    assert await count(channel, queue) == 0
    assert len(await drain(channel, f"{queue}.results")) == 3


async def test_broker_restart_mid_run(
    tmp_path: Path, emulator: Emulator, rabbit_server: RabbitServer
) -> None:
    queue = unique("jobs")
    conf = config_file(tmp_path, emulator.url, extra=toml_for(rabbit_server, queue))

    async def publish(name: str) -> None:
        conn = await aio_pika.connect(rabbit_server.url)
        async with conn:
            ch = await conn.channel()
            await ch.declare_queue(queue, durable=True)
            await send(ch, queue, chat_lines(2), name, name=name)

    async def outcomes() -> int:
        conn = await aio_pika.connect(rabbit_server.url)
        async with conn:
            return await count(await conn.channel(), f"{queue}.results")

    async with daemon(conf) as p:

        async def up() -> float | None:
            return metric((await p.get("/metrics"))[1], "batchd_source_up", source="nightly")

        await publish("before")
        await wait_for(outcomes, timeout=60, what="the first outcome")
        assert await up() == 1
        await asyncio.to_thread(rabbit_server.stop_app)  # the broker restarts, its node stays
        try:
            await wait_for(lambda: _is(up(), 0), what="batchd_source_up 0")
        finally:
            await asyncio.to_thread(rabbit_server.start_app)
        await publish("after")
        await wait_for(lambda: _at_least(outcomes(), 2), timeout=90, what="the second outcome")
        assert await up() == 1
    jobs = db_jobs(tmp_path / "batchd.db")
    assert sorted(j["name"] for j in jobs) == ["after", "before"]
    assert {j["state"] for j in jobs} == {"done"}


async def _is(value: Any, want: float) -> bool:
    return bool(await value == want)


async def _at_least(value: Any, want: int) -> bool:
    return bool(await value >= want)


async def test_two_daemons_share_the_queue_without_doing_a_job_twice(
    tmp_path: Path, emulator: Emulator, rabbit_server: RabbitServer, channel: AbstractChannel
) -> None:
    queue = unique("jobs")
    await channel.declare_queue(queue, durable=True)
    confs = []
    for who in ("a", "b"):
        (tmp_path / who).mkdir()
        extra = toml_for(rabbit_server, queue, "prefetch = 1\n")
        confs.append(config_file(tmp_path / who, emulator.url, extra=extra))
    n = 10
    async with daemon(confs[0]) as a, daemon(confs[1]) as b:
        for p in (a, b):
            await wait_for(lambda p=p: '"source_connected"' in p.text(), what="connected")
        for i in range(n):
            await send(channel, queue, chat_lines(2), f"m-{i}", name=f"job{i}")
        await wait_for(
            lambda: _at_least(count(channel, f"{queue}.results"), n), timeout=90, what="outcomes"
        )
    ja, jb = (db_jobs(tmp_path / who / "batchd.db") for who in ("a", "b"))
    assert ja and jb, "both daemons took some of the work"
    assert sorted(j["source_msg"] for j in ja + jb) == sorted(f"m-{i}" for i in range(n))
    assert emulator.state.batches_created == n


async def test_a_refused_login_fails_check_without_showing_the_password(
    tmp_path: Path, emulator: Emulator, rabbit_server: RabbitServer
) -> None:
    (tmp_path / "pw").write_text("wrong-SECRET\n")
    extra = (
        f'[sources.nightly]\nkind = "amqp"\nurl = "amqp://guest@127.0.0.1:{rabbit_server.port}/"\n'
        'queue = "q"\nresults = "r"\npassword_file = "pw"\n'
    )
    conf = config_file(tmp_path, emulator.url, extra=extra)
    check = await asyncio.to_thread(run_cli, "check", "-c", str(conf))
    assert check.returncode == 1
    [line] = [ln for ln in check.stdout.splitlines() if "source nightly" in ln]
    assert line.startswith("FAIL"), line
    assert "wrong-SECRET" not in check.stdout + check.stderr
