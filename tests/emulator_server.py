"""The emulator on its own thread and event loop, so that the providers' synchronous SDK clients
can drive it from a plain (sync) test."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from aiohttp import web

from batchd.emulator import EmulatorConfig, EmulatorState, create_app

KEY = "sk-emulator-test-key"


class Server:
    """A running emulator: ``url`` is ``http://127.0.0.1:PORT`` (no path)."""

    def __init__(self, state: EmulatorState, url: str, loop: asyncio.AbstractEventLoop) -> None:
        self.state, self.url, self.loop = state, url, loop

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the emulator's loop (state is only touched from there)."""

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def status(self, bid: str) -> str:
        """The engine's own (OpenAI-vocabulary) status of batch ``bid``."""

        def get() -> str:
            self.state.advance()
            return self.state._batches[bid].status

        return str(self.call(get))

    def wait_status(self, bid: str, *statuses: str, timeout: float = 20) -> str:
        """Poll the engine until batch ``bid`` is in one of ``statuses``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status(bid)
            if status in statuses:
                return status
            time.sleep(0.01)
        raise AssertionError(f"{bid} never reached {statuses}")


@contextmanager
def serve(**kw: Any) -> Iterator[Server]:
    """Start an emulator (``EmulatorConfig(**kw)``, fast clock, key :data:`KEY`) on a thread."""
    kw.setdefault("time_scale", 0.02)
    kw.setdefault("api_key", KEY)
    state = EmulatorState(EmulatorConfig(**kw))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runner = web.AppRunner(create_app(state), access_log=None)

    async def start() -> int:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return int(runner.addresses[0][1])

    port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield Server(state, f"http://127.0.0.1:{port}", loop)
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        state.close()


def poll(get: Callable[[], Any], done: Callable[[Any], bool], timeout: float = 20) -> Any:
    """Call ``get`` until ``done(result)``; return that result."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = get()
        if done(result):
            return result
        time.sleep(0.02)
    raise AssertionError(f"never done; last: {result!r}")
