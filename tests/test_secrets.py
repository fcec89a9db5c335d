"""The API key never reaches a log line, a metric, the database, a report or a result."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from batchd.logs import REDACTED, redact
from tests.conftest import KEY_ENV, chat_lines, config_file, drop, make_config, start_emulator

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-proj-SUPERSECRETKEY0123456789abcdefXYZ"


def test_redact_walks_nested_values() -> None:
    event = {
        "headers": {"Authorization": f"Bearer {KEY}", "accept": "json"},
        "api_key": "anything",
        "nested": [{"token": "t0ps3cret"}, f"the key is {KEY}", ("whsec_c2VjcmV0c2VjcmV0",)],
        "input_tokens": 42,
        "est_tokens": 7,
        "message": "fine",
    }
    out = redact(event)
    flat = repr(out)
    assert KEY not in flat and "t0ps3cret" not in flat and "whsec_c2Vj" not in flat
    assert out["headers"]["Authorization"] == REDACTED
    assert out["api_key"] == REDACTED
    assert out["input_tokens"] == 42 and out["est_tokens"] == 7
    assert out["headers"]["accept"] == "json" and out["message"] == "fine"


async def test_key_is_nowhere(tmp_path: Path) -> None:
    emu, runner = await start_emulator(api_key=KEY)
    bad_emu, bad_runner = await start_emulator(api_key="sk-another-key-entirely-000000")
    try:
        port_cfg = make_config(tmp_path, emu.url)
        drop(port_cfg, "ok.jsonl", chat_lines(3, fail=[1]))
        drop(port_cfg, "bad.jsonl", b'{"custom_id": 1}\n')
        extra = '[log]\nlevel = "debug"\nformat = "json"\n'
        conf = config_file(tmp_path, emu.url, extra=extra, name="c.toml")
        env = {**os.environ, KEY_ENV: KEY}

        async def run_once_subprocess() -> tuple[int | None, bytes, bytes]:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "batchd",
                "run",
                "--once",
                "--config",
                str(conf),
                cwd=ROOT,
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            return proc.returncode, out, err

        rc, out, err = await run_once_subprocess()
        assert rc == 1, err.decode()[-2000:]  # bad.jsonl failed
        assert (tmp_path / "spool" / "done" / "ok" / "job.json").exists()
        # a second run against a server that rejects the key: the 401 is logged, recorded
        # as the hold in the database, and the job waits
        conf.write_text(conf.read_text().replace(emu.url, bad_emu.url))
        drop(port_cfg, "denied.jsonl", chat_lines(1))
        rc2, out2, err2 = await run_once_subprocess()
        assert rc2 == 1 and b"Incorrect API key" in err2
        blobs = [out, err, out2, err2]
        for p in tmp_path.rglob("*"):
            if p.is_file() and not p.is_symlink() and p.name != "c.toml":
                blobs.append(p.read_bytes())
        assert len(blobs) > 10
        for blob in blobs:
            assert KEY.encode() not in blob
            assert KEY[8:].encode() not in blob
        # and not in a live metrics scrape either
        from batchd.daemon import Daemon

        cfg = make_config(tmp_path / "m", emu.url)
        d = Daemon(cfg)
        task = asyncio.create_task(d.run())
        while d.ctx is None:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        from prometheus_client import generate_latest

        await d._refresh_gauges()
        assert KEY.encode() not in generate_latest(d.metrics.registry)
        d.request_stop()
        await asyncio.wait_for(task, 10)
    finally:
        await runner.cleanup()
        await bad_runner.cleanup()
        emu.state.close()
        bad_emu.state.close()
