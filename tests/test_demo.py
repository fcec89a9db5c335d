"""`batchd demo`: OpenAI, Anthropic and Azure jobs side by side, no API key, quick."""

from __future__ import annotations

from pathlib import Path

import orjson

from tests.conftest import run_cli


def test_demo_runs_three_providers_to_done(tmp_path: Path) -> None:
    r = run_cli("demo", "--dir", str(tmp_path / "demo"))
    assert r.returncode == 0, r.stdout + r.stderr
    kinds = {}
    for name in ("requests", "haiku", "tickets"):
        info = orjson.loads((tmp_path / "demo/spool/done" / name / "job.json").read_bytes())
        assert info["status"] == "done"
        kinds[name] = info["kind"]
    assert kinds == {"requests": "openai", "haiku": "anthropic", "tickets": "azure_openai"}
    assert "[claude: anthropic]" in r.stdout and "(ended)" in r.stdout
