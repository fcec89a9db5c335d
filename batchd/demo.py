"""`batchd demo`: the emulator and the daemon on a temporary spool, one file end to end."""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

import orjson
from aiohttp import web

from batchd import config, logs
from batchd.daemon import Daemon
from batchd.emulator import EmulatorConfig, EmulatorState, create_app
from batchd.store import Store

DEMO_KEY_ENV = "BATCHD_DEMO_API_KEY"


def sample_lines(n: int = 8) -> bytes:
    """A small chat-completions batch input; the last request is made to fail (HTTP 400)."""
    lines = []
    for i in range(1, n + 1):
        body: dict[str, object] = {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": f"Say hello to person number {i}."}],
            "max_tokens": 20,
        }
        if i == n:
            body["x_emulator"] = {"status": 400}
        lines.append(
            orjson.dumps(
                {
                    "custom_id": f"req-{i}",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": body,
                }
            )
        )
    return b"\n".join(lines) + b"\n"


async def run_demo(workdir: Path | None = None) -> int:
    """Run the demo; returns 0 when the file ended in done/."""
    root = workdir or Path(tempfile.mkdtemp(prefix="batchd-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    logs.setup("warning", "console")
    state = EmulatorState(EmulatorConfig(time_scale=0.4, seed=1))
    runner = web.AppRunner(create_app(state), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    os.environ[DEMO_KEY_ENV] = "emulator-demo-key"
    cfg = config.parse(
        {
            "api": {"base_url": f"http://127.0.0.1:{port}/v1", "api_key_env": DEMO_KEY_ENV},
            "spool": {"dir": "spool"},
            "state": {"database": "batchd.db"},
            "batch": {"poll_interval_seconds": 0.2, "metadata": {"source": "demo"}},
            "http": {"listen": "127.0.0.1:0"},
        },
        root,
        env={},
    )
    print(f"emulator  http://127.0.0.1:{port}/v1 (no API key needed)")
    print(f"spool     {cfg.spool.dir}")
    daemon = Daemon(cfg, once=True)
    task = asyncio.create_task(daemon.run())
    try:
        while daemon.ctx is None and not task.done():
            await asyncio.sleep(0.02)
        staging = root / "requests.jsonl.part"
        staging.write_bytes(sample_lines())
        os.replace(staging, cfg.spool.dir / "inbox" / "requests.jsonl")
        print("dropped   inbox/requests.jsonl (8 chat requests, one made to fail)")
        seen: tuple[str, str | None] | None = None
        watcher = await Store.open(cfg.state.database)  # a reader of its own (WAL)
        try:
            while not task.done():
                for job in await watcher.list_jobs():
                    atts = await watcher.attempts(job.id)
                    now = (job.state.value, atts[-1].status if atts else None)
                    if now != seen:
                        seen = now
                        batch = f"  batch {atts[-1].batch_id}: {now[1]}" if now[1] else ""
                        print(f"job       {job.name}: {now[0]}{batch}")
                await asyncio.wait({task}, timeout=0.1)
        finally:
            await watcher.close()
        await task
    finally:
        await runner.cleanup()
        state.close()
    done = cfg.spool.dir / "done" / "requests"
    if not (done / "output.jsonl").exists():
        print("demo FAILED: no results in done/requests/")
        return 1
    out = (done / "output.jsonl").read_bytes().splitlines()
    errs = (
        (done / "errors.jsonl").read_bytes().splitlines()
        if (done / "errors.jsonl").exists()
        else []
    )
    info = orjson.loads((done / "job.json").read_bytes())
    status = info["status"]
    print(f"job       requests: {status}")
    print(f"results   {done}/")
    for f in sorted(done.iterdir()):
        print(f"          {f.name:14} {f.stat().st_size:>7} bytes")
    print(f"          {len(out)} succeeded, {len(errs)} failed (see errors.jsonl)")
    if out:
        first = orjson.loads(out[0])
        content = first["response"]["body"]["choices"][0]["message"]["content"]
        print(f"first     {first['custom_id']}: {content!r}")
    est, cost = info.get("estimate") or {}, info.get("cost") or {}
    if est:
        print(
            f"estimate  ${est['cost_low_usd']} to ${est['cost_high_usd']} "
            f"(~{est['input_tokens']} input tokens, {est['output_tokens_low']} to "
            f"{est['output_tokens_high']} output tokens; batch price of gpt-4o-mini)"
        )
    if cost:
        print(
            f"cost      ${cost['usd']} ({cost['input_tokens']} input, "
            f"{cost['output_tokens']} output tokens in {cost['requests_billed']} billed results;"
            " the emulator counts a prompt as its JSON body's bytes / 4)"
        )
    return 0
