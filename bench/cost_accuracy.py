"""Estimate vs actual: the cost estimate batchd makes at intake against what the results
billed, on the demo's file, the test data and a file of English prose.

    python -m bench.cost_accuracy [--smoke]

For each file: input tokens as estimated (UTF-8 bytes / 4, the default; a tokenized
sample, `[estimate] tokenizer = true`), as OpenAI counts them (every line tokenized with
the model's encoding in OpenAI's chat format: 3 tokens per message plus its role and
content, 3 to prime the reply; the closest offline stand-in for a real bill), and as the
built-in emulator bills them (the JSON body's bytes / 4: a stand-in, not OpenAI's count);
then the estimate's cost range against the cost the emulator's results billed (batchd
run --once on the file). The emulator's answers are a few tokens long, so the output
side of the range is checked only as a bound. Needs bpe-openai (the `dev` extra).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import orjson

from batchd import config, jsonl, logs
from batchd.demo import sample_lines
from batchd.estimate import Estimator, encoding_for_model, token_counter
from batchd.prices import Price, PriceBook, format_usd
from bench.common import Row, parser, print_table, workdir

ROOT = Path(__file__).resolve().parent.parent
KEY_ENV = "BATCHD_BENCH_API_KEY"
PROSE = (ROOT / "README.md").read_text(encoding="utf-8")


def prose_lines(n: int) -> bytes:
    """n summarisation requests over paragraphs of the README (English prose, code)."""
    paras = [p.strip() for p in PROSE.split("\n\n") if len(p.strip()) > 200]
    out = []
    for i in range(n):
        body = {
            "model": "gpt-4o-mini",
            "max_tokens": 200,
            "messages": [
                {"role": "system", "content": "Summarise the text in two sentences."},
                {"role": "user", "content": paras[i % len(paras)]},
            ],
        }
        line = {"custom_id": f"p{i}", "method": "POST", "url": "/v1/chat/completions"}
        out.append(orjson.dumps({**line, "body": body}))
    return b"\n".join(out) + b"\n"


def openai_count(path: Path) -> dict[str, int]:
    """Input tokens of each line (by custom_id) as OpenAI counts them (module docstring)."""
    out = {}
    for raw in path.read_bytes().splitlines():
        line = orjson.loads(raw)
        body = line["body"]
        found = token_counter(encoding_for_model(body["model"]))
        assert found is not None, "bpe-openai is needed (pip install -e '.[dev]')"
        count = found[0]
        if line["url"] == "/v1/embeddings":
            inp = body["input"]
            items = inp if isinstance(inp, list) and inp and not isinstance(inp[0], int) else [inp]
            out[line["custom_id"]] = sum(len(x) if isinstance(x, list) else count(x) for x in items)
            continue
        n = 3  # priming of the reply
        for m in body["messages"]:
            n += 3 + count(m["role"]) + count(m["content"])
        out[line["custom_id"]] = n
    return out


def estimate(path: Path, book: PriceBook, tokenizer: bool) -> Any:
    est = Estimator(book.price, tokenizer=tokenizer)
    summary = jsonl.validate_path(path, jsonl.UNBOUNDED, on_request=est.add)
    assert summary.ok, summary.problems
    return est.finish()


async def run(path: Path, work: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """Run the daemon once on the file against an in-process emulator: its job.json and
    the output tokens of each billed request."""
    from aiohttp import web

    from batchd.daemon import Daemon
    from batchd.emulator import EmulatorConfig, EmulatorState, create_app

    state = EmulatorState(EmulatorConfig(time_scale=0.01))
    runner = web.AppRunner(create_app(state), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    os.environ[KEY_ENV] = "emulator"
    try:
        cfg = config.parse(
            {
                "api": {"base_url": f"http://127.0.0.1:{port}/v1", "api_key_env": KEY_ENV},
                "spool": {"dir": "spool"},
                "state": {"database": "batchd.db"},
                "batch": {"poll_interval_seconds": 0.05},
                "http": {"listen": "127.0.0.1:0"},
            },
            work,
            env={},
        )
        inbox = cfg.spool.dir / "inbox"
        inbox.mkdir(parents=True)
        (inbox / path.name).write_bytes(path.read_bytes())
        await asyncio.wait_for(Daemon(cfg, once=True).run(), 60)
        done = cfg.spool.dir / "done" / path.stem
        info: dict[str, Any] = orjson.loads((done / "job.json").read_bytes())
        outputs = {}
        for raw in (done / "output.jsonl").read_bytes().splitlines():
            r = orjson.loads(raw)
            outputs[r["custom_id"]] = r["response"]["body"]["usage"].get("completion_tokens", 0)
        return info, outputs
    finally:
        await runner.cleanup()
        state.close()


def pct(est: int, true: int) -> str:
    return f"{(est - true) / true:+.0%}" if true else "-"


def main() -> int:
    """Run and print the table."""
    p = parser(__doc__)
    a = p.parse_args()
    logs.setup("warning", "json")
    book = PriceBook("openai")
    rows: list[Row] = []
    notes: list[str] = []
    with workdir("cost") as d:
        files = {
            "demo requests.jsonl (make demo)": sample_lines(),
            "tests/data/good/chat.jsonl": (ROOT / "tests/data/good/chat.jsonl").read_bytes(),
            "tests/data/good/embeddings.jsonl": (
                ROOT / "tests/data/good/embeddings.jsonl"
            ).read_bytes(),
            "README paragraphs, summarised": prose_lines(20 if a.smoke else 200),
        }
        for i, (label, data) in enumerate(files.items()):
            path = d / f"f{i}.jsonl"
            path.write_bytes(data)
            default = estimate(path, book, tokenizer=False)
            sampled = estimate(path, book, tokenizer=True)
            counts = openai_count(path)
            true = sum(counts.values())
            info, outputs = asyncio.run(run(path, d / f"w{i}"))
            cost = info["cost"]
            low, high = default.cost_low, default.cost_high
            assert isinstance(low, int) and isinstance(high, int)
            # What OpenAI would bill for the same answers: its input count of the billed
            # requests and the emulator's output tokens, at the same batch price.
            price = book.price(info["model"])
            assert isinstance(price, Price), price
            rates = price.rates[0]
            openai = round(
                sum(counts[c] * rates.input + n * rates.output for c, n in outputs.items()) / 1e6
            )
            rows.append(
                Row(
                    f"{label}: input tokens, estimate bytes/4 (default) / tokenized sample",
                    f"{default.input_tokens:,} ({pct(default.input_tokens, true)}) / "
                    f"{sampled.input_tokens:,} ({pct(sampled.input_tokens, true)})",
                    f"{true:,} as OpenAI counts; the emulator billed "
                    f"{cost['input_tokens']:,} ({cost['requests_billed']} of "
                    f"{default.requests} requests)",
                    "-",
                    "-",
                    None,
                )
            )
            rows.append(
                Row(
                    f"{label}: cost, estimate low-high vs billed at OpenAI's input count "
                    "(the emulator's bill)",
                    f"{format_usd(low, 6)}-{format_usd(high, 6)}",
                    f"{format_usd(openai, 6)} ({format_usd(cost['nanousd'], 6)})",
                    f"{pct(openai, low)} of low, {openai / high:.0%} of high",
                    "<= high (what a budget reserves)",
                    openai <= high,
                )
            )
        notes.append(
            "OpenAI count: every line tokenized (o200k_base / cl100k_base, bpe-openai) in "
            "OpenAI's chat format; the emulator bills the JSON body's bytes / 4, so its "
            "input is not OpenAI's and its replies are a few tokens long."
        )
    print_table(
        "Estimate vs actual (bench.cost_accuracy)",
        rows,
        notes,
        columns=("estimate", "actual"),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
