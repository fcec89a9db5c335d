"""Every emulated provider API, by name; each lives under its own URL prefix.

- openai: ``/v1`` (SDK ``base_url=http://HOST:PORT/v1``)
- azure: ``/azure/openai/...?api-version=`` and ``/azure/openai/v1`` (``AzureOpenAI(
  azure_endpoint=http://HOST:PORT/azure)`` or ``OpenAI(base_url=.../azure/openai/v1)``)
- groq: ``/groq/openai/v1`` (``Groq(base_url=http://HOST:PORT/groq)``)
"""

from __future__ import annotations

from batchd.emulator.providers.base import Handler, Provider
from batchd.emulator.providers.openai import Azure, Groq, OpenAI
from batchd.emulator.state import EmulatorState

PROVIDERS: dict[str, type[Provider]] = {
    "openai": OpenAI,
    "azure": Azure,
    "groq": Groq,
}


def presigned_routes(state: EmulatorState) -> list[tuple[str, str, Handler]]:
    """Routes outside every API prefix (no auth, no faults), e.g. presigned upload URLs."""
    return []


__all__ = ["PROVIDERS", "Provider", "presigned_routes"]
