"""Every emulated provider API, by name; each lives under its own URL prefix.

- openai: ``/v1`` (SDK ``base_url=http://HOST:PORT/v1``)
- azure: ``/azure/openai/...?api-version=`` and ``/azure/openai/v1`` (``AzureOpenAI(
  azure_endpoint=http://HOST:PORT/azure)`` or ``OpenAI(base_url=.../azure/openai/v1)``)
- groq: ``/groq/openai/v1`` (``Groq(base_url=http://HOST:PORT/groq)``)
- together: ``/together/v1`` (``Together(base_url=http://HOST:PORT/together)``)
- anthropic: ``/anthropic/v1/messages/batches`` (``Anthropic(base_url=http://HOST:PORT/anthropic)``)
- gemini: ``/gemini/v1beta`` and ``/gemini/upload/v1beta`` (``genai.Client(http_options=
  {"base_url": "http://HOST:PORT/gemini"})``)
- mistral: ``/mistral/v1`` (``Mistral(server_url=http://HOST:PORT/mistral)``)
"""

from __future__ import annotations

from batchd.emulator.providers.anthropic import Anthropic
from batchd.emulator.providers.base import Provider
from batchd.emulator.providers.gemini import Gemini
from batchd.emulator.providers.mistral import Mistral
from batchd.emulator.providers.openai import Azure, Groq, OpenAI
from batchd.emulator.providers.together import Together

PROVIDERS: dict[str, type[Provider]] = {
    "openai": OpenAI,
    "azure": Azure,
    "groq": Groq,
    "together": Together,
    "anthropic": Anthropic,
    "gemini": Gemini,
    "mistral": Mistral,
}

PREFIXES = {  # where each API's SDK base URL points (besides the host)
    "openai": "/v1",
    "azure": "/azure",
    "groq": "/groq",
    "together": "/together",
    "anthropic": "/anthropic",
    "gemini": "/gemini",
    "mistral": "/mistral",
}

__all__ = ["PREFIXES", "PROVIDERS", "Provider"]
