"""Helpers for tests that talk HTTP to the real daemon on a free loopback port."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import aiohttp

from batchd.config import Config
from batchd.daemon import Daemon


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until `check()` is true (polling), or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


@asynccontextmanager
async def running_daemon(cfg: Config) -> AsyncIterator[tuple[Daemon, str]]:
    """Run `Daemon(cfg)` as a task; yield it and its base URL once /healthz answers."""
    d = Daemon(cfg)
    task = asyncio.create_task(d.run())
    base = f"http://{cfg.http.listen}"
    try:
        async with aiohttp.ClientSession() as s:
            deadline = time.monotonic() + 10
            while True:
                if task.done():
                    task.result()
                    raise AssertionError("daemon stopped before serving")
                try:
                    async with s.get(f"{base}/healthz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError("daemon did not start serving")
                await asyncio.sleep(0.02)
        yield d, base
    finally:
        d.request_stop()
        await asyncio.wait({task}, timeout=10)
        if not task.done():
            for t in asyncio.all_tasks():  # say where it hangs before failing
                t.print_stack(limit=6)
            task.cancel()
            raise AssertionError("daemon did not stop within 10 s")
        task.result()
