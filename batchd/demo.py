"""`batchd demo`: the emulator and the daemon on a temporary spool, three files end to end:
one for OpenAI (inbox/), one for Anthropic (inbox/claude/), one for Azure OpenAI
(inbox/azure/), each in that provider's own line format. No API key is needed."""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from batchd import config, logs
from batchd.daemon import Daemon
from batchd.emulator import EmulatorConfig, EmulatorState, create_app
from batchd.store import Store

DEMO_KEY_ENV = "BATCHD_DEMO_API_KEY"
AZURE_DEPLOYMENT = "gpt-4o-mini-batch"


def _hook(i: int, n: int) -> dict[str, Any]:
    return {"x_emulator": {"status": 400}} if i == n else {}


def sample_lines(n: int = 8) -> bytes:
    """A small chat-completions batch input; the last request is made to fail (HTTP 400)."""
    lines = []
    for i in range(1, n + 1):
        body: dict[str, object] = {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": f"Say hello to person number {i}."}],
            "max_tokens": 20,
            **_hook(i, n),
        }
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


def anthropic_lines(n: int = 5) -> bytes:
    """Message Batches requests ({custom_id, params}); the last is made to fail."""
    out = []
    for i in range(1, n + 1):
        params = {
            "model": "claude-haiku-4-5",
            "max_tokens": 64,
            "messages": [{"role": "user", "content": f"Write a haiku about the number {i}."}],
            **_hook(i, n),
        }
        out.append(orjson.dumps({"custom_id": f"haiku-{i}", "params": params}))
    return b"\n".join(out) + b"\n"


def azure_lines(n: int = 4) -> bytes:
    """OpenAI-shaped lines whose model is the Azure batch deployment."""
    out = []
    for i in range(1, n + 1):
        body = {
            "model": AZURE_DEPLOYMENT,
            "messages": [{"role": "user", "content": f"Summarise ticket #{i} in one line."}],
        }
        out.append(
            orjson.dumps(
                {
                    "custom_id": f"ticket-{i}",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": body,
                }
            )
        )
    return b"\n".join(out) + b"\n"


# (inbox subdirectory, file name, lines, what it is)
DROPS = (
    ("", "requests", sample_lines, "8 OpenAI chat requests, one made to fail"),
    ("claude", "haiku", anthropic_lines, "5 Anthropic Message Batches requests, one made to fail"),
    ("azure", "tickets", azure_lines, "4 Azure OpenAI requests for one batch deployment"),
)


def _config(root: Path, port: int) -> config.Config:
    url = f"http://127.0.0.1:{port}"
    key = {"api_key_env": DEMO_KEY_ENV}
    return config.parse(
        {
            "api": {"base_url": f"{url}/v1", **key},
            "spool": {"dir": "spool"},
            "state": {"database": "batchd.db"},
            "batch": {"poll_interval_seconds": 0.2, "metadata": {"source": "demo"}},
            "http": {"listen": "127.0.0.1:0"},
            # An Azure deployment is named by its owner: price it as the model it runs.
            "prices": {AZURE_DEPLOYMENT: {"same_as": "gpt-4o-mini"}},
            "providers": {
                "claude": {"kind": "anthropic", "base_url": f"{url}/anthropic", **key},
                "azure": {
                    "kind": "azure_openai",
                    "base_url": f"{url}/azure",
                    "api_version": "2024-10-21",
                    "deployments": [AZURE_DEPLOYMENT],
                    **key,
                },
            },
        },
        root,
        env={},
    )


async def _watch(cfg: config.Config, task: asyncio.Task[int]) -> None:
    """Print each job's state and its batch's status (batchd's, and the provider's own)
    whenever they change."""
    seen: dict[str, tuple[str, str | None, str | None]] = {}
    watcher = await Store.open(cfg.state.database)  # a reader of its own (WAL)
    try:
        while True:
            ended = task.done()
            for job in reversed(await watcher.list_jobs()):
                atts = await watcher.attempts(job.id)
                last = atts[-1] if atts else None
                now = (
                    job.state.value,
                    last.status if last else None,
                    last.raw_status if last else None,
                )
                if now != seen.get(job.id):
                    seen[job.id] = now
                    batch = ""
                    if last and last.status:
                        raw = f" ({now[2]})" if now[2] and now[2] != now[1] else ""
                        batch = f"  batch {last.batch_id}: {now[1]}{raw}"
                    who = job.provider or "openai"
                    print(f"job       {job.name:9} [{who:6}] {now[0]}{batch}")
            if ended:  # one last look, so that every job's end is shown
                return
            await asyncio.wait({task}, timeout=0.1)
    finally:
        await watcher.close()


def _report(cfg: config.Config) -> int:
    bad = 0
    for _sub, name, _lines, _what in DROPS:
        done = cfg.spool.dir / "done" / name
        if not (done / "job.json").exists():
            print(f"demo FAILED: no results in done/{name}/")
            bad += 1
            continue
        info = orjson.loads((done / "job.json").read_bytes())
        rc = info["request_counts"]
        print(
            f"results   done/{name}/  [{info['provider']}: {info['kind']}]  "
            f"{rc['completed']} succeeded, {rc['failed']} failed, "
            f"batch {info['batch_status']} ({info['raw_status']})"
        )
        out = (done / "output.jsonl").read_bytes().splitlines()
        if out:
            first = orjson.loads(out[0])
            print(f"          first line: {_snippet(first)}")
        est, cost = info.get("estimate") or {}, info.get("cost") or {}
        if est.get("cost_high_usd") is not None:
            print(
                f"          estimate ${est['cost_low_usd']} to ${est['cost_high_usd']}"
                f" (~{est['input_tokens']} input tokens)"
            )
        elif est.get("cost_unknown_reason"):
            print(f"          estimate unknown: {est['cost_unknown_reason']}")
        if cost.get("usd") is not None:
            print(
                f"          cost ${cost['usd']} ({cost['input_tokens']} input, "
                f"{cost['output_tokens']} output tokens; the emulator bills a prompt as "
                "its JSON body's bytes / 4)"
            )
        elif cost.get("unknown"):
            print(f"          cost unknown: {cost['unknown']}")
    return 1 if bad else 0


def _snippet(rec: dict[str, Any]) -> str:
    """A succeeded result line, in its provider's shape, cut short."""
    if "result" in rec:  # Anthropic
        text = rec["result"]["message"]["content"][0]["text"]
    else:
        text = rec["response"]["body"]["choices"][0]["message"]["content"]
    cid = rec.get("custom_id")
    return f"{cid}: {text[:60]!r}"


async def run_demo(workdir: Path | None = None) -> int:
    """Run the demo; returns 0 when every file ended in done/."""
    root = workdir or Path(tempfile.mkdtemp(prefix="batchd-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    logs.setup("warning", "console")
    state = EmulatorState(
        EmulatorConfig(time_scale=0.4, seed=1, azure_deployments=frozenset({AZURE_DEPLOYMENT}))
    )
    runner = web.AppRunner(create_app(state), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    os.environ[DEMO_KEY_ENV] = "emulator-demo-key"
    cfg = _config(root, port)
    print(f"emulator  http://127.0.0.1:{port} (OpenAI /v1, Anthropic /anthropic, Azure /azure;")
    print("          no API key needed)")
    print(f"spool     {cfg.spool.dir}")
    daemon = Daemon(cfg, once=True)
    task = asyncio.create_task(daemon.run())
    try:
        while daemon.ctx is None and not task.done():
            await asyncio.sleep(0.02)
        for sub, name, make, what in DROPS:
            inbox = cfg.spool.dir / "inbox" / sub if sub else cfg.spool.dir / "inbox"
            staging = root / f"{name}.jsonl.part"
            staging.write_bytes(make())
            os.replace(staging, inbox / f"{name}.jsonl")
            where = f"inbox/{sub}/" if sub else "inbox/"
            print(f"dropped   {where}{name}.jsonl ({what})")
        await _watch(cfg, task)
        await task
    finally:
        await runner.cleanup()
        state.close()
    return _report(cfg)
