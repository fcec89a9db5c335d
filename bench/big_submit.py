"""Big submission: a ~190 MB, 50,000-line chat file from drop to batch created.

    python -m bench.big_submit [--smoke] [--reps N]

(A) loopback: batchd (rename into inbox -> batch visible on the emulator) vs the
SDK script that checks every line with `json.loads`, then `files.create` +
`batches.create`. Target: batchd <= 0.6x.
(B) emulator throttled to 50 MB/s: batchd vs the SDK script without validation.
Target: batchd <= 1.05x. In both, batchd's peak RSS (process tree) <= 80 MB.

Each repetition uses a fresh emulator and, for batchd, a fresh daemon (spool,
database) started and ready before the clock starts. Sides alternate; medians.
"""

from __future__ import annotations

import time
from pathlib import Path

from bench.common import (
    PY,
    Daemon,
    Emulator,
    PeakRss,
    Row,
    Script,
    chat_file,
    fmt_ratio,
    mb,
    median,
    parser,
    print_table,
    wait_until,
    workdir,
)

RSS_LIMIT = 80e6


def run_batchd(src: Path, work: Path, emu_args: list[str], timeout: float) -> tuple[float, int]:
    """Seconds from the rename into inbox/ to the batch existing; peak RSS of the daemon."""
    with Emulator(*emu_args) as emu, Daemon(work, emu.url) as d:
        time.sleep(0.3)  # let the daemon settle into its idle loop
        with PeakRss(d.proc.pid) as rss:
            t0 = d.drop(src, "big.jsonl")
            t1 = wait_until(lambda: emu.stats()["batches_created"] >= 1, timeout, every=0.005)
        return t1 - t0, rss.peak


def run_sdk(src: Path, emu_args: list[str], validate: bool) -> tuple[float, int]:
    """Seconds the SDK script took to create the batch; its peak RSS."""
    with Emulator(*emu_args) as emu:
        args = [PY, "-m", "bench.sdk_submit", str(src), "--base-url", emu.url]
        s = Script(args + (["--validate"] if validate else [])).run()
        assert emu.stats()["batches_created"] == 1
        return float(s.result["seconds"]), s.peak_rss


def scenario(
    src: Path, tmp: Path, reps: int, emu_args: list[str], validate: bool, timeout: float
) -> tuple[list[float], list[int], list[float], list[int]]:
    """Alternate batchd and the SDK `reps` times each."""
    bt, br, st, sr = [], [], [], []
    for i in range(reps):
        order = ("batchd", "sdk") if i % 2 == 0 else ("sdk", "batchd")
        for side in order:
            if side == "batchd":
                t, r = run_batchd(src, tmp / f"d{len(bt)}-{time.time_ns()}", emu_args, timeout)
                bt.append(t)
                br.append(r)
            else:
                t, r = run_sdk(src, emu_args, validate)
                st.append(t)
                sr.append(r)
    return bt, br, st, sr


def main() -> int:
    """Run both scenarios and print the table."""
    p = parser(__doc__)
    p.add_argument("--reps", type=int, help="repetitions per side (default 5; smoke 1)")
    a = p.parse_args()
    reps = a.reps or (1 if a.smoke else 5)
    lines, size = (500, 2_000_000) if a.smoke else (50_000, 190_000_000)
    rows: list[Row] = []
    notes: list[str] = []
    with workdir("big") as tmp:
        src = tmp / "big.jsonl"
        t = time.perf_counter()
        actual = chat_file(src, lines, size)
        notes.append(
            f"input: {lines} lines, {mb(actual)} (generated in {time.perf_counter() - t:.1f} s); "
            f"{reps} run(s) per side, alternating; medians"
        )
        slow = ["--bandwidth-bytes-per-s", "50000000"]
        for label, emu_args, validate, target in (
            ("A loopback, SDK validates with json.loads", [], True, 0.6),
            ("B 50 MB/s link, SDK plain upload", slow, False, 1.05),
        ):
            timeout = 60 if not emu_args else 60 + 3 * actual / 50e6
            bt, br, st, sr = scenario(src, tmp, reps, emu_args, validate, timeout)
            mb_t, ms_t = median(bt), median(st)
            scen = label.split()[0]
            rows.append(
                Row(
                    f"{label}: drop -> batch created (s)",
                    f"{mb_t:.3f}",
                    f"{ms_t:.3f}",
                    fmt_ratio(mb_t, ms_t),
                    f"<= {target}x",
                    mb_t <= target * ms_t,
                )
            )
            rows.append(
                Row(
                    f"{scen}: peak RSS, process tree",
                    mb(max(br)),
                    mb(max(sr)),
                    fmt_ratio(max(br), max(sr)),
                    "batchd <= 80 MB",
                    max(br) <= RSS_LIMIT,
                )
            )
            notes.append(
                f"{scen} runs (s): batchd {[round(x, 3) for x in bt]}, "
                f"sdk {[round(x, 3) for x in st]}"
            )
    print_table("Big submission (bench.big_submit)", rows, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
