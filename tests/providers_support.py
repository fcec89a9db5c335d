"""Test support for the provider end-to-end and conformance tests: per-provider input
lines with emulator hooks, a config per provider pointing at the emulator, and a
recorder of every JSON request batchd sends (to check against the official SDKs)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from batchd.config import Config
from batchd.emulator import EmulatorConfig, EmulatorState, create_app
from tests.conftest import API_KEY, KEY_ENV, make_config

CLAUDE = "claude-haiku-4-5"
GEMINI = "gemini-2.5-flash"
MISTRAL = "mistral-small-latest"
DEPLOYMENT = "gpt-4o-mini-batch"
TOGETHER = "meta-llama/Llama-3.3-70B-Instruct-Turbo"


def hooks_for(
    n: int, fail: Iterable[int] = (), hooks: Mapping[int, dict[str, Any]] | None = None
) -> dict[int, dict[str, Any]]:
    return {i: {"status": 400} for i in fail} | dict(hooks or {})


def lines(
    kind: str,
    n: int,
    fail: Iterable[int] = (),
    hooks: Mapping[int, dict[str, Any]] | None = None,
    prefix: str = "req",
) -> bytes:
    """n request lines in `kind`'s native format; `fail` made to fail with HTTP 400,
    `hooks` other emulator hooks (e.g. {"expire": True}, {"status": 500})."""
    x = hooks_for(n, fail, hooks)
    out = []
    for i in range(n):
        text = f"question {i}"
        if kind == "anthropic":
            params: dict[str, Any] = {
                "model": CLAUDE,
                "max_tokens": 64,
                "messages": [{"role": "user", "content": text}],
            }
            if i in x:
                params["x_emulator"] = x[i]
            line: dict[str, Any] = {"custom_id": f"{prefix}-{i}", "params": params}
        elif kind == "gemini":
            request: dict[str, Any] = {"contents": [{"role": "user", "parts": [{"text": text}]}]}
            if i in x:
                request["x_emulator"] = x[i]
            line = {"key": f"{prefix}-{i}", "request": request}
        elif kind in ("mistral", "together"):
            model = MISTRAL if kind == "mistral" else TOGETHER
            body: dict[str, Any] = {
                "model": model,
                "messages": [{"role": "user", "content": text}],
                "max_tokens": 32,
            }
            if i in x:
                body["x_emulator"] = x[i]
            line = {"custom_id": f"{prefix}-{i}", "body": body}
        else:  # the OpenAI family
            model = DEPLOYMENT if kind == "azure_openai" else "gpt-4o-mini"
            if kind == "groq":
                model = "llama-3.1-8b-instant"
            body = {"model": model, "messages": [{"role": "user", "content": text}]}
            if i in x:
                body["x_emulator"] = x[i]
            line = {
                "custom_id": f"{prefix}-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": body,
            }
        out.append(orjson.dumps(line))
    return b"\n".join(out) + b"\n"


def provider_table(kind: str, url: str, **extra: Any) -> dict[str, Any]:
    """A [providers.NAME] table pointing at the emulator (url: http://HOST:PORT)."""
    base = {
        "anthropic": "/anthropic",
        "gemini": "/gemini",
        "mistral": "/mistral",
        "azure_openai": "/azure",
        "groq": "/groq",
        "together": "/together",
        "openai": "/v1",
    }[kind]
    table: dict[str, Any] = {
        "kind": kind,
        "base_url": url + base,
        "api_key_env": KEY_ENV,
        "max_retries": 3,
    }
    return table | extra


def provider_config(tmp_path: Path, url: str, name: str, kind: str, **kw: Any) -> Config:
    """A test config with one provider NAME of `kind` beside the default ([api])."""
    extra = kw.pop("provider", {})
    return make_config(
        tmp_path,
        url + "/v1",
        providers={name: provider_table(kind, url, **extra)},
        **kw,
    )


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any  # parsed JSON, or None
    status: int = 0
    answer: Any = None  # parsed JSON answer, or None


@dataclass
class Emu:
    state: EmulatorState
    url: str  # http://127.0.0.1:PORT
    requests: list[Recorded] = field(default_factory=list)

    def sent(self, method: str, path_part: str) -> list[Recorded]:
        """Recorded requests with this method whose path contains `path_part`."""
        return [r for r in self.requests if r.method == method and path_part in r.path]


@asynccontextmanager
async def emulator(**kw: Any) -> AsyncIterator[Emu]:
    """An emulator serving every provider, recording each JSON request and answer."""
    kw.setdefault("time_scale", 0.01)
    kw.setdefault("api_key", API_KEY)
    state = EmulatorState(EmulatorConfig(**kw))
    app = create_app(state)
    emu = Emu(state, "")

    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        body = None
        if request.content_type == "application/json" and request.can_read_body:
            raw = await request.read()
            body = orjson.loads(raw) if raw.strip() else None
        rec = Recorded(
            request.method, request.path, dict(request.query), dict(request.headers), body
        )
        emu.requests.append(rec)
        resp = await handler(request)
        rec.status = resp.status
        if isinstance(resp, web.Response) and resp.content_type == "application/json":
            try:
                rec.answer = orjson.loads(resp.body)  # type: ignore[arg-type]
            except (orjson.JSONDecodeError, TypeError):
                pass
        return resp

    app.middlewares.insert(0, record)  # outermost: sees what the client sent, as sent
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    emu.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield emu
    finally:
        await runner.cleanup()
        state.close()


def drop_to(cfg: Config, provider: str | None, name: str, data: bytes) -> Path:
    """Write elsewhere, then rename into inbox/ or inbox/PROVIDER/."""
    import os

    inbox = cfg.spool.dir / "inbox"
    if provider:
        inbox = inbox / provider
    inbox.mkdir(parents=True, exist_ok=True)
    tmp = cfg.spool.dir / f".{name}.part"
    tmp.write_bytes(data)
    dest = inbox / name
    os.replace(tmp, dest)
    return dest
