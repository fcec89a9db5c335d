"""A real Prometheus on loopback scrapes a real batchd and can query its series."""

from __future__ import annotations

import asyncio
import shutil
import socket
from pathlib import Path

import aiohttp
import pytest

from batchd.daemon import Daemon
from tests.conftest import Emulator, chat_lines, drop, make_config, skip_without


@pytest.fixture(autouse=True)
def _needs_prometheus() -> None:
    skip_without("prometheus")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _query(http: aiohttp.ClientSession, base: str, q: str) -> list[dict[str, object]]:
    try:
        async with http.get(f"{base}/api/v1/query", params={"query": q}) as resp:
            if resp.status != 200:
                return []
            data = await resp.json()
    except aiohttp.ClientConnectionError:  # not listening yet
        return []
    result: list[dict[str, object]] = data["data"]["result"]
    return result


@pytest.mark.timeout(90)
async def test_prometheus_scrapes_batchd(tmp_path: Path, emulator: Emulator) -> None:
    bport, pport = _free_port(), _free_port()
    cfg = make_config(tmp_path, emulator.url, http={"listen": f"127.0.0.1:{bport}"})
    (tmp_path / "prom.yml").write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: batchd\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{bport}']\n"
    )
    daemon = Daemon(cfg)
    task = asyncio.create_task(daemon.run())
    prom = await asyncio.create_subprocess_exec(
        "prometheus",
        f"--config.file={tmp_path / 'prom.yml'}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{pport}",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        drop(cfg, "scraped.jsonl", chat_lines(4))
        base = f"http://127.0.0.1:{pport}"
        async with aiohttp.ClientSession() as http:
            for _ in range(600):  # poll readiness and data; never a blind sleep
                up = await _query(http, base, 'up{job="batchd"}')
                done = await _query(http, base, 'batchd_jobs_finished_total{outcome="done"}')
                if up and done and float(str(done[0]["value"][1])) >= 1:  # type: ignore[index]
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("Prometheus never saw batchd's finished job")
            assert float(str(up[0]["value"][1])) == 1  # type: ignore[index]
            info = await _query(http, base, "batchd_build_info")
            assert info and info[0]["metric"]["version"]  # type: ignore[index]
            # promtool's lint of the live exposition, as Prometheus scraped it
            async with http.get(f"http://127.0.0.1:{bport}/metrics") as resp:
                body = await resp.read()
            if shutil.which("promtool"):
                lint = await asyncio.create_subprocess_exec(
                    "promtool",
                    "check",
                    "metrics",
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT,
                )
                out, _ = await lint.communicate(body)
                assert lint.returncode == 0, out.decode()
    finally:
        prom.terminate()
        await prom.wait()
        daemon.request_stop()
        await asyncio.wait_for(task, 10)
