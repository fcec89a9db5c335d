"""[providers.NAME] tables: defaults per kind, and errors that name the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from batchd import config
from batchd.config import ConfigError


def parse(tmp_path: Path, providers: dict[str, Any]) -> config.Config:
    return config.parse({"providers": providers}, tmp_path, env={})


def test_defaults_per_kind(tmp_path: Path) -> None:
    cfg = parse(
        tmp_path,
        {
            "claude": {"kind": "anthropic"},
            "gem": {"kind": "gemini", "model": "gemini-2.5-flash"},
            "az": {"kind": "azure_openai", "base_url": "https://r.openai.azure.com/"},
        },
    )
    pcs = cfg.provider_configs()
    assert list(pcs) == ["openai", "claude", "gem", "az"]  # [api] first, named openai
    c = pcs["claude"]
    assert (c.api.base_url, c.api.api_key_env) == ("https://api.anthropic.com", "ANTHROPIC_API_KEY")
    assert c.api.credential == "claude_api_key" and c.api_version == "2023-06-01"
    assert (c.limits.max_requests_per_batch, c.limits.max_bytes_per_batch) == (
        100_000,
        250_000_000,
    )
    assert c.section == "[providers.claude]"
    assert pcs["gem"].api_version == "v1beta" and pcs["gem"].inline_max_bytes == 1_000_000
    az = pcs["az"]
    assert az.api.base_url == "https://r.openai.azure.com" and az.api_version is None
    assert az.auth == "api_key" and az.api.api_key_env == "AZURE_OPENAI_API_KEY"


@pytest.mark.parametrize(
    ("table", "says"),
    [
        ({"kind": "bedrock"}, "[providers.p] kind: one of openai"),
        ({"kind": "anthropic", "deployments": ["x"]}, "[providers.p] deployments: unknown key"),
        ({"kind": "azure_openai"}, "[providers.p] base_url: required"),
        ({"kind": "groq", "completion_window": "2h"}, '"24h" to "7d"'),
        ({"kind": "together", "completion_window": "48h"}, 'only "24h"'),
        ({"kind": "anthropic", "max_requests_per_batch": 200_000}, "1..100000"),
        ({"kind": "azure_openai", "base_url": "https://x", "auth": "oauth"}, '"entra"'),
        ({"kind": "gemini", "api_version": "v2"}, '"v1beta" or "v1"'),
        ({"kind": "mistral", "timeout_hours": 500}, "timeout_hours: must be 1..168"),
        ({"kind": "mistral", "endpoint": "chat"}, "endpoint: a path"),
        ({"kind": "anthropic", "base_url": "api.anthropic.com"}, "must start with http"),
        ("anthropic", "[providers.p]: must be a table"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, table: Any, says: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse(tmp_path, {"p": table})
    assert says in str(e.value)


def test_names(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="the default provider"):
        parse(tmp_path, {"openai": {"kind": "openai"}})
    for bad in ("Claude", "a--b", "1x", "x/y", "a" * 33):
        with pytest.raises(ConfigError, match="NAME must be"):
            parse(tmp_path, {bad: {"kind": "anthropic"}})
    assert "eu-west_2" in parse(tmp_path, {"eu-west_2": {"kind": "openai"}}).providers


def test_a_changed_provider_needs_a_restart(tmp_path: Path) -> None:
    old = parse(tmp_path, {"p": {"kind": "anthropic"}})
    new = parse(tmp_path, {"p": {"kind": "anthropic", "max_retries": 2}})
    assert "providers" in config.changed_keys(old, new)
    assert "providers" not in config.changed_keys(old, old)
