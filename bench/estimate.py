"""Cost estimate at intake: validation with the estimate vs validation alone.

    python -m bench.estimate [--smoke] [--lines N] [--line-bytes B] [--reps N]

A chat-completions file of 50,000 lines (~1 KB each by default) is validated by
`jsonl.Validator`, alone (the baseline) and with a `batchd.estimate.Estimator` fed
every parsed line through the validator's `on_request` hook (as intake and `batchd
validate` wire it: the line is parsed once). Variants: bytes/4 (the default), the
sampled tokenizer (`[estimate] tokenizer = true`: the first 32 lines, then one in 256),
and every line tokenized (why sampling is the option). In-process, one core, CPU time,
medians.
Target: the default estimate keeps validation within 1.5x of validation alone.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from batchd import jsonl
from batchd.estimate import Estimator, encoding_for_model, token_counter
from batchd.prices import PriceBook
from bench.common import Row, chat_file, fmt_ratio, median, parser, print_table, workdir


def _run(path: Path, estimator: Estimator | None) -> float:
    """CPU seconds to validate (and estimate) the file, reading it in 1 MiB chunks.

    CPU time of this (single-threaded) process, not wall time: on a shared 2-core
    machine the wall time mostly measures the neighbours.
    """
    hook = None if estimator is None else estimator.add
    v = jsonl.Validator(jsonl.UNBOUNDED, on_request=hook)
    t = time.process_time()
    with path.open("rb", buffering=0) as f:
        while chunk := f.read(1 << 20):
            v.feed(chunk)
    summary = v.finish()
    if estimator is not None:
        estimator.finish()
    elapsed = time.process_time() - t
    assert summary.ok, summary.problems[:3]
    return elapsed


def main() -> int:
    """Run and print the table."""
    p = parser(__doc__)
    p.add_argument("--lines", type=int, help="request lines (default 50,000; smoke 2,000)")
    p.add_argument("--line-bytes", type=int, default=1000, help="bytes per line (default 1000)")
    p.add_argument("--reps", type=int, help="runs per variant (default 5; smoke 1)")
    a = p.parse_args()
    lines = a.lines or (2_000 if a.smoke else 50_000)
    reps = a.reps or (1 if a.smoke else 5)
    model = "gpt-4o-mini"
    book = PriceBook("openai")
    book.price(model)  # load the price database outside the timings
    has_tokenizer = token_counter(encoding_for_model(model)) is not None
    variants: dict[str, dict[str, Any]] = {
        "bytes/4 (default)": {"tokenizer": False},
        "sampled tokenizer": {"tokenizer": True},
        "every line tokenized": {"tokenizer": True, "sample_head": lines, "sample_every": 1},
    }
    with workdir("estimate") as d:
        path = d / "in.jsonl"
        size = chat_file(path, lines, lines * a.line_bytes, model)
        times: dict[str, list[float]] = {"validate": [], **{k: [] for k in variants}}
        last: dict[str, str] = {}
        for _ in range(reps):
            times["validate"].append(_run(path, None))
            for name, kw in variants.items():
                est = Estimator(book.price, **kw)
                times[name].append(_run(path, est))
                last[name] = est.finish().describe()
    base = median(times["validate"])
    rows = [
        Row(
            "validate alone: lines/s",
            "-",
            f"{lines / base:,.0f} ({size / base / 1e6:,.0f} MB/s)",
            "-",
            "-",
            None,
        )
    ]
    for name in variants:
        t = median(times[name])
        target = "<= 1.50x" if name.endswith("(default)") else "-"
        met = t / base <= 1.5 if name.endswith("(default)") else None
        rows.append(
            Row(
                f"validate + estimate, {name}: lines/s",
                f"{lines / t:,.0f} ({size / t / 1e6:,.0f} MB/s)",
                f"{lines / base:,.0f}",
                fmt_ratio(t, base),
                target,
                met,
            )
        )
    notes = [
        f"{lines:,} lines, {size / 1e6:.1f} MB, {reps} run(s) per variant, medians; ratio ="
        " time with the estimate / time of validation alone.",
        "tokenizer installed: "
        + ("yes (bpe-openai)" if has_tokenizer else "no: the tokenizer variants are bytes/4"),
        *(f"{name}: {text}" for name, text in last.items()),
    ]
    print_table("Cost estimate at intake", rows, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
