"""Prices: known models against the genai-prices database, the batch discount, [prices]
overrides, and unknown models (priced "unknown", never $0)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import genai_prices
import pytest

from batchd import config
from batchd.config import ConfigError, PriceOverride
from batchd.prices import (
    BATCH_DISCOUNT,
    Price,
    PriceBook,
    Rates,
    Unknown,
    format_usd,
    provider_for_base_url,
    to_nanos,
)

AT = datetime(2026, 11, 1, tzinfo=UTC)
BATCH = {"processing": "batch"}


def db_cost(provider: str, model: str, inp: int, cached: int, out: int, batch: bool) -> int:
    """What genai-prices itself says, in nano-dollars."""
    usage = genai_prices.Usage(input_tokens=inp, cache_read_tokens=cached, output_tokens=out)
    calc = genai_prices.calc_price(
        usage,
        model,
        provider_id=provider,
        genai_request_timestamp=AT,
        price_context=BATCH if batch else None,
    )
    return to_nanos(calc.total_price)


def price(provider: str, model: str) -> Price:
    p = PriceBook(provider).price(model, AT)
    assert isinstance(p, Price), p
    return p


# (provider, model, the database has a batch price for it)
KNOWN = [
    ("openai", "gpt-4o-mini", True),
    ("openai", "gpt-4o", True),
    ("openai", "gpt-4.1", True),
    ("openai", "gpt-5-mini", True),
    ("openai", "o3", True),
    ("openai", "gpt-4o-mini-2024-07-18", True),  # a dated snapshot of a known model
    ("openai", "text-embedding-3-small", False),
    ("openai", "text-embedding-3-large", False),
    ("anthropic", "claude-sonnet-4-5", True),
    ("anthropic", "claude-3-5-haiku-latest", False),
    ("google", "gemini-2.5-flash", True),
    ("google", "gemini-2.5-pro", True),
    ("azure", "gpt-4o-mini", False),
    ("mistral", "mistral-small-latest", True),
]


@pytest.mark.parametrize(("provider", "model", "has_batch"), KNOWN)
def test_known_models_match_the_price_database(provider: str, model: str, has_batch: bool) -> None:
    p = price(provider, model)
    assert ("batch price of" in p.source) is has_batch, p.source
    for inp, cached, out in [(150_000, 30_000, 20_000), (1_000, 0, 0), (0, 0, 7), (300_000, 0, 1)]:
        if has_batch:
            expected = db_cost(provider, model, inp, cached, out, batch=True)
        else:  # the list price with the provider's batch discount
            listed = Decimal(db_cost(provider, model, inp, cached, out, batch=False))
            expected = int(listed * BATCH_DISCOUNT[provider])
        assert p.cost(inp, cached, 0, out) == expected, (inp, cached, out)


def test_published_batch_prices() -> None:
    # OpenAI's pricing page, Batch column (per million tokens).
    assert price("openai", "gpt-4o-mini").rates[0] == Rates(
        input=to_nanos("0.075"),
        cached_input=to_nanos("0.075"),
        cache_write=to_nanos("0.075"),
        output=to_nanos("0.30"),
    )
    assert price("openai", "gpt-4o").cost(1_000_000, output=1_000_000) == to_nanos("6.25")
    assert price("openai", "text-embedding-3-small").cost(1_000_000) == to_nanos("0.01")


def test_long_context_tier_applies_to_all_tokens_of_the_request() -> None:
    p = price("anthropic", "claude-sonnet-4-5")
    assert p.thresholds == (200_000,)
    assert p.tier(200_000) == 0 and p.tier(200_001) == 1
    # $1.50 / $3.00 per million input tokens below / above 200k (batch prices).
    assert p.cost(200_000) == to_nanos("0.3")
    assert p.cost(200_001) == round(200_001 * 3_000_000_000 / 1_000_000)


@pytest.mark.parametrize("provider", ["openai", "azure", "anthropic", "google"])
def test_the_batch_discount_is_half(provider: str) -> None:
    assert BATCH_DISCOUNT[provider] == Decimal("0.5")


def test_the_discount_applies_where_the_database_has_no_batch_price() -> None:
    listed = db_cost("openai", "text-embedding-3-small", 1_000_000, 0, 0, batch=False)
    assert listed == to_nanos("0.02")
    assert price("openai", "text-embedding-3-small").cost(1_000_000) == listed // 2
    assert "openai batch discount" in price("openai", "text-embedding-3-small").source


def test_override_list_price_gets_the_discount_batch_price_does_not() -> None:
    list_price = PriceOverride(Decimal("0.3"), Decimal("1.2"), Decimal("0.15"), batch=False)
    batch_price = PriceOverride(Decimal("0.3"), Decimal("1.2"), None, batch=True)
    book = PriceBook("openai", {"ft:a": list_price, "ft:b": batch_price})
    a, b = book.price("ft:a"), book.price("ft:b")
    assert isinstance(a, Price) and isinstance(b, Price)
    assert a.rates[0] == Rates(150_000_000, 75_000_000, 150_000_000, 600_000_000)
    assert b.rates[0] == Rates(300_000_000, 300_000_000, 300_000_000, 1_200_000_000)
    # A provider without a known batch discount: the list price stands (never cheaper).
    together = PriceBook("together", {"m": list_price}).price("m")
    assert isinstance(together, Price) and together.rates[0].input == 300_000_000
    assert "no batch discount known" in together.source


def test_override_wins_over_the_database_and_prefixes_match() -> None:
    mine = PriceOverride(Decimal("1"), Decimal("2"), batch=True)
    ft = PriceOverride(Decimal("3"), Decimal("4"), batch=True)
    ft_acme = PriceOverride(Decimal("5"), Decimal("6"), batch=True)
    book = PriceBook("openai", {"gpt-4o-mini": mine, "ft:*": ft, "ft:gpt-4o-mini:acme*": ft_acme})
    assert price_input(book, "gpt-4o-mini") == to_nanos(1)
    assert price_input(book, "ft:gpt-4o-mini:acme::x1") == to_nanos(5)  # longest prefix
    assert price_input(book, "ft:gpt-4o-mini:other::x2") == to_nanos(3)
    assert price_input(book, "gpt-4o") == to_nanos("1.25")  # not overridden: the database


def price_input(book: PriceBook, model: str) -> int:
    p = book.price(model, AT)
    assert isinstance(p, Price), p
    return p.rates[0].input


def test_same_as_prices_a_deployment_like_a_known_model() -> None:
    book = PriceBook(
        "azure",
        {
            "my-gpt-4o-batch": PriceOverride(same_as="gpt-4o"),
            "loop-a": PriceOverride(same_as="loop-b"),
            "loop-b": PriceOverride(same_as="loop-a"),
            "typo": PriceOverride(same_as="gpt-4o-typo"),
        },
    )
    mine, real = book.price("my-gpt-4o-batch", AT), book.price("gpt-4o", AT)
    assert isinstance(mine, Price) and isinstance(real, Price)
    assert mine.rates == real.rates and mine.model == "my-gpt-4o-batch"
    assert "same_as gpt-4o" in mine.source
    loop = book.price("loop-a", AT)
    assert isinstance(loop, Unknown) and "loops" in loop.reason
    assert isinstance(book.price("typo", AT), Unknown)


def test_unknown_model_is_unknown_never_zero() -> None:
    book = PriceBook("openai")
    for model in ("no-such-model-xyz", "whisper-1"):  # unknown; priced per audio hour
        p = book.price(model, AT)
        assert isinstance(p, Unknown), p
        assert model in p.reason
        assert format_usd(p) == "unknown" and str(p) == "unknown"
    azure = PriceBook("azure").price("my-deployment", AT)  # a deployment name: unknown
    assert isinstance(azure, Unknown)
    # A model the database lists as free is known to cost nothing.
    free = book.price("omni-moderation-latest", AT)
    assert isinstance(free, Price) and free.cost(10**6, output=10**6) == 0


def test_lookups_are_cached_per_model_and_day() -> None:
    calls: list[str] = []

    def database(provider: str, model: str, at: datetime) -> Price | Unknown:
        calls.append(model)
        return Price(provider, model, (Rates(1, 1, 1, 1),))

    book = PriceBook("openai", database=database)
    book.price("m", AT)
    book.price("m", AT.replace(hour=23))
    book.price("m", datetime(2026, 11, 2, tzinfo=UTC))
    assert calls == ["m", "m"]


@pytest.mark.parametrize(
    ("url", "provider"),
    [
        ("https://api.openai.com/v1", "openai"),
        ("http://127.0.0.1:8787/v1", "openai"),
        ("https://acme.openai.azure.com/openai/v1", "azure"),
        ("https://acme.cognitiveservices.azure.com/openai", "azure"),
        ("https://api.anthropic.com", "anthropic"),
        ("https://generativelanguage.googleapis.com/v1beta", "google"),
    ],
)
def test_provider_for_base_url(url: str, provider: str) -> None:
    assert provider_for_base_url(url) == provider


def test_money_is_integer_nanodollars() -> None:
    assert to_nanos("0.1") == 100_000_000
    assert format_usd(to_nanos("12.345")) == "$12.35"
    assert format_usd(to_nanos(1234567)) == "$1,234,567.00"
    assert format_usd(3) == "$0.000000003"  # tiny amounts are not shown as $0.00
    assert format_usd(0) == "$0.00"
    # A 10-token embedding request at $0.01 per million tokens costs 0.1 micro-dollars:
    # kept exactly, summed over a million requests it is $0.10, not $0.
    p = price("openai", "text-embedding-3-small")
    assert p.cost(10) == 100  # nano-dollars
    assert 1_000_000 * p.cost(10) == to_nanos("0.1")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_prices_config(tmp_path: Path) -> None:
    cfg = config.load(
        write(
            tmp_path,
            '[prices."ft:gpt-4o-mini:acme*"]\ninput_per_mtok = 0.3\noutput_per_mtok = 1.2\n'
            "cached_input_per_mtok = 0.15\nbatch = false\n"
            '[prices."dep"]\nsame_as = "gpt-4o"\n',
        ),
        env={},
    )
    assert cfg.prices["ft:gpt-4o-mini:acme*"] == PriceOverride(
        Decimal("0.3"), Decimal("1.2"), Decimal("0.15"), batch=False
    )
    assert cfg.prices["dep"] == PriceOverride(same_as="gpt-4o")


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('[prices."m"]\ninput_per_mtok = 1\noutput_per_mtok = 2\n', r'\[prices."m"\] batch'),
        ('[prices."m"]\ninput_per_mtok = 1\nbatch = true\n', r'\[prices."m"\] output_per_mtok'),
        (
            '[prices."m"]\ninput_per_mtok = -1\noutput_per_mtok = 2\nbatch = true\n',
            r'\[prices."m"\] input_per_mtok',
        ),
        (
            '[prices."m"]\ninput_per_mtok = "1"\noutput_per_mtok = 2\nbatch = true\n',
            r'\[prices."m"\] input_per_mtok',
        ),
        ('[prices."m"]\ninput = 1\n', r'\[prices."m"\] input: unknown key'),
        ('[prices."m"]\nsame_as = "x"\nbatch = true\n', r'\[prices."m"\] same_as'),
        ('[prices."m"]\nbatch = "yes"\ninput_per_mtok = 1\noutput_per_mtok = 1', r"batch"),
        ("[prices]\nm = 3\n", r'\[prices."m"\]: must be a table'),
    ],
)
def test_bad_prices_config_names_the_key(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        config.load(write(tmp_path, text), env={})
