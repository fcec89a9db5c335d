"""`[providers.NAME]` tables: one batch API each, beside `[api]` (the default provider,
named "openai"). Every error names the key, as the rest of the config does.

```toml
[providers.claude]                       # NAME = claude: inbox/claude/, ?provider=claude
kind = "anthropic"                       # openai | azure_openai | anthropic | gemini |
                                         # mistral | groq | together
base_url = "https://api.anthropic.com"   # as the provider's own SDK takes it
api_key_env = "ANTHROPIC_API_KEY"        # or api_key_file, or the systemd credential
                                         # api_key_credential (default NAME_api_key)
```
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchd.config import (
    DEFAULT_BASE_URL,
    ApiConfig,
    ConfigError,
    LimitsConfig,
    UploadConfig,
    _get,
    _int,
    _path,
    _positive,
    _tls_and_proxy,
)

DEFAULT_PROVIDER = "openai"  # the NAME of the provider [api] configures
NAME_RE = re.compile(r"[a-z][a-z0-9_]*(-[a-z0-9_]+)*")
MB = 1_000_000


@dataclass(frozen=True)
class Kind:
    """What a provider kind defaults to, and the most one batch may hold."""

    base_url: str | None  # None: must be configured (Azure: the resource's endpoint)
    api_key_env: str
    max_requests: int
    max_bytes: int
    options: frozenset[str] = frozenset()  # kind-specific keys accepted


KINDS: dict[str, Kind] = {
    "openai": Kind(
        DEFAULT_BASE_URL,
        "OPENAI_API_KEY",
        50_000,
        200 * MB,
        frozenset({"organization", "project", "completion_window", "output_expires_after_seconds"}),
    ),
    # Azure: the resource endpoint, as AzureOpenAI(azure_endpoint=...) takes it; batchd
    # adds /openai (classic, with api_version) or /openai/v1 (the v1 API, no api_version).
    "azure_openai": Kind(
        None,
        "AZURE_OPENAI_API_KEY",
        100_000,
        200 * MB,
        frozenset(
            {
                "api_version",
                "auth",
                "deployments",
                "completion_window",
                "output_expires_after_seconds",
            }
        ),
    ),
    # 256 MB per Message Batch request body; the lines are most of it.
    "anthropic": Kind(
        "https://api.anthropic.com",
        "ANTHROPIC_API_KEY",
        100_000,
        250 * MB,
        frozenset({"api_version"}),
    ),
    "gemini": Kind(
        "https://generativelanguage.googleapis.com",
        "GEMINI_API_KEY",
        100_000,
        200 * MB,
        frozenset({"api_version", "model", "inline_max_bytes"}),
    ),
    "mistral": Kind(
        "https://api.mistral.ai",
        "MISTRAL_API_KEY",
        100_000,
        200 * MB,
        frozenset({"model", "endpoint", "timeout_hours"}),
    ),
    "groq": Kind(
        "https://api.groq.com", "GROQ_API_KEY", 50_000, 100 * MB, frozenset({"completion_window"})
    ),
    "together": Kind(
        "https://api.together.xyz",
        "TOGETHER_API_KEY",
        50_000,
        100 * MB,
        frozenset({"completion_window"}),
    ),
}

_COMMON = frozenset(
    {
        "kind",
        "base_url",
        "api_key_env",
        "api_key_file",
        "api_key_credential",
        "request_timeout_seconds",
        "max_retries",
        "proxy",
        "ca_file",
        "client_cert_file",
        "client_key_file",
        "max_requests_per_batch",
        "max_bytes_per_batch",
    }
)
_GROQ_WINDOW = re.compile(r"([1-9][0-9]*)([hd])")


@dataclass(frozen=True)
class ProviderConfig:
    """One provider: its kind, how to reach it (`api`), and its per-batch limits."""

    name: str
    kind: str
    api: ApiConfig
    limits: LimitsConfig
    section: str = "[api]"  # the config table, for messages
    upload: UploadConfig = field(default_factory=UploadConfig)
    completion_window: str = "24h"
    output_expires_after_seconds: int | None = None
    api_version: str | None = None  # Azure api-version (None: v1 API); anthropic-version;
    #                                 Gemini's API version (v1beta)
    auth: str = "api_key"  # Azure: "api_key" (api-key header) or "entra" (bearer token)
    deployments: tuple[str, ...] = ()  # Azure batch deployments lines may name (empty: any)
    model: str | None = None  # Gemini / Mistral: the job's model when lines name none
    endpoint: str | None = None  # Mistral: the batch endpoint (/v1/chat/completions)
    timeout_hours: int = 24  # Mistral
    inline_max_bytes: int = 1 * MB  # Gemini: inputs up to this size go inline (0: never)


def default_provider(
    api: ApiConfig,
    limits: LimitsConfig,
    upload: UploadConfig,
    window: str,
    expires: int | None,
) -> ProviderConfig:
    """The provider `[api]`, `[limits]`, `[upload]` and `[batch]` configure."""
    return ProviderConfig(
        DEFAULT_PROVIDER,
        "openai",
        api,
        limits,
        "[api]",
        upload,
        window,
        expires,
    )


def _window(kind: str, s: str, t: Mapping[str, Any]) -> str:
    window: str = _get(t, s, "completion_window", str, "24h")
    if kind == "groq":
        m = _GROQ_WINDOW.fullmatch(window)
        hours = int(m.group(1)) * (24 if m.group(2) == "d" else 1) if m else 0
        if not 24 <= hours <= 168:
            raise ConfigError(
                f'[{s}] completion_window: "24h" to "7d" (e.g. "48h"), got {window!r}'
            )
    elif window != "24h":
        raise ConfigError(f'[{s}] completion_window: only "24h" is supported, got {window!r}')
    return window


def _options(kind: str, s: str, t: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if kind == "azure_openai":
        out["api_version"] = _get(t, s, "api_version", str, None)
        auth = _get(t, s, "auth", str, "api_key")
        if auth not in ("api_key", "entra"):
            raise ConfigError(f'[{s}] auth: "api_key" or "entra", got {auth!r}')
        out["auth"] = auth
        deployments = _get(t, s, "deployments", list, [])
        if not all(isinstance(d, str) and d for d in deployments):
            raise ConfigError(f"[{s}] deployments: a list of deployment names")
        out["deployments"] = tuple(deployments)
    elif kind == "anthropic":
        out["api_version"] = _get(t, s, "api_version", str, "2023-06-01")
    elif kind == "gemini":
        version = _get(t, s, "api_version", str, "v1beta")
        if version not in ("v1beta", "v1"):
            raise ConfigError(f'[{s}] api_version: "v1beta" or "v1", got {version!r}')
        out["api_version"] = version
        out["model"] = _get(t, s, "model", str, None)
        out["inline_max_bytes"] = _int(t, s, "inline_max_bytes", 1 * MB, 0, 20 * MB)
    elif kind == "mistral":
        out["model"] = _get(t, s, "model", str, None)
        endpoint = _get(t, s, "endpoint", str, "/v1/chat/completions")
        if not endpoint.startswith("/v1/"):
            raise ConfigError(
                f'[{s}] endpoint: a path like "/v1/chat/completions", got {endpoint!r}'
            )
        out["endpoint"] = endpoint
        out["timeout_hours"] = _int(t, s, "timeout_hours", 24, 1, 168)
    return out


def parse_one(name: str, t: Any, base: Path, upload: UploadConfig) -> ProviderConfig:
    """One `[providers.NAME]` table."""
    s = f"providers.{name}"
    if not isinstance(t, dict):
        raise ConfigError(f"[{s}]: must be a table")
    if name == DEFAULT_PROVIDER:
        raise ConfigError(
            f"[{s}]: the name {DEFAULT_PROVIDER!r} is [api]'s (the default provider); "
            "choose another NAME"
        )
    if not NAME_RE.fullmatch(name) or len(name) > 32:
        raise ConfigError(f"[{s}]: NAME must be 1..32 of a-z 0-9 _ and single '-', a letter first")
    kind = _get(t, s, "kind", str, None)
    if kind not in KINDS:
        raise ConfigError(f"[{s}] kind: one of {', '.join(KINDS)}, got {kind!r}")
    k = KINDS[kind]
    for key in t:
        if key not in _COMMON and key not in k.options:
            raise ConfigError(f"[{s}] {key}: unknown key for kind {kind!r}")
    url = _get(t, s, "base_url", str, k.base_url)
    if url is None:
        raise ConfigError(f"[{s}] base_url: required for kind {kind!r}")
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"[{s}] base_url: must start with http:// or https://, got {url!r}")
    api = ApiConfig(
        base_url=url.rstrip("/"),
        api_key_env=_get(t, s, "api_key_env", str, k.api_key_env),
        api_key_file=_path(base, _get(t, s, "api_key_file", str, None)),
        organization=_get(t, s, "organization", str, None),
        project=_get(t, s, "project", str, None),
        request_timeout_seconds=_positive(
            s, "request_timeout_seconds", _get(t, s, "request_timeout_seconds", float, 60.0)
        ),
        max_retries=int(_positive(s, "max_retries", _get(t, s, "max_retries", int, 6))),
        credential=_get(t, s, "api_key_credential", str, f"{name}_api_key"),
        **_tls_and_proxy(t, base, s),
    )
    limits = LimitsConfig(
        _int(t, s, "max_requests_per_batch", k.max_requests, 1, k.max_requests),
        _int(t, s, "max_bytes_per_batch", k.max_bytes, 1024, k.max_bytes),
        50_000,
    )
    expires = _get(t, s, "output_expires_after_seconds", int, None)
    if expires is not None and not 3600 <= expires <= 2_592_000:
        raise ConfigError(
            f"[{s}] output_expires_after_seconds: must be 3600..2592000, got {expires}"
        )
    return ProviderConfig(
        name,
        kind,
        api,
        limits,
        f"[{s}]",
        upload,
        _window(kind, s, t),
        expires,
        **_options(kind, s, t),
    )


def parse_providers(t: Any, base: Path, upload: UploadConfig) -> dict[str, ProviderConfig]:
    """Every `[providers.NAME]` table."""
    if not isinstance(t, dict):
        raise ConfigError("[providers]: must be a table of [providers.NAME] tables")
    return {name: parse_one(name, table, base, upload) for name, table in t.items()}
