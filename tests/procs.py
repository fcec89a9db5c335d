"""A real daemon as a subprocess (`python -m batchd run`), for tests about the process."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
_LISTEN = re.compile(rb"listening on (http://[0-9.:]+)")


@dataclass
class Proc:
    """A running daemon: the process, its HTTP base URL, its stderr log."""

    popen: subprocess.Popen[bytes]
    base: str
    log: Path

    def text(self) -> str:
        """Everything the daemon wrote to stderr so far."""
        return self.log.read_text(errors="replace")

    async def get(self, path: str) -> tuple[int, str]:
        """GET a path of the daemon's HTTP endpoint: (status, body)."""
        async with aiohttp.ClientSession() as s, s.get(self.base + path) as r:
            return r.status, await r.text()


async def wait_for(check: object, timeout: float = 30.0, what: str = "condition") -> None:
    """Poll `check()` (sync or async) until true, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()  # type: ignore[operator]
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        await asyncio.sleep(0.05)


@asynccontextmanager
async def daemon(
    config: Path,
    env: Mapping[str, str] | None = None,
    prefix: Sequence[str] = (),
    args: Sequence[str] = (),
) -> AsyncIterator[Proc]:
    """Start `batchd run -c CONFIG` (its [http] listen must be HOST:0); stop it with
    SIGTERM at the end. `prefix` runs it under another program (e.g. setpriv)."""
    log = config.with_suffix(f".{time.monotonic_ns()}.log")
    with log.open("wb") as err:
        p = subprocess.Popen(  # noqa: ASYNC220 - starting it does not block
            [*prefix, sys.executable, "-m", "batchd", "run", "-c", str(config), *args],
            stdout=subprocess.DEVNULL,
            stderr=err,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
        )
    try:
        deadline = time.monotonic() + 20
        while not (m := _LISTEN.search(log.read_bytes())):
            if p.poll() is not None:
                raise AssertionError(f"daemon exited {p.returncode}: {log.read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"daemon did not start: {log.read_text()}")
            await asyncio.sleep(0.05)
        yield Proc(p, m.group(1).decode(), log)
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(p.wait, 20)
            except subprocess.TimeoutExpired:
                p.kill()
                await asyncio.to_thread(p.wait)
                raise AssertionError(f"daemon did not stop on SIGTERM: {log.read_text()}") from None
