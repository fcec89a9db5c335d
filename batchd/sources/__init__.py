"""Queue sources: jobs consumed from the brokers teams already run ([sources.NAME]).

`redis_stream` reads a Redis stream through a consumer group; `amqp` consumes a
RabbitMQ queue. Each source is a stage (`stage.py`); what a message becomes is shared
(`base.py`); each broker's client (redis, aio-pika) is imported only when a source of
its kind is configured.
"""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

from batchd.config import SourceConfig
from batchd.sources.base import Broker, Unavailable
from batchd.sources.stage import idle, stage

__all__ = ["Broker", "Unavailable", "default_consumer", "idle", "make_broker", "probe", "stage"]

PROBE_TIMEOUT = 10.0


def default_consumer(spool_root: Path) -> str:
    """This daemon's consumer name: the host and its spool, stable across restarts, so
    what it read but had not acknowledged before a crash is its own to read again."""
    digest = hashlib.sha256(str(spool_root.resolve()).encode()).hexdigest()[:8]
    return f"{socket.gethostname()}-{digest}"


def make_broker(cfg: SourceConfig, spool_root: Path) -> Broker:
    """The broker client of a source (imports its library)."""
    if cfg.kind == "redis_stream":
        from batchd.sources.redis_stream import RedisStream

        return RedisStream(cfg, cfg.consumer or default_consumer(spool_root))
    from batchd.sources.amqp import AmqpQueue

    return AmqpQueue(cfg)


async def probe(cfg: SourceConfig, spool_root: Path) -> tuple[bool, str]:
    """For `batchd check`: (reachable, one line on what was found); creates nothing."""
    import asyncio

    from batchd.config import redact_url

    where = redact_url(cfg.url)
    try:
        broker = make_broker(cfg, spool_root)
    except ImportError as e:  # pragma: no cover - both clients are dependencies
        return False, f"{where}: {e}"
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            return True, f"{where} {await broker.probe()}"
    except TimeoutError:
        return False, f"{where}: no answer within {PROBE_TIMEOUT:g} s"
    except Unavailable as e:
        return False, f"{where}: {e}"
    finally:
        await broker.close()
