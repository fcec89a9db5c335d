"""`batchd` with a crash point: the process SIGKILLs itself at a named place.

    python -m tests.crashpoint POINT BATCHD-ARGS...

A real kill in the real process, at an exact moment no timing could hit reliably:
- `source_ack`: a read's jobs are durably recorded, its messages not yet acknowledged;
- `source_announce`: an outcome is published, the job not yet marked announced.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any


def _die(*_: Any, **__: Any) -> Any:
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    point, args = sys.argv[1], sys.argv[2:]
    from batchd.sources.amqp import AmqpQueue
    from batchd.sources.redis_stream import RedisStream
    from batchd.store import Store

    if point == "source_ack":
        for cls in (RedisStream, AmqpQueue):
            cls.ack = _die  # type: ignore[method-assign]
    elif point == "source_announce":
        Store.mark_announced = _die  # type: ignore[method-assign]
    else:
        raise SystemExit(f"unknown crash point {point!r}")
    from batchd.cli import main as batchd

    return batchd(args)


if __name__ == "__main__":
    sys.exit(main())
