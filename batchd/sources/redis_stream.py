"""A Redis stream read through a consumer group (redis-py's asyncio client).

Each daemon is one consumer of the group (`[sources.X] consumer`, by default its host
and spool), so after a restart it first reads its own pending entries (`XREADGROUP …
0`: what it read but had not acknowledged), then entries another consumer left pending
for `claim_idle_seconds` (XAUTOCLAIM: a dead daemon's), then new ones (`>`). A missing
group is created at the start of the stream (id 0), so entries added before batchd
first ran are consumed. Outcomes and dead letters are XADDed with an approximate MAXLEN.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from batchd.config import SourceConfig
from batchd.sources.base import Broker, Message, Unavailable

_SOCKET_TIMEOUT = 30.0  # above the longest blocking read (stage.READ_WAIT)
_CONNECT_TIMEOUT = 5.0


def _str(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


def _entries(resp: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The entries of an XREADGROUP answer for one stream (RESP2 list or RESP3 dict)."""
    if not resp:
        return []
    if isinstance(resp, dict):
        return list(next(iter(resp.values()), [[]])[0])
    return list(resp[0][1])


class RedisStream(Broker):
    """`kind = "redis_stream"`."""

    def __init__(self, cfg: SourceConfig, consumer: str) -> None:
        self.cfg = cfg
        self.consumer = consumer
        self._r: aioredis.Redis | None = None
        self._pending: bytes | None = b"0"  # own pending entries still to read, from here
        self._claim_cursor: bytes = b"0-0"
        self._next_claim = 0.0

    def _client(self) -> aioredis.Redis:
        if self._r is None:
            # No retries inside the client: a dropped connection is the stage's to see, so
            # that it reconnects and reads its own pending entries first.
            self._r = aioredis.from_url(
                self.cfg.url,
                password=self.cfg.password(),
                decode_responses=False,
                socket_connect_timeout=_CONNECT_TIMEOUT,
                socket_timeout=_SOCKET_TIMEOUT,
                socket_keepalive=True,
                retry=Retry(NoBackoff(), 0),
            )
        return self._r

    @contextlib.asynccontextmanager
    async def _errors(self) -> AsyncIterator[None]:
        try:
            yield
        except (RedisError, OSError) as e:
            raise Unavailable(f"{type(e).__name__}: {e}") from None

    async def connect(self) -> None:
        """Connect; create the group at the stream's start (and the stream) if missing."""
        r = self._client()
        async with self._errors():
            try:
                await r.xgroup_create(self.cfg.stream, self.cfg.group, id="0", mkstream=True)
            except ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise
        self._pending = b"0"
        self._claim_cursor, self._next_claim = b"0-0", 0.0

    async def close(self) -> None:
        """Close the connection pool."""
        r, self._r = self._r, None
        if r is not None:
            with contextlib.suppress(Exception):
                await r.aclose()

    async def _ack_deleted(self, ids: list[bytes]) -> None:
        """Pending entries trimmed or deleted from the stream: nothing to take, forget them."""
        if ids:
            await self._client().xack(self.cfg.stream, self.cfg.group, *ids)

    async def _messages(
        self, entries: list[tuple[bytes, dict[bytes, bytes]]], redelivered: bool
    ) -> list[Message]:
        gone = [eid for eid, fields in entries if not fields]
        await self._ack_deleted(gone)
        return [
            Message(
                _str(eid),
                {_str(k): v for k, v in fields.items()},
                redelivered=redelivered,
                token=eid,
            )
            for eid, fields in entries
            if fields
        ]

    async def fetch(self, limit: int, wait: float) -> list[Message]:
        """Own pending entries first, then a dead consumer's (now and then), then new ones."""
        r, c = self._client(), self.cfg
        async with self._errors():
            while self._pending is not None:
                resp = await r.xreadgroup(
                    c.group, self.consumer, {c.stream: self._pending}, count=limit
                )
                entries = _entries(resp)
                if not entries:
                    self._pending = None
                    break
                self._pending = entries[-1][0]
                if msgs := await self._messages(entries, redelivered=True):
                    return msgs
            if time.monotonic() >= self._next_claim:
                claimed = await r.xautoclaim(
                    c.stream,
                    c.group,
                    self.consumer,
                    min_idle_time=int(c.claim_idle_seconds * 1000),
                    start_id=self._claim_cursor,
                    count=limit,
                )
                cursor = claimed[0]
                self._claim_cursor = cursor if isinstance(cursor, bytes) else cursor.encode()
                if self._claim_cursor == b"0-0":  # a whole pass over the pending entries
                    self._next_claim = time.monotonic() + min(30.0, c.claim_idle_seconds / 4)
                if msgs := await self._messages(list(claimed[1]), redelivered=True):
                    return msgs
            block = int(wait * 1000) if wait > 0 else None
            resp = await r.xreadgroup(
                c.group, self.consumer, {c.stream: ">"}, count=limit, block=block
            )
            return await self._messages(_entries(resp), redelivered=False)

    async def pause(self) -> None:
        """Nothing to do: a stream delivers only what is read."""

    async def ack(self, msgs: list[Message]) -> None:
        """XACK the entries (one call)."""
        if msgs:
            async with self._errors():
                await self._client().xack(self.cfg.stream, self.cfg.group, *[m.token for m in msgs])

    async def _xadd(self, stream: str, fields: Mapping[str, bytes | str]) -> None:
        maxlen = self.cfg.maxlen or None
        async with self._errors():
            data: dict[Any, Any] = dict(fields)
            await self._client().xadd(stream, data, maxlen=maxlen, approximate=True)

    async def dead_letter(self, msg: Message, report: Mapping[str, Any]) -> None:
        """XADD the message's fields, its id and why to the dead-letter stream."""
        fields: dict[str, bytes | str] = dict(msg.fields)
        fields["source_message_id"] = msg.id
        fields["error"] = orjson.dumps(dict(report)).decode()
        await self._xadd(self.cfg.dead_letter_name, fields)

    async def publish(self, job_id: str, state: str, body: Mapping[str, Any]) -> None:
        """XADD job_id, state, the source message id and the outcome (JSON) to `results`."""
        fields = {
            "job_id": job_id,
            "name": str(body.get("name") or ""),
            "state": state,
            "source_message_id": str(body.get("source_message_id") or ""),
            "outcome": orjson.dumps(dict(body)).decode(),
        }
        await self._xadd(self.cfg.results, fields)

    async def probe(self) -> str:
        """PING, then what the group holds (XINFO: reads only)."""
        r, c = self._client(), self.cfg
        async with self._errors():
            await r.ping()
            try:
                groups = await r.xinfo_groups(c.stream)
            except ResponseError as e:
                if "no such key" in str(e).lower():
                    return (
                        f"reachable; stream {c.stream!r} does not exist yet "
                        "(created at the first run)"
                    )
                raise
        for g in groups:
            name = g.get("name")
            if name is not None and _str(name) == c.group:
                pending, lag = g.get("pending", 0), g.get("lag")
                more = "" if lag is None else f", {lag} not yet read"
                return f"reachable; stream {c.stream!r} group {c.group!r}: {pending} pending{more}"
        return (
            f"reachable; stream {c.stream!r} has no group {c.group!r} yet "
            "(created at the first run, reading from the start)"
        )
