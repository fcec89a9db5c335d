"""Cost wired end to end against the emulator: the estimate made at intake (validate,
submit, job.json), the actual cost of the results (job.json, the database, show, jobs
--cost, the cost report, metrics), [prices] overrides and an unknown model."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson

from batchd import config
from batchd.prices import NANOS_PER_USD
from tests.conftest import Emulator, config_file, drop, read_jsonl, run_cli, run_once
from tests.costcheck import charges, expected_nanos, job_row


def request_lines(n: int, model: str = "gpt-4o-mini", max_tokens: int | None = 50) -> bytes:
    """n chat requests with an output limit; the last one made to fail (no charge)."""
    out = []
    for i in range(n):
        body: dict[str, Any] = {
            "model": model,
            "messages": [
                {"role": "system", "content": "You answer in one short sentence."},
                {"role": "user", "content": f"What is the capital of country number {i}?"},
            ],
        }
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        if i == n - 1:
            body["x_emulator"] = {"status": 400}
        line = {"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions"}
        out.append(orjson.dumps({**line, "body": body}))
    return b"\n".join(out) + b"\n"


def _sample(registry: Any, name: str, **labels: str) -> float:
    total = 0.0
    for metric in registry.collect():
        for s in metric.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


async def test_estimate_at_intake_and_actual_cost_everywhere(
    tmp_path: Path, emulator: Emulator
) -> None:
    conf = config_file(tmp_path, emulator.url, extra="[estimate]\noutput_ratio = 0.5\n")
    cfg = config.load(conf)
    src = tmp_path / "priced.jsonl"
    src.write_bytes(request_lines(12))

    r = await asyncio.to_thread(run_cli, "validate", str(src), "-c", str(conf))
    assert r.returncode == 0, r.stderr
    assert "estimate: 12 requests" in r.stderr and " to $" in r.stderr
    r = await asyncio.to_thread(run_cli, "submit", str(src), "-c", str(conf))
    assert r.returncode == 0, r.stderr
    printed = next(line for line in r.stdout.splitlines() if "estimate:" in line)

    d = await run_once(cfg)
    done = cfg.spool.dir / "done" / "priced"
    info = orjson.loads((done / "job.json").read_bytes())

    # The estimate the daemon kept is the one `submit` printed (same rules, same bytes).
    est = info["estimate"]
    assert est["requests"] == 12 and est["output_tokens_high"] == 12 * 50
    assert est["output_tokens_low"] == min(12 * 50, round(est["input_tokens"] * 0.5))
    assert 0 < est["cost_low_nanousd"] < est["cost_high_nanousd"]
    assert f"~{est['input_tokens']:,} input tokens" in printed
    assert est["price_source"].startswith("genai-prices")

    # The actual cost is exactly what the result lines billed, priced independently.
    requests, nanos = expected_nanos(done, "gpt-4o-mini")
    assert requests == 11  # the failed request billed nothing
    assert info["cost"]["nanousd"] == nanos > 0 and info["cost"]["unknown"] is None
    assert info["cost"]["requests_billed"] == 11
    row = job_row(cfg.state.database, "priced")
    assert row["cost_nanos"] == nanos and row["admitted_at"] is not None
    assert [c["requests"] for c in charges(cfg.state.database)] == [11]

    actual = _sample(d.metrics.registry, "batchd_cost_usd_total", kind="actual")
    estimated = _sample(d.metrics.registry, "batchd_cost_usd_total", kind="estimated")
    assert abs(actual - nanos / NANOS_PER_USD) < 1e-12
    assert abs(estimated - est["cost_high_nanousd"] / NANOS_PER_USD) < 1e-12
    assert _sample(d.metrics.registry, "batchd_cost_estimate_ratio_count") == 1

    show = await asyncio.to_thread(run_cli, "show", "priced", "-c", str(conf))
    assert show.returncode == 0, show.stderr
    assert "estimate   $" in show.stdout and "11 requests billed" in show.stdout
    jobs = await asyncio.to_thread(run_cli, "jobs", "--cost", "-c", str(conf))
    assert "ESTIMATE" in jobs.stdout and "COST" in jobs.stdout
    assert f"${nanos / NANOS_PER_USD:.9f}".rstrip("0") in jobs.stdout
    report = await asyncio.to_thread(run_cli, "cost", "--json", "--by", "source", "-c", str(conf))
    assert report.returncode == 0, report.stderr
    data = orjson.loads(report.stdout)
    assert data["total"]["cost_nanousd"] == nanos
    assert [x["source"] for x in data["rows"]] == ["inbox"]
    table = await asyncio.to_thread(run_cli, "cost", "--since", "1h", "-c", str(conf))
    assert "gpt-4o-mini" in table.stdout and "total" in table.stdout


async def test_unknown_model_is_unknown_and_prices_override_it(
    tmp_path: Path, emulator: Emulator
) -> None:
    conf = config_file(tmp_path, emulator.url)
    cfg = config.load(conf)
    drop(cfg, "mystery.jsonl", request_lines(4, model="acme-llm-1"))
    await run_once(cfg)
    info = orjson.loads((cfg.spool.dir / "done" / "mystery" / "job.json").read_bytes())
    assert info["estimate"]["cost_high_nanousd"] is None
    assert "acme-llm-1" in info["estimate"]["cost_unknown_reason"]
    assert info["cost"]["unknown"] and info["cost"]["requests_billed"] == 3
    assert info["cost"]["usd"] is None and info["cost"]["nanousd"] is None  # not $0
    jobs = await asyncio.to_thread(run_cli, "jobs", "--cost", "-c", str(conf))
    assert "unknown" in jobs.stdout
    report = await asyncio.to_thread(run_cli, "cost", "-c", str(conf))
    assert "+ unknown (1)" in report.stdout  # never counted as $0

    # A [prices] entry prices the same model (list prices here: the batch discount applies).
    conf = config_file(
        tmp_path,
        emulator.url,
        extra='[intake]\nduplicate_window = "0"\n'
        '[prices."acme-llm-1"]\ninput_per_mtok = 2.0\noutput_per_mtok = 8.0\nbatch = false\n',
    )
    cfg = config.load(conf)
    drop(cfg, "known.jsonl", request_lines(4, model="acme-llm-1"))
    await run_once(cfg)
    info = orjson.loads((cfg.spool.dir / "done" / "known" / "job.json").read_bytes())
    out = read_jsonl(cfg.spool.dir / "done" / "known" / "output.jsonl")
    usage = [x["response"]["body"]["usage"] for x in out]
    # $2 and $8 per million tokens at list price, halved: 1,000 and 4,000 nano-dollars a token
    exact = sum(u["prompt_tokens"] * 1_000 + u["completion_tokens"] * 4_000 for u in usage)
    assert info["cost"]["nanousd"] == exact and info["cost"]["unknown"] is None
    assert info["estimate"]["cost_high_nanousd"] == (
        info["estimate"]["input_tokens"] * 1_000 + 4 * 50 * 4_000
    )
