"""The configured providers by NAME, built from the config; `[api]` is "openai".

One module per provider API: openai (with the presets groq and together),
azure (azure_openai), anthropic, gemini, mistral; `base.Provider` is the interface.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping

from batchd.config import Config
from batchd.metrics import Metrics
from batchd.provider_config import DEFAULT_PROVIDER, ProviderConfig
from batchd.providers.base import Provider

# kind -> (module, class)
_IMPL = {
    "openai": ("batchd.providers.openai", "OpenAI"),
    "groq": ("batchd.providers.presets", "Groq"),
    "together": ("batchd.providers.presets", "Together"),
    "azure_openai": ("batchd.providers.azure", "Azure"),
    "anthropic": ("batchd.providers.anthropic", "Anthropic"),
    "gemini": ("batchd.providers.gemini", "Gemini"),
    "mistral": ("batchd.providers.mistral", "Mistral"),
}


def provider_class(kind: str) -> type[Provider]:
    """The Provider implementation of a kind."""
    module, cls = _IMPL[kind]
    found: type[Provider] = getattr(importlib.import_module(module), cls)
    return found


def make(cfg: ProviderConfig, api_key: str | None, metrics: Metrics) -> Provider:
    """A provider for one config table."""
    return provider_class(cfg.kind)(cfg, api_key, metrics)


class Providers(Mapping[str, Provider]):
    """Every configured provider by NAME (the default first); opened and closed together."""

    def __init__(self, providers: Mapping[str, Provider], default: str = DEFAULT_PROVIDER) -> None:
        self._by_name = dict(providers)
        self.default_name = default if default in self._by_name else next(iter(self._by_name))

    @classmethod
    def single(cls, provider: Provider) -> Providers:
        """Just one provider (tests, tools)."""
        return cls({provider.name: provider}, provider.name)

    @classmethod
    def build(
        cls, cfg: Config, metrics: Metrics, keys: Mapping[str, str | None] | None = None
    ) -> Providers:
        """A provider per configured table; `keys` by NAME (default: read now; a key
        that cannot be read raises OSError)."""
        out: dict[str, Provider] = {}
        for name, pc in cfg.provider_configs().items():
            key = keys.get(name) if keys is not None else pc.api.api_key()
            out[name] = make(pc, key, metrics)
        return cls(out)

    def __getitem__(self, name: str) -> Provider:
        return self._by_name[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)

    def of(self, name: str | None) -> Provider:
        """The provider of a job (None: one recorded before providers existed)."""
        if name is None:
            return self.default
        try:
            return self._by_name[name]
        except KeyError:
            raise UnknownProvider(name) from None

    @property
    def default(self) -> Provider:
        """The default provider ([api])."""
        return self._by_name[self.default_name]

    async def __aenter__(self) -> Providers:
        for p in self._by_name.values():
            await p.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for p in self._by_name.values():
            await p.__aexit__(*exc)


class UnknownProvider(KeyError):
    """A job names a provider no longer configured (its jobs wait until it is again)."""


__all__ = ["DEFAULT_PROVIDER", "Provider", "Providers", "UnknownProvider", "make"]
