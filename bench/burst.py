"""Burst: 1,000 small files dropped at once; time until every batch exists.

    python -m bench.burst [--smoke] [--files N] [--reps N]

The files are written beside the inbox first, then renamed in as fast as possible;
the clock runs from the first rename until the emulator has created N batches.
Baseline: the SDK script submitting the same N files one after another (upload +
create each). Fresh emulator and daemon per repetition; sides alternate; medians.
Target: batchd <= 15 s for 1,000 files.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from bench.common import (
    PY,
    Daemon,
    Emulator,
    PeakRss,
    Row,
    Script,
    fmt_ratio,
    mb,
    median,
    parser,
    print_table,
    small_chat,
    tree_cpu,
    wait_until,
    workdir,
)


def run_batchd(files: list[Path], work: Path) -> tuple[float, int, float]:
    """Seconds from the first rename to the last batch created; peak RSS; CPU seconds."""
    with Emulator(time_scale=100) as emu, Daemon(work, emu.url) as d:
        staged = []
        for i, src in enumerate(files):
            part = d.spool / f".b{i}.part"
            os.link(src, part)
            staged.append((part, d.inbox / f"burst-{i:04d}.jsonl"))
        time.sleep(0.3)
        with PeakRss(d.proc.pid, every=0.05) as rss:
            c0 = tree_cpu(d.proc.pid)
            t0 = time.perf_counter()
            for part, dest in staged:
                os.rename(part, dest)
            n = len(files)
            t1 = wait_until(lambda: emu.stats()["batches_created"] >= n, 600, every=0.25)
            cpu = tree_cpu(d.proc.pid) - c0
        return t1 - t0, rss.peak, cpu


def run_sdk(files: list[Path]) -> tuple[float, float]:
    """Seconds the SDK script took to upload and create every file, one by one; its CPU
    seconds (whole process, so including start-up)."""
    with Emulator(time_scale=100) as emu:
        s = Script([PY, "-m", "bench.sdk_submit", *map(str, files), "--base-url", emu.url])
        s.run()
        assert emu.stats()["batches_created"] == len(files)
        return float(s.result["seconds"]), s.cpu


def main() -> int:
    """Run the bursts and print the table."""
    p = parser(__doc__)
    p.add_argument("--files", type=int, help="files per burst (default 1000; smoke 20)")
    p.add_argument("--reps", type=int, help="repetitions per side (default 3; smoke 1)")
    a = p.parse_args()
    n = a.files or (20 if a.smoke else 1000)
    reps = a.reps or (1 if a.smoke else 3)
    target = 15.0 * n / 1000
    ours: list[float] = []
    rss: list[int] = []
    theirs: list[float] = []
    cpu_ours: list[float] = []
    cpu_theirs: list[float] = []
    with workdir("burst") as tmp:
        files = []
        for i in range(n):
            f = tmp / f"src-{i:04d}.jsonl"
            f.write_bytes(small_chat(3, tag=str(i)))
            files.append(f)
        for r in range(reps):
            for side in ("batchd", "sdk") if r % 2 == 0 else ("sdk", "batchd"):
                if side == "batchd":
                    t, peak, cpu = run_batchd(files, tmp / f"d{r}")
                    ours.append(t)
                    rss.append(peak)
                    cpu_ours.append(cpu)
                else:
                    t, cpu = run_sdk(files)
                    theirs.append(t)
                    cpu_theirs.append(cpu)
    mo, mt = median(ours), median(theirs)
    rows = [
        Row(
            f"{n} files dropped at once -> all batches created (s)",
            f"{mo:.2f}",
            f"{mt:.2f}",
            fmt_ratio(mo, mt),
            f"<= {target:g} s",
            mo <= target,
        ),
        Row("batches created per second", f"{n / mo:.0f}", f"{n / mt:.0f}", "-", "-", None),
        Row(
            "client CPU per file (ms)",
            f"{median(cpu_ours) / n * 1000:.1f}",
            f"{median(cpu_theirs) / n * 1000:.1f}",
            fmt_ratio(median(cpu_ours), median(cpu_theirs)),
            "-",
            None,
        ),
        Row("batchd peak RSS during the burst", mb(max(rss)), "-", "-", "-", None),
    ]
    notes = [
        f"{reps} run(s) per side, alternating; medians. batchd runs (s): "
        f"{[round(x, 2) for x in ours]}; sdk runs (s): {[round(x, 2) for x in theirs]}",
        "baseline = the SDK script submitting the files sequentially, no validation",
    ]
    print_table("Burst (bench.burst)", rows, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
