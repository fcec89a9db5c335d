"""The official Node SDK (`openai` from npm, run with node) against a live batchd facade:
upload, create, retrieve, content, the Uploads API, cancel, auto-paging over 105 batches,
tenant isolation, and `webhooks.unwrap` of batchd's signed events.

The package is installed once into BATCHD_NODE_CACHE (default ~/.cache/batchd-tests/node);
`.ci/run` installs node and npm. Without them the test skips locally and fails in CI.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import orjson
import pytest

from tests.conftest import skip_without
from tests.emulator_server import serve
from tests.facade_support import KEYS, WEBHOOK_SECRET, daemon, receiver, wait_for, write_config

HERE = Path(__file__).resolve().parent / "node"


def _package(node: str) -> str:
    """openai 7 asks for node >= 22 but runs on 20 (tested); older nodes get openai 6."""
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30)
    major = int(version.stdout.strip().lstrip("v").split(".")[0] or 0)
    return "openai@^7" if major >= 20 else "openai@^6"


@pytest.fixture(scope="session")
def node_modules() -> Path:
    package = _package(skip_without("node"))
    npm = skip_without("npm")
    default = Path.home() / ".cache" / "batchd-tests" / "node"
    cache = Path(os.environ.get("BATCHD_NODE_CACHE", default)) / package.replace("@^", "-")
    if not (cache / "node_modules" / "openai" / "package.json").exists():
        cache.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            [npm, "install", "--prefix", str(cache), "--no-audit", "--no-fund", package],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if done.returncode != 0:
            why = f"npm install {package} failed: {done.stderr[-1000:]}"
            if os.environ.get("CI"):
                pytest.fail(why)
            pytest.skip(why)
    return cache / "node_modules"


def _node(script: str, node_modules: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [skip_without("node"), str(HERE / script)],
        capture_output=True,
        text=True,
        timeout=110,
        env={**os.environ, "NODE_PATH": str(node_modules), **env},
    )


def test_node_sdk_against_the_facade(node_modules: Path, tmp_path: Path) -> None:
    with (
        serve(time_scale=0.1) as emu,
        receiver() as hooks,
        daemon(write_config(tmp_path, emu.url, webhook_url=hooks.url)) as live,
    ):
        env = {"BASE_URL": live.base + "/v1", "KEY_A": KEYS["alpha"], "KEY_B": KEYS["beta"]}
        done = _node("facade.cjs", node_modules, env)
        assert done.returncode == 0, done.stderr[-3000:] + live.text()[-3000:]
        result = orjson.loads(done.stdout.strip().splitlines()[-1])
        assert result["ok"] and result["listed"] == 105

        def delivered() -> tuple[dict[str, str], bytes] | None:
            mine = [g for g in hooks.got if orjson.loads(g[1])["data"]["id"] == result["batch"]]
            return mine[0] if mine else None

        headers, body = wait_for(delivered, 30, "batch.completed delivered")
        env = {"PAYLOAD": body.decode(), "HEADERS": orjson.dumps(headers).decode()}
        unwrapped = _node("unwrap.cjs", node_modules, {**env, "SECRET": WEBHOOK_SECRET})
        assert unwrapped.returncode == 0, unwrapped.stderr
        event = orjson.loads(unwrapped.stdout)
        assert event == {"type": "batch.completed", "id": result["batch"]}
