"""Built-in OpenAI Batch API emulator (aiohttp) for ``batchd demo``, tests and benchmarks.

Token estimate, failure and expiry hooks: see :mod:`batchd.emulator.lines`.
"""

from batchd.emulator.app import STATE_KEY, create_app, serve
from batchd.emulator.lines import estimate_tokens
from batchd.emulator.state import EmulatorConfig, EmulatorState

__all__ = ["STATE_KEY", "EmulatorConfig", "EmulatorState", "create_app", "estimate_tokens", "serve"]
