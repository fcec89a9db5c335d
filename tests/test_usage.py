"""Actual cost from result lines: every usage shape, and exactly once per execution."""

from __future__ import annotations

from typing import Any

import orjson

from batchd.prices import Price, Rates, Unknown, to_nanos
from batchd.usage import AttemptTally, Usage, usage_of_body, usage_of_result

# $1 / $0.25 (cached) / $2 (cache write) / $4 (output) per million tokens
PRICE = Price("openai", "m", (Rates(to_nanos(1), to_nanos("0.25"), to_nanos(2), to_nanos(4)),))


def ok(cid: str, usage: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": f"batch_req_{cid}",
        "custom_id": cid,
        "response": {"status_code": 200, "request_id": "req", "body": {"usage": usage}},
        "error": None,
    }


CHAT = {
    "prompt_tokens": 1000,
    "completion_tokens": 500,
    "total_tokens": 1500,
    "prompt_tokens_details": {"cached_tokens": 400, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 300, "audio_tokens": 0},
}
RESPONSES = {
    "input_tokens": 1000,
    "input_tokens_details": {"cached_tokens": 400},
    "output_tokens": 500,
    "output_tokens_details": {"reasoning_tokens": 300},
    "total_tokens": 1500,
}


def test_usage_shapes() -> None:
    expected = Usage(1000, 400, 0, 500, 300)
    assert usage_of_body({"usage": CHAT}) == expected
    assert usage_of_body({"usage": RESPONSES}) == expected
    assert usage_of_body({"usage": {"prompt_tokens": 8, "total_tokens": 8}}) == Usage(8)
    anthropic = {
        "input_tokens": 100,
        "cache_read_input_tokens": 400,
        "cache_creation_input_tokens": 500,
        "output_tokens": 500,
    }
    assert usage_of_body({"usage": anthropic}) == Usage(1000, 400, 500, 500)
    assert usage_of_body({"error": {"message": "bad"}}) is None
    assert usage_of_body(None) is None


def test_what_was_not_billed_costs_nothing() -> None:
    http_error = {
        "custom_id": "a",
        "response": {"status_code": 400, "body": {"error": {"message": "bad request"}}},
        "error": None,
    }
    expired = {"custom_id": "b", "response": None, "error": {"code": "batch_expired"}}
    anthropic_err = {"custom_id": "c", "result": {"type": "errored", "error": {}}}
    for line in (http_error, expired, anthropic_err, {"response": {"body": {"usage": CHAT}}}):
        assert usage_of_result(line) is None
    anthropic_ok = {
        "custom_id": "d",
        "result": {
            "type": "succeeded",
            "message": {"usage": {"input_tokens": 3, "output_tokens": 1}},
        },
    }
    assert usage_of_result(anthropic_ok) == ("d", Usage(3, 0, 0, 1))


def test_cost_prices_cached_input_and_counts_reasoning_once_as_output() -> None:
    t = AttemptTally(PRICE)
    assert t.add(ok("a", CHAT))
    c = t.charge()
    # 600 uncached x $1 + 400 cached x $0.25 + 500 output (300 of them reasoning) x $4
    assert c.cost == 600 * 1_000 + 400 * 250 + 500 * 4_000
    assert (c.requests, c.input_tokens, c.cached_tokens, c.output_tokens) == (1, 1000, 400, 500)
    assert c.reasoning_tokens == 300


def test_a_custom_id_counts_once_per_attempt_and_rereading_changes_nothing() -> None:
    lines = [ok(f"r{i}", CHAT) for i in range(10)]
    raw = b"\n".join(orjson.dumps(x) for x in lines)
    first = AttemptTally(PRICE)
    for x in lines:
        first.add(x)
    assert not first.add(lines[3])  # the same line again (e.g. in both files): not added
    # After a crash the attempt's files are read again from the start: the same tally,
    # which replaces the stored one (never added to it).
    again = AttemptTally(PRICE)
    for r in raw.split(b"\n"):
        again.add_raw(r)
    assert again.charge() == first.charge()
    assert first.charge().requests == 10
    assert not again.add_raw(b"{not json")


def test_a_request_that_really_ran_twice_is_charged_twice_and_reported() -> None:
    # Attempt 1 answered r0 and r1, then the rest expired; attempt 2 (the follow-up)
    # should have held only r2..r4, but a resubmission bug also sent r1 again.
    a1 = AttemptTally(PRICE)
    for cid in ("r0", "r1"):
        a1.add(ok(cid, CHAT))
    a2 = AttemptTally(PRICE, charged_before=a1.charged)
    for cid in ("r1", "r2", "r3", "r4"):
        a2.add(ok(cid, CHAT))
    one = PRICE.cost(1000, 400, 0, 500)
    assert a1.charge().cost == 2 * one
    assert a2.charge().cost == 4 * one  # the provider billed r1 twice: so do we
    assert a2.charge().reruns == 1


def test_unknown_price_is_unknown_unless_nothing_was_billed() -> None:
    t = AttemptTally(Unknown("no price for 'x'"))
    assert t.charge().cost == 0  # nothing billed: $0 is known
    t.add(ok("a", CHAT))
    c = t.charge()
    assert isinstance(c.cost, Unknown)
    assert c.input_tokens == 1000  # the tokens are still counted
    assert c.as_dict()["cost_nanousd"] is None
    assert c.as_dict()["cost_unknown_reason"] == "no price for 'x'"
