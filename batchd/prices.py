"""Batch prices per (provider, model): the genai-prices database, batch discounts, [prices].

Money in batchd is an integer number of nano-dollars (1e-9 USD) everywhere: prices
(nano-dollars per million tokens), estimates, actual costs, budgets. Integers are exact,
fast to sum, and fit SQLite's INTEGER (up to ~9.2 billion USD). Micro-dollars would not
do: one embedding request of 10 tokens at $0.01 per million tokens costs 0.1 µ$, so
rounding each request to micro-dollars would lose whole dollars over a month. Decimal
is exact too, but SQLite would sum it as a float. Every published per-token price
(even $0.0001 per million tokens) is a whole number of nano-dollars per million tokens,
so a cost is sum(tokens x rate) / 1e6 in integers, rounded once.

An unknown model or price is an `Unknown` value with a reason, never 0.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Final
from urllib.parse import urlsplit

from batchd.config import NANOS_PER_USD, PriceOverride

__all__ = [
    "BATCH_DISCOUNT",
    "NANOS_PER_USD",
    "Price",
    "PriceBook",
    "Rates",
    "Unknown",
    "format_usd",
    "price_source",
    "provider_for_base_url",
    "to_nanos",
]

MTOK: Final = 1_000_000

# Used only when the price database has no batch price for a model (its batch prices are
# modelled as `price_context={"processing": "batch"}` variants since genai-prices 0.2):
# the factor applied to every rate. Sources are tagged as in shared/reference/providers.md.
BATCH_DISCOUNT: Final[Mapping[str, Decimal]] = {
    # Batch API: 50 % off input and output [O1/providers.md §1 "50% (known)"].
    "openai": Decimal("0.5"),
    # Global Batch / Data Zone Batch: 50 % less than Global Standard [Z1].
    "azure": Decimal("0.5"),
    # Message Batches: 50 % of standard prices; caching multipliers stack [A4].
    "anthropic": Decimal("0.5"),
    # Gemini Batch Mode: 50 % of the interactive price [G7].
    "google": Decimal("0.5"),
    # Mistral batch inference: 50 % [M5].
    "mistral": Decimal("0.5"),
    # Fireworks batch inference: 50 % [F2].
    "fireworks": Decimal("0.5"),
    # Groq: 25 % per the stored docs [Q2]; a later 50 % is unconfirmed, so the smaller
    # (costlier, safer for budgets) discount is used.
    "groq": Decimal("0.75"),
    # Together discounts only listed models [T3]: no general factor (list price).
}


@dataclass(frozen=True)
class Unknown:
    """A price or cost that cannot be known; shown as "unknown", never counted as $0."""

    reason: str

    def __str__(self) -> str:
        return "unknown"


@dataclass(frozen=True)
class Rates:
    """Nano-dollars per million tokens of each kind."""

    input: int
    cached_input: int
    cache_write: int
    output: int

    def amount(self, input_tokens: int, cached: int, cache_write: int, output: int) -> int:
        """sum(tokens x rate), in nano-dollars x 1e6 (exact; divide by 1e6 once at the end)."""
        uncached = max(input_tokens - cached - cache_write, 0)
        return (
            uncached * self.input
            + cached * self.cached_input
            + cache_write * self.cache_write
            + output * self.output
        )


@dataclass(frozen=True)
class Price:
    """The batch price of one model, with long-context tiers (thresholds on prompt tokens)."""

    provider: str
    model: str
    rates: tuple[Rates, ...]  # rates[0] is the base; rates[i] applies above thresholds[i-1]
    thresholds: tuple[int, ...] = ()
    source: str = ""  # where the price comes from, for reports and logs

    def tier(self, prompt_tokens: int) -> int:
        """Index into `rates` for a request with this many prompt tokens (cached included)."""
        # A tier starting at N applies to a request of more than N prompt tokens, to all
        # of its tokens (the "cliff" model of Anthropic, Google, OpenAI and genai-prices).
        return bisect.bisect_left(self.thresholds, prompt_tokens) if self.thresholds else 0

    def amount(
        self, input_tokens: int, cached: int = 0, cache_write: int = 0, output: int = 0
    ) -> int:
        """Exact cost of one request in nano-dollars x 1e6 (sum these, then `round_amount`)."""
        rates = self.rates[self.tier(input_tokens)]
        return rates.amount(input_tokens, cached, cache_write, output)

    def cost(
        self, input_tokens: int, cached: int = 0, cache_write: int = 0, output: int = 0
    ) -> int:
        """Cost of one request in nano-dollars."""
        return round_amount(self.amount(input_tokens, cached, cache_write, output))


def round_amount(amount: int) -> int:
    """Nano-dollars from an exact `amount` (nano-dollars x 1e6), rounding half up."""
    return (amount + MTOK // 2) // MTOK


def to_nanos(usd: Decimal | int | str) -> int:
    """Nano-dollars of an amount of USD (rounded half up to a nano-dollar)."""
    d = Decimal(usd) * NANOS_PER_USD
    return int(d.to_integral_value(ROUND_HALF_UP))


def format_usd(nanos: int | Unknown, places: int = 2) -> str:
    """`$12.35` (at least `places` decimals, more for sub-cent amounts), or "unknown"."""
    if isinstance(nanos, Unknown):
        return "unknown"
    usd = Decimal(nanos) / NANOS_PER_USD
    if nanos and abs(usd) < Decimal(1).scaleb(-places):
        return f"${usd.normalize():f}"  # a tiny amount is not shown as $0.00
    return f"${usd.quantize(Decimal(1).scaleb(-places), ROUND_HALF_UP):,f}"


def provider_for_base_url(base_url: str) -> str:
    """The price-list provider of an API base URL; OpenAI's for anything OpenAI-compatible."""
    host = (urlsplit(base_url).hostname or "").lower()
    if host.endswith((".openai.azure.com", ".cognitiveservices.azure.com", ".azure-api.net")):
        return "azure"
    if host.endswith(".services.ai.azure.com"):
        return "azure"
    if host == "api.anthropic.com":
        return "anthropic"
    if host.endswith("generativelanguage.googleapis.com"):
        return "google"
    if host == "api.mistral.ai":
        return "mistral"
    # api.openai.com, the built-in emulator and OpenAI-compatible hosts speak OpenAI's
    # Batch API; they are priced as OpenAI unless [prices] says otherwise.
    return "openai"


# The price-list provider of each provider kind (batchd.provider_config.KINDS).
_KIND_PRICES: Final[Mapping[str, str]] = {
    "azure_openai": "azure",
    "anthropic": "anthropic",
    "gemini": "google",
    "mistral": "mistral",
    "groq": "groq",
    "together": "together",
}


def price_source(kind: str, base_url: str) -> str:
    """The price-list provider of a configured provider: its kind's, or for the openai
    kind the one its base URL names (OpenAI's for anything OpenAI-compatible)."""
    return _KIND_PRICES.get(kind) or provider_for_base_url(base_url)


def _nanos_per_mtok(value: Decimal) -> int:
    return to_nanos(value)


def _override_price(provider: str, model: str, o: PriceOverride) -> Price:
    assert o.input_per_mtok is not None and o.output_per_mtok is not None
    factor = Decimal(1) if o.batch else BATCH_DISCOUNT.get(provider, Decimal(1))
    cached = o.input_per_mtok if o.cached_input_per_mtok is None else o.cached_input_per_mtok
    rates = Rates(
        input=_nanos_per_mtok(o.input_per_mtok * factor),
        cached_input=_nanos_per_mtok(cached * factor),
        cache_write=_nanos_per_mtok(o.input_per_mtok * factor),
        output=_nanos_per_mtok(o.output_per_mtok * factor),
    )
    how = "batch prices" if o.batch else _discount_label(provider, factor)
    return Price(provider, model, (rates,), (), f'[prices."{model}"] ({how})')


def _discount_label(provider: str, factor: Decimal) -> str:
    if factor == 1:
        return f"list price: no batch discount known for {provider}"
    return f"list price x {factor:f}, the {provider} batch discount"


class PriceBook:
    """Batch prices of one provider's models: [prices] overrides first, then the database."""

    def __init__(
        self,
        provider: str,
        overrides: Mapping[str, PriceOverride] | None = None,
        database: Callable[[str, str, datetime], Price | Unknown] | None = None,
    ) -> None:
        """`database` looks a model up (default: genai-prices, imported on first use)."""
        self.provider = provider
        self.overrides = dict(overrides or {})
        self._database = database or database_price
        self._cache: dict[tuple[str, date], Price | Unknown] = {}

    def warm(self) -> None:
        """Load the price database now (it is otherwise loaded at the first lookup, which
        also builds its caches: ~0.5 s, then ~0.07 s, off the path of the first job)."""
        if self._database is database_price:
            database_price(self.provider, "gpt-4o-mini", datetime.now(UTC))

    def price(self, model: str, at: datetime | None = None) -> Price | Unknown:
        """The batch price of `model` at time `at` (default now); Unknown with a reason."""
        at = at or datetime.now(UTC)
        key = (model, at.astimezone(UTC).date())  # prices change at most daily
        if (hit := self._cache.get(key)) is None:
            hit = self._cache[key] = self._lookup(model, at, ())
        return hit

    def _override(self, model: str) -> tuple[str, PriceOverride] | None:
        if (o := self.overrides.get(model)) is not None:
            return model, o
        # "ft:gpt-4o-mini:acme:*" covers every model name with that prefix; longest wins.
        best: tuple[str, PriceOverride] | None = None
        for name, o in self.overrides.items():
            if name.endswith("*") and model.startswith(name[:-1]):
                if best is None or len(name) > len(best[0]):
                    best = (name, o)
        return best

    def _lookup(self, model: str, at: datetime, seen: tuple[str, ...]) -> Price | Unknown:
        if model in seen:
            return Unknown(f"[prices] same_as loops: {' -> '.join((*seen, model))}")
        found = self._override(model)
        if found is None:
            return self._database(self.provider, model, at)
        name, o = found
        if o.same_as is None:
            return _override_price(self.provider, model, o)
        target = self._lookup(o.same_as, at, (*seen, model))
        if isinstance(target, Unknown):
            return target
        return Price(
            self.provider,
            model,
            target.rates,
            target.thresholds,
            f'[prices."{name}"] same_as {o.same_as}: {target.source}',
        )


# --- the genai-prices database ---------------------------------------------------------


@functools.cache
def _genai() -> Any:
    # Imported on first use: loading the database takes ~0.3 s, which commands that
    # never price anything should not pay.
    import genai_prices

    return genai_prices


def database_version() -> str:
    """Version of the installed genai-prices package (the price database)."""
    return str(_genai().__version__)


def _rate_values(value: Any) -> tuple[Decimal, tuple[tuple[int, Decimal], ...]] | None:
    """(base, ((start, price), ...)) of a genai-prices Decimal or TieredPrices; None if absent."""
    if value is None:
        return None
    if isinstance(value, Decimal):
        return value, ()
    tiers = tuple((int(t.start), Decimal(t.price)) for t in value.tiers)
    return Decimal(value.base), tiers


def _at(rate: tuple[Decimal, tuple[tuple[int, Decimal], ...]], threshold: int | None) -> Decimal:
    """The rate in force above `threshold` prompt tokens (None = the base rate)."""
    base, tiers = rate
    price = base
    for start, p in tiers:
        if threshold is not None and threshold >= start:
            price = p
    return price


def database_price(provider: str, model: str, at: datetime) -> Price | Unknown:
    """The batch price of `model` from genai-prices: its batch variant, else list x discount."""
    gp = _genai()
    try:
        usage = gp.Usage(input_tokens=1, output_tokens=1)
        batch = gp.calc_price(
            usage,
            model,
            provider_id=provider,
            genai_request_timestamp=at,
            price_context={"processing": "batch"},
        )
        listed = gp.calc_price(usage, model, provider_id=provider, genai_request_timestamp=at)
    except LookupError as e:
        return Unknown(f"no price for {model!r} ({provider}) in genai-prices: {e}")
    mp = batch.model_price
    has_batch_price = mp != listed.model_price
    factor = Decimal(1) if has_batch_price else BATCH_DISCOUNT.get(provider, Decimal(1))
    version = database_version()
    priced = {k: v for k, v in vars(mp).items() if v is not None and not k.startswith("_")}
    if not priced:  # the database lists the model with no price at all: free (moderation)
        free = Rates(0, 0, 0, 0)
        return Price(provider, model, (free,), (), f"genai-prices {version}: free")
    inp = _rate_values(priced.get("input_mtok"))
    if inp is None:  # priced per audio hour, per character, per page ... not per token
        return Unknown(f"{model!r} ({provider}) has no per-token price in genai-prices")
    # Embeddings have no output price: they produce no output tokens.
    out = _rate_values(priced.get("output_mtok")) or (Decimal(0), ())
    cached = _rate_values(priced.get("cache_read_mtok")) or inp
    write = _rate_values(priced.get("cache_write_mtok")) or inp
    starts = sorted({s for r in (inp, out, cached, write) for s, _ in r[1]})
    rates = tuple(
        Rates(
            input=_nanos_per_mtok(_at(inp, t) * factor),
            cached_input=_nanos_per_mtok(_at(cached, t) * factor),
            cache_write=_nanos_per_mtok(_at(write, t) * factor),
            output=_nanos_per_mtok(_at(out, t) * factor),
        )
        for t in (None, *starts)
    )
    if has_batch_price:
        source = f"genai-prices {version}: batch price of {batch.model.id}"
    else:
        source = f"genai-prices {version}: {batch.model.id}, {_discount_label(provider, factor)}"
    return Price(provider, model, rates, tuple(starts), source)
