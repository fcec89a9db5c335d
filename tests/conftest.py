"""Shared fixtures: a real emulator over loopback, real spools and databases in tmp_path."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from batchd import config, logs
from batchd.config import Config
from batchd.daemon import Daemon
from batchd.emulator import EmulatorConfig, EmulatorState, create_app
from tests import pgserver

# Session-scoped real brokers (redis-server, rabbitmq-server) for the queue-source tests.
pytest_plugins = ["tests.brokers"]

API_KEY = "sk-test-0123456789abcdefSECRET"
KEY_ENV = "BATCHD_TEST_API_KEY"


@dataclass
class Emulator:
    state: EmulatorState
    url: str
    port: int


TOOL_MISSING = "tool missing:"  # the reason of a skip because a system tool is absent


def skip_without(name: str) -> str:
    """The path of a system tool the test needs, or a skip naming it (a failure in CI:
    `.ci/run` installs every tool, so a skip there would hide a broken install)."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{TOOL_MISSING} {name} is not installed")
    return path


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Under CI=true a test skipped for a missing tool fails instead."""
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and os.environ.get("CI") and TOOL_MISSING in str(rep.longrepr):
        rep.outcome = "failed"
        rep.longrepr = f"CI: {rep.longrepr}; .ci/run must install it"


@pytest.fixture(autouse=True)
def _quiet_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, API_KEY)
    for var in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):  # batchd honours
        monkeypatch.delenv(var, raising=False)  # them: the emulator is reached directly
        monkeypatch.delenv(var.upper(), raising=False)
    logs.setup(os.environ.get("BATCHD_TEST_LOG", "warning"), "json")


async def start_emulator(**kw: Any) -> tuple[Emulator, web.AppRunner]:
    """Start an emulator on a free loopback port."""
    kw.setdefault("time_scale", 0.01)
    kw.setdefault("api_key", API_KEY)
    state = EmulatorState(EmulatorConfig(**kw))
    runner = web.AppRunner(create_app(state), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    return Emulator(state, f"http://127.0.0.1:{port}/v1", port), runner


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    emu, runner = await start_emulator()
    yield emu
    await runner.cleanup()
    emu.state.close()


def make_config(tmp_path: Path, base_url: str, **sections: dict[str, Any]) -> Config:
    """A config for tests: fast polling, a spool and database in tmp_path."""
    data: dict[str, dict[str, Any]] = {
        "api": {"base_url": base_url, "api_key_env": KEY_ENV, "max_retries": 3},
        "spool": {"dir": str(tmp_path / "spool")},
        "state": {"database": str(tmp_path / "batchd.db")},
        "batch": {"poll_interval_seconds": 0.1},
        "http": {"listen": "127.0.0.1:0"},
        # Tests drop the same few lines in many jobs: the duplicate check is off unless a
        # test turns it on (tests/test_dropfolder.py).
        "intake": {"duplicate_window": "0"},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return config.parse(data, tmp_path, env={})


def chat_lines(
    n: int,
    model: str = "gpt-4o-mini",
    fail: Iterable[int] = (),
    hooks: Mapping[int, dict[str, Any]] | None = None,
) -> bytes:
    """n chat-completions request lines; indexes in `fail` are made to fail with HTTP 400,
    `hooks` gives other lines an emulator hook (e.g. {"expire": True}, {"status": 500})."""
    emulated = {i: {"status": 400} for i in fail} | dict(hooks or {})
    out = []
    for i in range(n):
        body: dict[str, Any] = {
            "model": model,
            "messages": [{"role": "user", "content": f"question {i}"}],
        }
        if i in emulated:
            body["x_emulator"] = emulated[i]
        out.append(
            orjson.dumps(
                {
                    "custom_id": f"req-{i}",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": body,
                }
            )
        )
    return b"\n".join(out) + b"\n"


def embedding_lines(n: int, model: str = "text-embedding-3-small") -> bytes:
    """n embeddings request lines (every third with a list input)."""
    out = []
    for i in range(n):
        inp: Any = [f"a{i}", f"b{i}"] if i % 3 == 0 else f"text {i}"
        out.append(
            orjson.dumps(
                {
                    "custom_id": f"emb-{i}",
                    "method": "POST",
                    "url": "/v1/embeddings",
                    "body": {"model": model, "input": inp},
                }
            )
        )
    return b"\n".join(out) + b"\n"


def drop(cfg: Config, name: str, data: bytes) -> Path:
    """Write elsewhere, then rename into inbox/ (the documented convention)."""
    inbox = cfg.spool.dir / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    tmp = cfg.spool.dir / f".{name}.part"
    tmp.write_bytes(data)
    dest = inbox / name
    os.replace(tmp, dest)
    return dest


async def run_once(cfg: Config, timeout: float = 60) -> Daemon:
    """Run the daemon with --once semantics to completion."""
    d = Daemon(cfg, once=True)
    await asyncio.wait_for(d.run(), timeout)
    return d


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Parse a JSONL file."""
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def config_file(
    tmp_path: Path,
    base_url: str,
    listen: str = "127.0.0.1:0",
    poll: float = 0.1,
    extra: str = "",
    name: str = "batchd.toml",
) -> Path:
    """A TOML config file for subprocess tests (spool and database beside it)."""
    p = tmp_path / name
    p.write_text(
        f'[api]\nbase_url = "{base_url}"\napi_key_env = "{KEY_ENV}"\n'
        '[spool]\ndir = "spool"\n[state]\ndatabase = "batchd.db"\n'
        f'[batch]\npoll_interval_seconds = {poll}\n[http]\nlisten = "{listen}"\n' + extra
    )
    return p


def run_cli(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m batchd ARGS` as a real subprocess (the test's environment by default)."""
    return subprocess.run(
        [sys.executable, "-m", "batchd", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parent.parent,
        env=None if env is None else dict(env),
    )


# --- PostgreSQL (one server per session, one database per test) ---------------------------


async def _pg_template(server: pgserver.PgServer) -> None:
    """The database every test's is cloned from, migrated once."""
    import asyncpg

    from batchd.store import Store

    conn = await asyncpg.connect(server.url())
    try:
        await conn.execute("CREATE DATABASE batchd_template")
    finally:
        await conn.close()
    await (await Store.open(server.url("batchd_template"))).close()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[pgserver.PgServer]:
    """A PostgreSQL server for the session (skipped locally when none is installed)."""
    initdb, pg_ctl = pgserver.pg_bin("initdb"), pgserver.pg_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip(f"{TOOL_MISSING} initdb (Debian's postgresql) is not installed")
    server = pgserver.start(initdb, pg_ctl)
    try:
        # In a thread: the first test to ask may be inside a running event loop.
        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, _pg_template(server)).result()
        yield server
    finally:
        server.stop()


@pytest.fixture
async def pg_url(pg_server: pgserver.PgServer) -> str:
    """The URL of a fresh, migrated PostgreSQL database."""
    return await pg_server.new_database()


@pytest.fixture(params=["sqlite", "postgresql"])
async def db_target(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    """A fresh store's target on each backend: a SQLite file, then a PostgreSQL URL."""
    if request.param == "sqlite":
        return tmp_path / "s.db"
    server: pgserver.PgServer = request.getfixturevalue("pg_server")
    return await server.new_database()
