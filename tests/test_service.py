"""The daemon as systemd sees it: READY=1, STATUS=, WATCHDOG=1 pings, SIGHUP reload,
STOPPING=1 — a real subprocess talking to a bound datagram socket."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from pathlib import Path

from tests.conftest import API_KEY, KEY_ENV, Emulator, config_file

ROOT = Path(__file__).resolve().parent.parent


def _recv_until(sock: socket.socket, want: str, deadline: float, seen: list[str]) -> bool:
    while time.monotonic() < deadline:
        try:
            msg = sock.recv(4096).decode()
        except TimeoutError:
            continue
        seen.append(msg)
        if want in msg:
            return True
    return False


async def test_notify_watchdog_reload_and_stop(tmp_path: Path, emulator: Emulator) -> None:
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.2)
    extra = '[log]\nlevel = "info"\nformat = "json"\n'
    conf = config_file(tmp_path, emulator.url, poll=0.5, extra=extra, name="c.toml")
    env = {
        **os.environ,
        KEY_ENV: API_KEY,
        "NOTIFY_SOCKET": str(sock_path),
        "WATCHDOG_USEC": "200000",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "batchd",
        "run",
        "--config",
        str(conf),
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    seen: list[str] = []
    try:
        end = time.monotonic() + 30
        for want in ("READY=1", "STATUS=", "WATCHDOG=1"):
            assert await asyncio.to_thread(_recv_until, sock, want, end, seen), (want, seen)
        pings = sum(m == "WATCHDOG=1" for m in seen)
        await asyncio.to_thread(_recv_until, sock, "never", time.monotonic() + 0.5, seen)
        assert sum(m == "WATCHDOG=1" for m in seen) >= pings + 2  # every 0.1 s
        conf.write_text(
            conf.read_text()
            .replace('level = "info"', 'level = "debug"')
            .replace("poll_interval_seconds = 0.5", "poll_interval_seconds = 2.0")
        )
        proc.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.5)
        assert proc.returncode is None  # a reload is not a stop
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(_recv_until, sock, "STOPPING=1", time.monotonic() + 10, seen)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        sock.close()
    assert proc.stderr is not None
    err = (await proc.stderr.read()).decode()
    [reloaded] = [line for line in err.splitlines() if '"reloaded"' in line]
    assert '"log_level": "debug"' in reloaded and '"poll_interval_seconds": 2.0' in reloaded
