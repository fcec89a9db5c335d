"""Drop latency: rename of a small file into inbox/ -> its batch exists on the server.

    python -m bench.drop_latency [--smoke] [--drops N]

One daemon (default config) and one emulator; N drops one after another (each
waits for its batch). The clock starts at the rename(2) and stops when the
emulator lists the new batch (polled every millisecond). Baseline: the SDK doing
the same upload + create for the same file, timed in-process, alternating with
batchd drop by drop. Target: batchd p50 <= 50 ms.
"""

from __future__ import annotations

import time

from bench.common import (
    API_KEY,
    Daemon,
    Emulator,
    Row,
    fmt_ratio,
    median,
    parser,
    percentile,
    print_table,
    small_chat,
    wait_until,
    workdir,
)


def main() -> int:
    """Run the drops and print the table."""
    p = parser(__doc__)
    p.add_argument("--drops", type=int, help="number of drops per side (default 200; smoke 10)")
    a = p.parse_args()
    n = a.drops or (10 if a.smoke else 200)
    from openai import OpenAI

    ours: list[float] = []
    theirs: list[float] = []
    with workdir("drop") as tmp, Emulator(time_scale=100) as emu:
        client = OpenAI(api_key=API_KEY, base_url=emu.url, max_retries=0)
        src = tmp / "small.jsonl"
        src.write_bytes(small_chat(3))
        with Daemon(tmp / "d", emu.url) as d:
            time.sleep(0.5)
            for i in range(n):
                for side in ("batchd", "sdk") if i % 2 == 0 else ("sdk", "batchd"):
                    before = emu.newest_batch()
                    if side == "batchd":
                        t0 = d.drop(src, f"drop-{i}.jsonl")
                        t1 = wait_until(lambda b=before: emu.newest_batch() != b, 30, 0.001)
                        ours.append(t1 - t0)
                    else:
                        t0 = time.perf_counter()
                        with src.open("rb") as f:
                            up = client.files.create(file=f, purpose="batch")
                        client.batches.create(
                            input_file_id=up.id,
                            endpoint="/v1/chat/completions",
                            completion_window="24h",
                        )
                        theirs.append(time.perf_counter() - t0)
                    time.sleep(0.02)  # let each side finish its bookkeeping
        client.close()
    rows = []
    for label, f in (("p50", median), ("p95", lambda xs: percentile(xs, 95))):
        ms_b, ms_s = f(ours) * 1000, f(theirs) * 1000
        rows.append(
            Row(
                f"drop -> batch created, {label} (ms)",
                f"{ms_b:.1f}",
                f"{ms_s:.1f}",
                fmt_ratio(ms_b, ms_s),
                "<= 50 ms" if label == "p50" else "-",
                ms_b <= 50 if label == "p50" else None,
            )
        )
    notes = [
        f"{n} drops per side (3-line chat files), alternating; baseline = SDK "
        "files.create + batches.create in-process (no rename/claim/validation/SQLite)",
        f"batchd max {max(ours) * 1000:.1f} ms; sdk max {max(theirs) * 1000:.1f} ms",
    ]
    print_table("Drop latency (bench.drop_latency)", rows, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
