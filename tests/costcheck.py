"""What a job's results billed, computed from its result files independently of batchd's
tally, and what batchd charged, read from its database: the two must agree."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson

from batchd.prices import Price, PriceBook

MTOK = 1_000_000


def price_of(model: str) -> Price:
    """The batch price batchd uses for `model` (genai-prices, OpenAI's batch discount)."""
    p = PriceBook("openai").price(model)
    assert isinstance(p, Price), p
    return p


def billed(paths: Iterable[Path], model: str) -> tuple[int, int, int]:
    """(billed requests, exact amount in nano-dollars x 1e6, output tokens) of the result
    lines in `paths`: each line's `response.body.usage`, chat or embeddings shape."""
    rates = price_of(model).rates[0]
    requests = amount = output = 0
    for path in paths:
        if not path.exists():
            continue
        for raw in path.read_bytes().splitlines():
            if not raw.strip():
                continue
            line: dict[str, Any] = orjson.loads(raw)
            body = (line.get("response") or {}).get("body") or {}
            usage = body.get("usage") if isinstance(body, dict) else None
            if not usage:
                continue
            prompt = int(usage.get("prompt_tokens", 0))
            cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0))
            completion = int(usage.get("completion_tokens", 0))
            requests += 1
            output += completion
            amount += (
                (prompt - cached) * rates.input
                + cached * rates.cached_input
                + completion * rates.output
            )
    return requests, amount, output


def expected_nanos(result_dir: Path, model: str) -> tuple[int, int]:
    """(billed requests, cost in nano-dollars) of a published job's output and errors."""
    requests, amount, _ = billed([result_dir / "output.jsonl", result_dir / "errors.jsonl"], model)
    return requests, (amount + MTOK // 2) // MTOK


def charges(db: Path) -> list[dict[str, Any]]:
    """Every row of the charges table."""
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("SELECT * FROM charges ORDER BY at")]
    finally:
        con.close()


def job_row(db: Path, name: str) -> dict[str, Any]:
    """One job's row by the name it got."""
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        row = con.execute("SELECT * FROM jobs WHERE name = ?", (name,)).fetchone()
        assert row is not None, name
        return dict(row)
    finally:
        con.close()
