"""A RabbitMQ queue (AMQP 0-9-1, aio-pika), consumed like any other worker.

The message body is the JSONL file (or empty, with a `path` header); `name` and
`metadata` are headers; its `message_id` (set by the producer) is what a redelivery is
recognised by; without one, a hash of the headers and body stands in (so identical
messages count as one). A missing queue is declared durable; a missing results or
dead-letter exchange is declared (topic, durable) with a durable queue of the same
name bound to it, so what is published waits for a reader. Deliveries are acked only
after the job is recorded; unacked ones go back to the queue when the connection ends.
Outcomes are published with publisher confirms, persistent, message_id = the job id,
routing key = the job's state.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError, ChannelNotFoundEntity
from yarl import URL

from batchd.config import SourceConfig
from batchd.sources.base import Broker, Message, Unavailable

_CONNECT_TIMEOUT = 10.0
_HEADERS = ("name", "path", "metadata")


def _bytes(v: Any) -> bytes:
    if isinstance(v, bytes):
        return v
    if isinstance(v, str):
        return v.encode()
    if isinstance(v, dict | list):
        return orjson.dumps(v, default=str)
    return str(v).encode()


def to_message(m: AbstractIncomingMessage) -> Message:
    """A delivery as a source Message (`jsonl` is the body when there is one)."""
    headers = dict(m.headers or {})
    fields = {k: _bytes(headers[k]) for k in _HEADERS if headers.get(k) is not None}
    if m.body:
        fields["jsonl"] = m.body
    msg_id = m.message_id
    if not msg_id:
        h = hashlib.sha256()
        for k in sorted(fields):
            h.update(k.encode() + b"\0" + fields[k] + b"\0")
        msg_id = f"sha256:{h.hexdigest()}"
    return Message(msg_id, fields, redelivered=bool(m.redelivered), token=m)


class AmqpQueue(Broker):
    """`kind = "amqp"`."""

    def __init__(self, cfg: SourceConfig) -> None:
        self.cfg = cfg
        self._conn: AbstractRobustConnection | None = None
        self._ch: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._results: AbstractExchange | None = None
        self._dead: AbstractExchange | None = None
        self._buffer: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._tag: str | None = None
        self._password = cfg.password()

    def _url(self) -> str:
        if self._password is None:
            return self.cfg.url
        return str(URL(self.cfg.url).with_password(self._password))

    @contextlib.asynccontextmanager
    async def _errors(self) -> AsyncIterator[None]:
        try:
            yield
        except (AMQPError, ChannelInvalidStateError, OSError, TimeoutError) as e:
            text = f"{type(e).__name__}: {e}"
            for secret in (self._password, URL(self.cfg.url).password):
                if secret:
                    text = text.replace(secret, "***")
            raise Unavailable(text) from None

    async def _open(self) -> AbstractChannel:
        if self._conn is None or self._conn.is_closed:
            # connect, not connect_robust: reconnecting is the stage's (it must know, to
            # report the outage and read again what was not acknowledged).
            self._conn = await aio_pika.connect(self._url(), timeout=_CONNECT_TIMEOUT)  # type: ignore[assignment]
        assert self._conn is not None
        return await self._conn.channel(publisher_confirms=True)

    async def _exists(self, kind: str, name: str) -> bool:
        """A passive declare, on a channel of its own (a miss closes that channel)."""
        ch = await self._open()
        try:
            if kind == "queue":
                await ch.declare_queue(name, passive=True)
            else:
                await ch.get_exchange(name, ensure=True)
            return True
        except ChannelNotFoundEntity:
            return False
        finally:
            if not ch.is_closed:
                await ch.close()

    async def _outlet(self, ch: AbstractChannel, name: str) -> AbstractExchange:
        """The exchange `name`; when missing, declared with a queue of its name bound."""
        if await self._exists("exchange", name):
            return await ch.get_exchange(name, ensure=False)
        ex = await ch.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)
        q = await ch.declare_queue(name, durable=True)
        await q.bind(ex, routing_key="#")
        return ex

    async def connect(self) -> None:
        """Connect; declare what is missing (the queue durable); set the prefetch."""
        c = self.cfg
        async with self._errors():
            ch = self._ch = await self._open()
            await ch.set_qos(prefetch_count=c.prefetch)
            if await self._exists("queue", c.queue):
                self._queue = await ch.get_queue(c.queue, ensure=False)
            else:
                self._queue = await ch.declare_queue(c.queue, durable=True)
            self._results = await self._outlet(ch, c.results)
            self._dead = await self._outlet(ch, c.dead_letter_name)
        self._buffer = asyncio.Queue()
        self._tag = None

    async def close(self) -> None:
        """Close the connection; unacknowledged deliveries return to the queue."""
        conn, self._conn, self._ch, self._tag = self._conn, None, None, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    async def _on_message(self, m: AbstractIncomingMessage) -> None:
        self._buffer.put_nowait(m)

    async def fetch(self, limit: int, wait: float) -> list[Message]:
        """Deliveries so far (at most `prefetch` are unacked at once), waiting up to `wait`."""
        ch, queue = self._ch, self._queue
        if ch is None or queue is None or ch.is_closed:
            raise Unavailable("the channel is closed")
        async with self._errors():
            if self._tag is None:
                self._tag = await queue.consume(self._on_message, no_ack=False)
        if self._buffer.empty():
            getter = asyncio.ensure_future(self._buffer.get())
            closed = asyncio.ensure_future(ch.closed())
            try:
                await asyncio.wait({getter, closed}, timeout=wait, return_when="FIRST_COMPLETED")
            finally:
                closed.cancel()
                if not getter.done():
                    getter.cancel()
            if getter.done() and not getter.cancelled():
                self._buffer.put_nowait(getter.result())
            elif ch.is_closed:
                raise Unavailable("the channel was closed by the broker or the connection lost")
        out: list[Message] = []
        while len(out) < limit and not self._buffer.empty():
            out.append(to_message(self._buffer.get_nowait()))
        return out

    async def pause(self) -> None:
        """Cancel the consumer; deliveries not taken yet go back to the queue."""
        queue, tag, self._tag = self._queue, self._tag, None
        async with self._errors():
            if queue is not None and tag is not None:
                await queue.cancel(tag)
            while not self._buffer.empty():
                await self._buffer.get_nowait().nack(requeue=True)

    async def ack(self, msgs: list[Message]) -> None:
        """basic.ack each delivery."""
        async with self._errors():
            for m in msgs:
                await m.token.ack()

    async def dead_letter(self, msg: Message, report: Mapping[str, Any]) -> None:
        """Publish the delivery's body and headers, with its id and why, to the dead-letter
        exchange (routing key: the source's name)."""
        m: AbstractIncomingMessage = msg.token
        headers = {
            **dict(m.headers or {}),
            "source_message_id": msg.id,
            "error": orjson.dumps(dict(report)).decode(),
        }
        out = aio_pika.Message(
            m.body,
            headers=headers,
            content_type=m.content_type,
            message_id=msg.id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        assert self._dead is not None
        async with self._errors():
            await self._dead.publish(out, routing_key=self.cfg.name)

    async def publish(self, job_id: str, state: str, body: Mapping[str, Any]) -> None:
        """Publish the outcome (JSON), confirmed by the broker, routing key = the state."""
        out = aio_pika.Message(
            orjson.dumps(dict(body)),
            content_type="application/json",
            message_id=job_id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers={
                "job_id": job_id,
                "state": state,
                "source_message_id": str(body.get("source_message_id") or ""),
            },
        )
        if self._results is None:
            raise Unavailable("not connected")
        async with self._errors():
            await self._results.publish(out, routing_key=state)

    async def probe(self) -> str:
        """Connect and look at the queue passively (declares nothing)."""
        c = self.cfg
        async with self._errors():
            ch = await self._open()
            try:
                q = await ch.declare_queue(c.queue, passive=True)
            except ChannelNotFoundEntity:
                return (
                    f"reachable; queue {c.queue!r} does not exist yet (declared at the first run)"
                )
            res = q.declaration_result
            return (
                f"reachable; queue {c.queue!r}: {res.message_count} ready, "
                f"{res.consumer_count} consumer(s)"
            )
