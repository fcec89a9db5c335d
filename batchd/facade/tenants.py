"""Tenants: API keys (held only as SHA-256 digests) mapped to names, looked up in constant
time; each tenant's optional webhook endpoint and signing key."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field

from batchd.config import ConfigError, FacadeConfig


@dataclass(frozen=True)
class Tenant:
    """A tenant as the running daemon knows it: no key, only the key's digest."""

    name: str
    digest: bytes = field(repr=False)
    webhook_url: str | None = None
    webhook_key: bytes | None = field(default=None, repr=False)


def load(cfg: FacadeConfig) -> dict[str, Tenant]:
    """Read every tenant's key (file or digest) and webhook secret; raises ConfigError."""
    out: dict[str, Tenant] = {}
    seen: dict[bytes, str] = {}
    for name, t in cfg.tenants.items():
        digest = t.key_digest()
        if digest in seen:
            raise ConfigError(f"[facade.tenants.{name}]: the same API key as tenant {seen[digest]}")
        seen[digest] = name
        out[name] = Tenant(name, digest, t.webhook_url, t.webhook_key())
    return out


class Keys:
    """Which tenant an API key belongs to."""

    def __init__(self, tenants: Mapping[str, Tenant]) -> None:
        self._tenants = list(tenants.values())

    def tenant(self, key: str) -> Tenant | None:
        """The tenant of `key`, or None. Every digest is compared (constant time), so the
        answer's timing says nothing about which tenant, or how much of a key, matched."""
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        found = None
        for t in self._tenants:
            if hmac.compare_digest(digest, t.digest):
                found = t
        return found
