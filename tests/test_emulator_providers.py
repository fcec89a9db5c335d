"""The emulator's provider registry: every API under its prefix in one server, the
``--provider`` filter of ``batchd emulator``, per-API error envelopes. The SDK conformance
tests live in ``test_emulator_{anthropic,gemini,mistral,openai_compat}.py``."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import orjson

from batchd.cli import PROVIDER_NAMES
from batchd.emulator.faults import FaultConfig
from batchd.emulator.providers import PREFIXES, PROVIDERS
from tests.emulator_server import KEY, serve

ROOT = Path(__file__).resolve().parent.parent


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, object]]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, orjson.loads(r.read())
    except urllib.error.HTTPError as e:
        raw = e.read()
        return e.code, orjson.loads(raw) if raw.startswith(b"{") else {}


def test_names_agree() -> None:
    assert tuple(PROVIDERS) == PROVIDER_NAMES == tuple(PREFIXES)


def test_error_envelopes_per_api_and_stats() -> None:
    faults = FaultConfig(rate_limit=1.0, routes=frozenset({"GET /anthropic/v1/messages/batches"}))
    with serve(faults=faults) as srv:
        status, body = get(f"{srv.url}/anthropic/v1/messages/batches", {"x-api-key": KEY})
        assert status == 400 and body["type"] == "error"  # no anthropic-version header
        status, body = get(
            f"{srv.url}/anthropic/v1/messages/batches",
            {"x-api-key": KEY, "anthropic-version": "2023-06-01"},
        )
        assert status == 429 and body["error"] == {  # type: ignore[comparison-overlap]
            "type": "rate_limit_error",
            "message": "Rate limit reached (emulated).",
        }
        status, body = get(f"{srv.url}/gemini/v1beta/batches/nope", {"x-goog-api-key": KEY})
        assert status == 404 and body["error"]["status"] == "NOT_FOUND"  # type: ignore[index]
        status, body = get(f"{srv.url}/mistral/v1/batch/jobs/nope")
        assert status == 401 and body["object"] == "error"
        status, body = get(f"{srv.url}/azure/openai/batches", {"api-key": KEY})
        assert status == 400 and body["error"]["code"] == "MissingApiVersionParameter"  # type: ignore[index]
        status, stats = get(f"{srv.url}/_emulator/stats")
        calls = stats["calls"]
        assert isinstance(calls, dict) and calls["GET /anthropic/v1/messages/batches"] == 2
        assert stats["fault_counts"] == {"rate_limit": 1}


def test_cli_provider_filter() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchd", "emulator", "--port", str(port), "--provider", "gemini"],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                status, body = get(f"{base}/gemini/v1beta/batches", {"x-goog-api-key": "k"})
                break
            except (ConnectionError, urllib.error.URLError):
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.1)
        assert status == 200 and body == {"operations": []}
        assert get(f"{base}/v1/batches", {"Authorization": "Bearer k"})[0] == 404
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert f"gemini    {base}/gemini" in err and "/anthropic" not in err
