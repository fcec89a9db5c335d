"""Helpers for the facade's tests: a real daemon subprocess with tenants (driven from plain
sync tests by the official SDKs), a webhook receiver, and a proxy that drops responses."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aiohttp
import openai
from aiohttp import web

from tests.emulator_server import KEY as EMULATOR_KEY

ROOT = Path(__file__).resolve().parent.parent
KEYS = {"alpha": "sk-alpha-0123456789abcdefTENANTKEY", "beta": "sk-beta-9876543210fedcbaTENANTKEY"}
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"facade-webhook-secret-for-tests").decode()
TERMINAL = ("completed", "failed", "expired", "cancelled")
_LISTEN = re.compile(rb"listening on (http://[0-9.:]+)")
EMU_ENV = "BATCHD_FACADE_TEST_EMULATOR_KEY"


def write_config(
    tmp: Path,
    emulator_url: str,
    extra: str = "",
    webhook_url: str | None = None,
    poll: float = 0.1,
) -> Path:
    """A config with tenants alpha (webhooks to `webhook_url`, if any) and beta, their keys
    in files beside it; spool and database in `tmp`."""
    tmp.mkdir(parents=True, exist_ok=True)
    for name, key in KEYS.items():
        (tmp / f"{name}.key").write_text(key + "\n")
    (tmp / "alpha.whsec").write_text(WEBHOOK_SECRET + "\n")
    hook = (
        f'webhook_url = "{webhook_url}"\nwebhook_secret_file = "alpha.whsec"\n'
        if webhook_url
        else ""
    )
    p = tmp / "batchd.toml"
    p.write_text(
        f'[api]\nbase_url = "{emulator_url}/v1"\napi_key_env = "{EMU_ENV}"\nmax_retries = 3\n'
        '[spool]\ndir = "spool"\n[state]\ndatabase = "batchd.db"\n'
        f'[batch]\npoll_interval_seconds = {poll}\n[http]\nlisten = "127.0.0.1:0"\n'
        '[intake]\nduplicate_window = "0"\n'
        f'[facade.tenants.alpha]\nkey_file = "alpha.key"\n{hook}'
        '[facade.tenants.beta]\nkey_file = "beta.key"\n' + extra
    )
    return p


@dataclass
class Running:
    """A daemon subprocess: its base URL (`…/v1` is the facade) and its log."""

    popen: subprocess.Popen[bytes]
    base: str
    log: Path
    config: Path

    def client(self, tenant: str = "alpha", **kw: Any) -> openai.OpenAI:
        """The official SDK, pointed at this daemon as `tenant`."""
        return openai.OpenAI(base_url=self.base + "/v1", api_key=KEYS[tenant], **kw)

    def text(self) -> str:
        """What the daemon logged so far."""
        return self.log.read_text(errors="replace")

    def kill9(self) -> None:
        """SIGKILL: no shutdown at all."""
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(20)


@contextmanager
def daemon(config: Path) -> Iterator[Running]:
    """`batchd run -c CONFIG` until the block ends (SIGTERM), unless killed before."""
    log = config.with_suffix(f".{time.monotonic_ns()}.log")
    with log.open("wb") as err:
        p = subprocess.Popen(
            [sys.executable, "-m", "batchd", "run", "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            cwd=ROOT,
            env={**os.environ, EMU_ENV: EMULATOR_KEY},
        )
    try:
        deadline = time.monotonic() + 30
        while not (m := _LISTEN.search(log.read_bytes())):
            if p.poll() is not None:
                raise AssertionError(f"daemon exited {p.returncode}: {log.read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"daemon did not start: {log.read_text()}")
            time.sleep(0.05)
        yield Running(p, m.group(1).decode(), log, config)
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                raise AssertionError(f"daemon did not stop: {log.read_text()}") from None


def wait_for(check: Callable[[], Any], timeout: float = 60, what: str = "condition") -> Any:
    """Call `check` until it returns something true; return that."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(0.05)


def wait_ended(client: openai.OpenAI, batch_id: str, timeout: float = 90) -> Any:
    """Poll like a user's script until the batch has a terminal status."""

    def ended() -> Any:
        b = client.batches.retrieve(batch_id)
        return b if b.status in TERMINAL else None

    return wait_for(ended, timeout, f"{batch_id} ended")


@dataclass
class Receiver:
    """A webhook endpoint: every delivery's headers and body."""

    url: str
    got: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    fail_first: int = 0  # answer 500 to this many deliveries first


@contextmanager
def receiver() -> Iterator[Receiver]:
    """A threaded HTTP server on loopback collecting POSTs."""
    rec = Receiver("")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if rec.fail_first > 0:
                rec.fail_first -= 1
                self.send_response(500)
            else:
                rec.got.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    rec.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield rec
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class Proxy:
    """A reverse proxy in front of the daemon; the first `drop` batch creates reach the
    daemon but their answer does not reach the client (`how`: "drop" the connection, or
    answer "500")."""

    url: str = ""
    how: str = "drop"
    drop: int = 1
    creates: list[bytes] = field(default_factory=list)  # the daemon's answers, in order


@contextmanager
def proxy(target: str, how: str = "drop", drop: int = 1) -> Iterator[Proxy]:
    """Run a Proxy on its own thread and event loop."""
    px = Proxy(how=how, drop=drop)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def forward(req: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in req.headers.items() if k.lower() not in ("host",)}
        async with (
            aiohttp.ClientSession(auto_decompress=False) as s,
            s.request(
                req.method, target + req.path_qs, headers=headers, data=await req.read()
            ) as r,
        ):
            body = await r.read()
            if req.method == "POST" and req.path == "/v1/batches":
                px.creates.append(body)
                if len(px.creates) <= px.drop:
                    if px.how == "drop":
                        if req.transport is not None:
                            req.transport.close()
                        return web.Response(status=500)
                    return web.Response(status=500, text='{"error": {"message": "proxy"}}')
            out = {k: v for k, v in r.headers.items() if k.lower() in ("content-type",)}
            return web.Response(status=r.status, body=body, headers=out)

    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/{tail:.*}", forward)
    runner = web.AppRunner(app, access_log=None)

    async def start() -> int:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return int(runner.addresses[0][1])

    port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    px.url = f"http://127.0.0.1:{port}"
    try:
        yield px
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
