"""Cost estimates at intake: input tokens per endpoint shape, output bounds, the price range."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest

from batchd.estimate import Estimate, Estimator, encoding_for_model, token_counter
from batchd.prices import Price, PriceBook, Rates, Unknown, to_nanos

# $1 per million input tokens, $4 per million output tokens (batch prices), no tiers.
FLAT = Price("openai", "m", (Rates(to_nanos(1), to_nanos("0.5"), to_nanos(1), to_nanos(4)),))


def words(text: str) -> int:
    """A stand-in tokenizer: one token per word."""
    return len(text.split())


def line(body: dict[str, Any], url: str = "/v1/chat/completions", i: int = 0) -> dict[str, Any]:
    return {"custom_id": f"r{i}", "method": "POST", "url": url, "body": body}


def chat(content: Any, model: str = "gpt-4o-mini", **extra: Any) -> dict[str, Any]:
    return line({"model": model, "messages": [{"role": "user", "content": content}], **extra})


def estimate(lines: list[dict[str, Any]], price: Price | Unknown = FLAT, **kw: Any) -> Estimate:
    e = Estimator(lambda model: price, **kw)
    for obj in lines:
        e.add(obj)
    return e.finish()


def test_chat_tokens_with_a_tokenizer_are_text_plus_message_overheads() -> None:
    body = {
        "model": "gpt-4o-mini",
        "max_tokens": 10,
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "name": "ann", "content": [{"type": "text", "text": "one two three"}]},
        ],
    }
    est = estimate([line(body)], tokenizer=words)
    # 3 priming + 4 per message (3 + its role) x 2 + 1 for the name + 2 + 3 words
    assert est.input_tokens == 3 + 8 + 1 + 5
    assert (est.output_low, est.output_high, est.unbounded) == (0, 10, 0)
    assert est.method.startswith("tokenizer, 1 of 1 lines tokenized")


def test_without_a_tokenizer_text_is_utf8_bytes_over_4() -> None:
    est = estimate([chat("a" * 400), chat("é" * 200)], tokenizer=False)  # 400 bytes each
    assert est.input_tokens == 2 * (3 + 4) + 2 * 100
    assert est.method == "bytes/4"


def test_the_inlined_common_line_counts_like_the_general_walk() -> None:
    text = "some text é 北京 " * 20
    fast = [chat(text, max_tokens=9, i=i) for i in range(50)]  # the inlined common line
    general = [chat(text, max_tokens=9, temperature=0, i=i) for i in range(50)]
    a, b = estimate(fast, tokenizer=False), estimate(general, tokenizer=False)
    assert (a.input_tokens, a.output_high) == (b.input_tokens, b.output_high)
    assert a.input_tokens == 50 * (7 + len(text.encode()) / 4)


def test_a_sample_calibrates_every_line() -> None:
    # Lines 1-2 and about one in 5 are tokenized; the others are scaled by the sample's
    # tokens per byte. On homogeneous lines the estimate is exact.
    text = "word " * 50  # 250 bytes, 50 words
    lines = [chat(text) for _ in range(1000)]
    est = estimate(lines, tokenizer=words, sample_head=2, sample_every=5)
    assert est.input_tokens == 1000 * (7 + 50)
    sampled = int(est.method.split(", ")[1].split(" of ")[0])
    assert 150 < sampled < 250
    # The same lines are sampled every time (a redo gives the same estimate).
    assert estimate(lines, tokenizer=words, sample_head=2, sample_every=5) == est


def test_real_tokenizer_sampled_is_close_to_every_line() -> None:
    if token_counter("o200k_base") is None:
        pytest.skip("no offline tokenizer installed (pip install batchd[tokens])")
    texts = ["Summarise this review: the product arrived late but works well.", "北京欢迎你"]
    lines = [chat(f"{texts[i % 2]} #{i}") for i in range(1000)]
    every = estimate(lines, sample_head=1000, sample_every=1)
    sampled = estimate(lines)
    assert "o200k_base" in sampled.method
    assert abs(sampled.input_tokens - every.input_tokens) <= every.input_tokens * 0.02
    count = token_counter(encoding_for_model("gpt-4o"))
    assert count is not None and count[0]("hello world") == 2


def test_encodings() -> None:
    assert encoding_for_model("gpt-4o-mini") == "o200k_base"
    assert encoding_for_model("ft:gpt-4o-mini-2024-07-18:acme::x") == "o200k_base"
    assert encoding_for_model("gpt-4-turbo") == "cl100k_base"
    assert encoding_for_model("text-embedding-3-small") == "cl100k_base"
    assert encoding_for_model("o3-mini") == "o200k_base"


def test_output_bounds_per_chat_line() -> None:
    lines = [
        chat("x", max_tokens=100),
        chat("x", max_completion_tokens=50, max_tokens=100),  # the newer field wins
        chat("x", max_tokens=10, n=3),  # n choices
        chat("x"),  # no limit: gpt-4o-mini's maximum output
    ]
    est = estimate(lines, tokenizer=False)
    assert est.output_high == 100 + 50 + 30 + 16_384
    assert est.unbounded == 1
    unknown_model = estimate([chat("x", model="my-model")], default_max_output_tokens=777)
    assert unknown_model.output_high == 777


def test_output_ratio_gives_the_low_end() -> None:
    lines = [chat("a" * 392, max_tokens=1000)]  # 7 + 98 = 105 input tokens
    est = estimate(lines, tokenizer=False, output_ratio=0.5)
    assert (est.input_tokens, est.output_low, est.output_high) == (105, 52, 1000)
    capped = estimate([chat("a" * 392, max_tokens=10)], tokenizer=False, output_ratio=0.5)
    assert capped.output_low == 10  # never above the high end


def test_cost_range_is_exact_in_nanodollars() -> None:
    lines = [chat("a" * 392, max_tokens=1000, i=i) for i in range(1000)]  # 7 + 98 = 105 tokens each
    est = estimate(lines, tokenizer=False)
    assert est.input_tokens == 105_000 and est.output_high == 1_000_000
    assert est.cost_low == to_nanos("0.105")
    assert est.cost_high == to_nanos("0.105") + to_nanos(4)
    assert "$0.11 to $4.11" in est.describe()
    d = est.as_dict()
    assert d["cost_high_nanousd"] == est.cost_high and d["cost_unknown_reason"] is None
    orjson.dumps(d)  # job.json-ready


def test_responses_shape() -> None:
    body = {
        "model": "gpt-4.1",
        "instructions": "one two",
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "three four five"}]},
            {"type": "function_call_output", "call_id": "c", "output": "six"},
        ],
        "max_output_tokens": 200,
    }
    est = estimate([line(body, "/v1/responses")], tokenizer=words)
    assert est.input_tokens == 2 + 3 + 1 + 2 * 4 + 3
    assert est.output_high == 200
    no_limit = estimate([line({"model": "gpt-4.1", "input": "hi"}, "/v1/responses")])
    assert no_limit.output_high == 32_768 and no_limit.unbounded == 1


def test_embeddings_and_completions_shapes() -> None:
    emb = [
        line({"model": "text-embedding-3-small", "input": "one two"}, "/v1/embeddings"),
        line({"model": "text-embedding-3-small", "input": ["a b", "c"]}, "/v1/embeddings"),
        line({"model": "text-embedding-3-small", "input": [1, 2, 3, 4]}, "/v1/embeddings"),
        line({"model": "text-embedding-3-small", "input": [[1, 2], [3]]}, "/v1/embeddings"),
    ]
    est = estimate(emb, tokenizer=words)
    assert (est.input_tokens, est.output_high) == (2 + 3 + 4 + 3, 0)  # token ids: exact
    comp = [
        line({"model": "davinci-002", "prompt": "one two"}, "/v1/completions"),  # default 16
        line({"model": "davinci-002", "prompt": "x", "max_tokens": 5, "best_of": 3, "n": 2}),
    ]
    comp[1]["url"] = "/v1/completions"
    est = estimate(comp, tokenizer=words)
    assert (est.input_tokens, est.output_high) == (3, 16 + 15)


def test_images_are_a_fixed_charge_not_their_base64() -> None:
    data = "data:image/png;base64," + base64.b64encode(b"\0" * 30_000).decode()
    parts = [
        {"type": "text", "text": "what is this"},
        {"type": "image_url", "image_url": {"url": data}},
        {"type": "image_url", "image_url": {"url": data, "detail": "low"}},
    ]
    est = estimate([chat(parts, model="gpt-4o")], tokenizer=words)
    assert est.images == 2
    assert est.input_tokens == 7 + 3 + 1_445 + 85
    mini = estimate([chat(parts[1:2], model="gpt-4o-mini")], tokenizer=words)
    assert mini.input_tokens == 7 + 2_833 + 8 * 5_667


def test_tools_count_as_text() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    with_tools = estimate([chat("", tools=tools, max_tokens=1)], tokenizer=False)
    without = estimate([chat("", max_tokens=1)], tokenizer=False)
    assert with_tools.input_tokens - without.input_tokens == round(len(orjson.dumps(tools)) / 4)


def test_unknown_price_or_endpoint_is_unknown_never_zero() -> None:
    est = estimate([chat("hello")], price=Unknown("no price for 'x'"))
    assert isinstance(est.cost_low, Unknown) and isinstance(est.cost_high, Unknown)
    assert "cost unknown (no price for 'x')" in est.describe()
    assert est.as_dict()["cost_high_nanousd"] is None
    assert est.as_dict()["cost_unknown_reason"] == "no price for 'x'"
    img = estimate([line({"model": "gpt-image-1", "prompt": "a cat"}, "/v1/images/generations")])
    assert isinstance(img.cost_high, Unknown) and "not priced per token" in img.cost_high.reason
    # Estimator without a price list
    e = Estimator()
    e.add(chat("x"))
    assert isinstance(e.finish().cost_high, Unknown)


def test_long_context_tier_by_request() -> None:
    tiered = Price(
        "anthropic",
        "m",
        (Rates(to_nanos(1), 0, 0, to_nanos(2)), Rates(to_nanos(10), 0, 0, to_nanos(20))),
        (1000,),
    )
    small = chat("a" * 3972, max_tokens=1)  # 7 + 993 = 1,000 tokens: base tier
    big = chat("a" * 3976, max_tokens=1)  # 1,001 tokens: the higher tier, all of them
    est = estimate([small, big], tiered, tokenizer=False)
    assert est.input_tokens == 2001
    assert est.cost_high == ((1000 * 1 + 1 * 2 + 1001 * 10 + 1 * 20) * 1000)


def test_with_the_price_database() -> None:
    book = PriceBook("openai")
    lines = [chat("a" * 392, max_tokens=1000)]
    est = estimate(lines, price=book.price("gpt-4o-mini"), tokenizer=False)
    # gpt-4o-mini batch: $0.075 / $0.30 per million tokens
    assert est.cost_low == (105 * 75)
    assert est.cost_high == (105 * 75 + 1000 * 300)
    assert "genai-prices" in est.price_source


def test_malformed_lines_are_counted_but_add_nothing() -> None:
    est = estimate([{"custom_id": "x"}, line("not a body"), chat(None)], tokenizer=False)  # type: ignore[arg-type]
    assert est.requests == 3
