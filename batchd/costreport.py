"""`batchd cost`: actual spend grouped by model, source or day (pure; the store gives rows)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal
from zoneinfo import ZoneInfo

from batchd.prices import Unknown, format_usd

__all__ = ["CostRow", "Line", "as_json", "group", "render"]

By = Literal["model", "source", "day"]


@dataclass(frozen=True)
class CostRow:
    """The charged usage of one attempt (or any unit the store keeps); cost in nano-dollars."""

    at: float  # unix seconds the cost is attributed to
    model: str
    source: str
    requests: int
    input_tokens: int
    cached_tokens: int
    output_tokens: int
    cost: int | Unknown


@dataclass
class Line:
    """One group of the report; `cost` sums the known costs, `unknown` counts the rest."""

    key: str
    requests: int = 0
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    cost: int = 0
    unknown: int = 0  # rows whose cost is unknown (their requests are in `requests`)

    def add(self, r: CostRow) -> None:
        self.requests += r.requests
        self.input_tokens += r.input_tokens
        self.cached_tokens += r.cached_tokens
        self.output_tokens += r.output_tokens
        if isinstance(r.cost, Unknown):
            self.unknown += 1
        else:
            self.cost += r.cost


def group(rows: Iterable[CostRow], by: By, tz: str = "UTC") -> tuple[list[Line], Line]:
    """(lines sorted by key, the total) of `rows` grouped by model, source or day (in `tz`)."""
    zone = ZoneInfo(tz)
    lines: dict[str, Line] = {}
    total = Line("total")
    for r in rows:
        if by == "day":
            key = datetime.fromtimestamp(r.at, zone).date().isoformat()
        else:
            key = r.model if by == "model" else r.source
        lines.setdefault(key, Line(key)).add(r)
        total.add(r)
    return sorted(lines.values(), key=lambda x: x.key), total


def _cost(line: Line) -> str:
    if line.unknown:
        return f"{format_usd(line.cost)} + unknown ({line.unknown})"
    return format_usd(line.cost)


def render(lines: list[Line], total: Line, by: By) -> str:
    """A plain-text table with a total line."""
    head = (by, "requests", "input tokens", "cached", "output tokens", "cost")
    body = [
        (
            x.key,
            f"{x.requests:,}",
            f"{x.input_tokens:,}",
            f"{x.cached_tokens:,}",
            f"{x.output_tokens:,}",
            _cost(x),
        )
        for x in [*lines, total]
    ]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]

    def fmt(row: tuple[str, ...]) -> str:
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(head), rule, *map(fmt, body[:-1]), rule, fmt(body[-1])])


def as_json(lines: list[Line], total: Line, by: By) -> dict[str, Any]:
    """The report for --json (costs in nano-dollars and as USD strings)."""

    def one(x: Line) -> dict[str, Any]:
        return {
            by: x.key,
            "requests": x.requests,
            "input_tokens": x.input_tokens,
            "cached_tokens": x.cached_tokens,
            "output_tokens": x.output_tokens,
            "cost_nanousd": x.cost,
            "cost_usd": format_usd(x.cost, 6).lstrip("$"),
            "unknown_cost_rows": x.unknown,
        }

    return {"by": by, "rows": [one(x) for x in lines], "total": one(total)}
