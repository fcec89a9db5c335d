"""Burst: 10,000 one-request files dropped at once; time until every batch exists.

    python -m bench.burst [--smoke] [--files N] [--reps N] [--timeout S] [--no-baseline]

The files are linked beside the inbox first, then renamed in as fast as possible;
the clock runs from the first rename. Measured: when the inbox is empty (every file
moved to processing/), when the daemon's database holds a job for each (a read-only
look at the `jobs` table), when the emulator (in-process, every call observed) has
created N batches, the creation rate in the first 30 s, overall and in the last
30 s, and the daemon's CPU and peak RSS. The batches validate in 1 s and then stay
in_progress, so the daemon also tracks what it created, as it would for real.
A run still short of N batches after --timeout seconds (default 300) reports what
it reached. Baseline: the SDK script submitting the same files one after another.
Target: batchd <= 120 s for 10,000 files on 2 cores (scaled to N).
"""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    PY,
    Daemon,
    InProcessEmulator,
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
    workdir,
)

EMULATOR: dict[str, Any] = {"validating_seconds": 1.0, "in_progress_seconds": 1e9}


@dataclass
class Run:
    """One burst into batchd."""

    n: int
    wall: float  # seconds watched (all created, or the timeout)
    claimed_s: float | None  # inbox empty
    claimed: int  # files out of the inbox at the end
    recorded_s: float | None  # a job row for every file
    recorded: int  # job rows at the end
    created: list[float]  # seconds from the first rename to each batch created
    cpu: float  # daemon CPU seconds over `wall`
    peak_rss: int

    @property
    def done_s(self) -> float | None:
        """Seconds until the N-th batch existed (None: not within the timeout)."""
        return self.created[self.n - 1] if len(self.created) >= self.n else None

    def rate(self, start: float, end: float) -> float:
        """Batches created per second in [start, end) seconds after the first rename."""
        start, end = max(0.0, start), min(end, self.wall)
        k = sum(1 for t in self.created if start <= t <= end)
        return k / (end - start) if end > start else 0.0


def _jobs(db: Path) -> int:
    """Rows in the daemon's jobs table (a read-only look; -1 if it cannot be read now)."""
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return int(con.execute("SELECT COUNT(*) FROM jobs").fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error:
        return -1


def _waiting(inbox: Path) -> int:
    with os.scandir(inbox) as it:
        return sum(1 for e in it if e.name.startswith("burst-"))


def run_batchd(files: list[Path], work: Path, timeout: float) -> Run:
    """Drop every file at once into a fresh daemon; watch until all batches exist."""
    n = len(files)
    with InProcessEmulator(**EMULATOR) as emu, Daemon(work, emu.url) as d:
        staged = []
        for i, src in enumerate(files):
            part = d.spool / f".b{i}.part"
            os.link(src, part)
            staged.append((part, d.inbox / f"burst-{i:05d}.jsonl"))
        time.sleep(0.3)
        with PeakRss(d.proc.pid, every=0.1) as rss:
            c0 = tree_cpu(d.proc.pid)
            t0 = time.perf_counter()
            for part, dest in staged:
                os.rename(part, dest)
            claimed_s = recorded_s = None
            while True:
                now = time.perf_counter()
                if claimed_s is None and _waiting(d.inbox) == 0:
                    claimed_s = now - t0
                if recorded_s is None and _jobs(d.work / "batchd.db") >= n:
                    recorded_s = now - t0
                if emu.created >= n or now - t0 >= timeout:
                    break
                time.sleep(0.25)
            wall = min(time.perf_counter(), t0 + timeout) - t0
            cpu = tree_cpu(d.proc.pid) - c0
            claimed = n - _waiting(d.inbox)
            recorded = _jobs(d.work / "batchd.db")
        created = sorted(t - t0 for t in emu.created_at)
    if len(created) >= n:
        wall = created[n - 1]
    return Run(n, wall, claimed_s, claimed, recorded_s, recorded, created, cpu, rss.peak)


def run_sdk(files: list[Path], timeout: float) -> tuple[float, float]:
    """Seconds the SDK script took to upload and create every file, one by one; its CPU
    seconds (whole process, so including start-up)."""
    with InProcessEmulator(**EMULATOR) as emu:
        s = Script([PY, "-m", "bench.sdk_submit", *map(str, files), "--base-url", emu.url])
        s.run(timeout)
        assert emu.created == len(files)
        return float(s.result["seconds"]), s.cpu


def _s(x: float | None, run: Run) -> str:
    return f"{x:.1f}" if x is not None else f"> {run.wall:.0f}"


def main() -> int:
    """Run the bursts and print the table."""
    p = parser(__doc__)
    p.add_argument("--files", type=int, help="files per burst (default 10000; smoke 20)")
    p.add_argument("--reps", type=int, default=1, help="repetitions per side (default 1)")
    p.add_argument("--timeout", type=float, help="give up after S s (default 300; smoke 60)")
    p.add_argument("--no-baseline", action="store_true", help="skip the SDK script")
    a = p.parse_args()
    n = a.files or (20 if a.smoke else 10_000)
    timeout = a.timeout or (60.0 if a.smoke else 300.0)
    target = 120.0 * n / 10_000
    runs: list[Run] = []
    theirs: list[float] = []
    cpu_theirs: list[float] = []
    with workdir("burst") as tmp:
        files = []
        for i in range(n):
            f = tmp / f"src-{i:05d}.jsonl"
            f.write_bytes(small_chat(1, tag=str(i)))
            files.append(f)
        for r in range(a.reps):
            for side in ("batchd", "sdk") if r % 2 == 0 else ("sdk", "batchd"):
                if side == "batchd":
                    runs.append(run_batchd(files, tmp / f"d{r}", timeout))
                elif not a.no_baseline:
                    t, cpu = run_sdk(files, max(600.0, timeout))
                    theirs.append(t)
                    cpu_theirs.append(cpu)
    # The median run by time to all batches (a run that timed out counts as slowest).
    run = sorted(runs, key=lambda x: (x.done_s is None, x.done_s or 0.0, -len(x.created)))[
        len(runs) // 2
    ]
    mt = median(theirs)
    base = (lambda s: s) if theirs else (lambda s: "-")
    done = run.done_s
    rows = [
        Row(
            f"{n} files dropped at once -> all claimed, inbox empty (s)",
            _s(run.claimed_s, run) + ("" if run.claimed_s else f" ({run.claimed} claimed)"),
            "-",
            "-",
            "-",
            None,
        ),
        Row(
            f"{n} files dropped at once -> a job recorded for each (s)",
            _s(run.recorded_s, run) + ("" if run.recorded_s else f" ({run.recorded} jobs)"),
            "-",
            "-",
            "-",
            None,
        ),
        Row(
            f"{n} files dropped at once -> all batches created (s)",
            _s(done, run) + ("" if done else f" ({len(run.created)} created)"),
            base(f"{mt:.1f}"),
            fmt_ratio(done, mt) if done and theirs else "-",
            f"<= {target:g} s",
            done is not None and done <= target,
        ),
        Row(
            "batches created per second: first 30 s / overall / last 30 s",
            f"{run.rate(0, 30):.1f} / {len(run.created[:n]) / run.wall:.1f} / "
            f"{run.rate(run.wall - 30, run.wall):.1f}",
            base(f"{n / mt:.1f}" if mt else "-"),
            "-",
            "-",
            None,
        ),
        Row(
            "daemon CPU during the burst (% of one core)",
            f"{run.cpu / run.wall * 100:.0f} %",
            "-",
            "-",
            "-",
            None,
        ),
        Row(
            "client CPU per file (ms)",
            f"{run.cpu / max(1, len(run.created[:n])) * 1000:.1f}",
            base(f"{median(cpu_theirs) / n * 1000:.1f}"),
            fmt_ratio(run.cpu / max(1, len(run.created[:n])), median(cpu_theirs) / n)
            if theirs
            else "-",
            "-",
            None,
        ),
        Row("batchd peak RSS during the burst", mb(run.peak_rss), "-", "-", "-", None),
    ]
    notes = [
        f"{a.reps} run(s) per side; the median run shown. batchd runs, s to all batches: "
        f"{[round(x.done_s, 1) if x.done_s else f'>{x.wall:.0f}' for x in runs]}; "
        f"sdk runs (s): {[round(x, 1) for x in theirs] or 'skipped'}",
        "batches created at 30/60/120/300 s: "
        + " / ".join(str(sum(1 for t in run.created if t < s)) for s in (30, 60, 120, 300)),
        "baseline = the SDK script submitting the files sequentially, no validation",
    ]
    print_table("Burst (bench.burst)", rows, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
