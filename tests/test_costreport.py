"""The cost report groups actual spend; unknown costs stay visible."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson

from batchd.costreport import CostRow, as_json, group, render
from batchd.prices import Unknown, to_nanos


def at(day: int, hour: int = 12) -> float:
    return datetime(2026, 11, day, hour, tzinfo=UTC).timestamp()


ROWS = [
    CostRow(at(1), "gpt-4o", "team-a", 10, 1000, 100, 500, to_nanos("1.25")),
    CostRow(at(1, 23), "gpt-4o-mini", "team-b", 5, 500, 0, 50, to_nanos("0.02")),
    CostRow(at(2), "gpt-4o", "team-b", 1, 10, 0, 5, to_nanos("0.75")),
    CostRow(at(2), "my-ft", "team-a", 2, 20, 0, 2, Unknown("no price for 'my-ft'")),
]


def test_group_by_model_source_and_day() -> None:
    lines, total = group(ROWS, "model")
    assert [(x.key, x.requests, x.cost) for x in lines] == [
        ("gpt-4o", 11, to_nanos(2)),
        ("gpt-4o-mini", 5, to_nanos("0.02")),
        ("my-ft", 2, 0),
    ]
    assert (total.requests, total.cost, total.unknown) == (18, to_nanos("2.02"), 1)
    assert [x.key for x in group(ROWS, "source")[0]] == ["team-a", "team-b"]
    days, _ = group(ROWS, "day")
    assert [(x.key, x.cost) for x in days] == [
        ("2026-11-01", to_nanos("1.27")),
        ("2026-11-02", to_nanos("0.75")),
    ]
    # 23:00 UTC on Nov 1 is Nov 2 in Tokyo.
    assert [x.key for x in group(ROWS[1:2], "day", "Asia/Tokyo")[0]] == ["2026-11-02"]


def test_render_and_json_show_unknown_costs() -> None:
    lines, total = group(ROWS, "model")
    text = render(lines, total, "model")
    assert "my-ft" in text and "$0.00 + unknown (1)" in text
    assert text.splitlines()[-1].startswith("total") and "$2.02 + unknown (1)" in text
    data = as_json(lines, total, "model")
    assert data["total"]["cost_nanousd"] == to_nanos("2.02")
    assert data["total"]["cost_usd"] == "2.020000"
    assert data["rows"][2] == {
        "model": "my-ft",
        "requests": 2,
        "input_tokens": 20,
        "cached_tokens": 0,
        "output_tokens": 2,
        "cost_nanousd": 0,
        "cost_usd": "0.000000",
        "unknown_cost_rows": 1,
    }
    orjson.dumps(data)
