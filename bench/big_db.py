"""A year of history: the daemon with 1,000,000 finished jobs in its database, beside
the same daemon with an empty one.

    python -m bench.big_db [--smoke] [--jobs N] [--seconds S] [--drops N] [--poll S]
                           [--drop-budget S] [--cache-dir DIR]

The database comes from `bench.finished_db` (built once, then cached; each run
writes to a copy). For each side, a fresh daemon (`poll_interval_seconds` = 0.1)
and in-process emulator: the daemon is left to settle, then

- idle: CPU (% of one core) and RSS of its process tree over S seconds (60; smoke 2);
- drop -> batch: N small files (50; smoke 3) renamed into inbox/ one at a time, each
  timed until the emulator has created its batch; p50 and p95 (no new drop once
  --drop-budget seconds, 300, are spent: a slow daemon reports fewer);
- the CLI, as a user runs it beside the daemon: `batchd show NAME` (the newest
  job, and on the big side one from half a year ago; median of 5 runs) and
  `batchd jobs` (wall time, lines printed, peak RSS).

Targets: idle <= 0.5 %, p50 <= 50 ms, show and jobs <= 300 ms, RSS <= 100 MB; the
same figures as with an empty database.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import rowclone
from bench.common import (
    Daemon,
    InProcessEmulator,
    Row,
    fmt_ratio,
    mb,
    median,
    parser,
    percentile,
    print_table,
    small_chat,
    tree_rss,
    watch,
    workdir,
)
from bench.finished_db import finished_db


@dataclass
class Side:
    """The figures of one daemon."""

    ready_s: float = 0.0
    idle_cpu: float = 0.0
    rss: int = 0
    drops: list[float] = field(default_factory=list)
    lost: int = 0  # drops whose batch did not appear within the timeout
    drops_cut: bool = False  # stopped early: --drop-budget spent
    cli_floor: list[float] = field(default_factory=list)  # `batchd --version`
    show_new: list[float] = field(default_factory=list)
    show_old: list[float] = field(default_factory=list)
    jobs_s: float = 0.0
    jobs_lines: int = 0
    jobs_rss: int = 0


def measure(work: Path, database: Path | None, old_name: str | None, a: argparse.Namespace) -> Side:
    """Start a daemon on `database` (None: empty) and take every figure."""
    side = Side()
    src = work / "drop.jsonl"
    work.mkdir(parents=True, exist_ok=True)
    src.write_bytes(small_chat(3))
    # Dropped batches stay in_progress: nothing finishes while the figures are taken.
    with InProcessEmulator(validating_seconds=0.0, in_progress_seconds=1e9) as emu:
        with Daemon(
            work / "d",
            emu.url,
            database=database,
            ready_timeout=900,
            batch={"poll_interval_seconds": a.poll},
            # The figure is a store that holds a million finished jobs: none of them may
            # be deleted by retention while it is taken.
            retention={"jobs_days": 0},
        ) as d:
            side.ready_s = d.ready_s
            time.sleep(a.settle)
            ((side.idle_cpu, side.rss),) = watch([d.proc.pid], a.seconds)
            t_drops = time.perf_counter()
            for k in range(a.drops):
                if time.perf_counter() - t_drops > a.drop_budget:
                    side.drops_cut = True  # far too slow: the figure is clear already
                    break
                n0 = emu.created
                t0 = d.drop(src, f"drop-{k:03d}.jsonl")
                try:
                    side.drops.append(emu.wait_created(n0 + 1, a.drop_timeout) - t0)
                except TimeoutError:
                    side.lost += 1
                time.sleep(0.02)  # let the daemon finish its bookkeeping
            side.rss = max(side.rss, tree_rss(d.proc.pid))
            newest = f"drop-{len(side.drops) + side.lost - 1:03d}"
            side.show_new = [d.cli("show", newest)[0] for _ in range(a.reps)]
            if old_name:
                side.show_old = [d.cli("show", old_name)[0] for _ in range(a.reps)]
            side.jobs_s, side.jobs_rss, side.jobs_lines = d.cli("jobs", timeout=a.cli_timeout)
            side.cli_floor = [d.cli("--version")[0] for _ in range(a.reps)]
            side.rss = max(side.rss, tree_rss(d.proc.pid))
    return side


def _ms(xs: list[float], p: float = 50) -> str:
    return f"{percentile(xs, p) * 1000:.1f}" if xs else "-"


def main() -> int:
    """Measure both sides and print the table."""
    p = parser(__doc__)
    p.add_argument("--jobs", type=int, help="finished jobs (default 1,000,000; smoke 2,000)")
    p.add_argument("--seconds", type=float, help="idle window (default 60; smoke 2)")
    p.add_argument("--drops", type=int, help="drops per side (default 50; smoke 3)")
    p.add_argument("--poll", type=float, default=0.1, help="poll_interval_seconds (0.1)")
    p.add_argument("--drop-budget", type=float, default=300.0, help="stop dropping after S s (300)")
    p.add_argument("--cache-dir", type=Path, help="of bench.finished_db")
    a = p.parse_args()
    a.jobs = a.jobs or (2_000 if a.smoke else 1_000_000)
    a.seconds = a.seconds or (2.0 if a.smoke else 60.0)
    a.drops = a.drops or (3 if a.smoke else 50)
    a.settle = 0.5 if a.smoke else 5.0
    a.reps = 1 if a.smoke else 5
    a.drop_timeout = 60.0
    a.cli_timeout = 900.0
    with workdir("bigdb") as tmp:
        t = time.perf_counter()
        built = finished_db(a.jobs, tmp / "cache" if a.smoke else a.cache_dir, a.smoke)
        build_s = time.perf_counter() - t
        old = rowclone.name_of((a.jobs - 4) // 2)
        empty = measure(tmp / "empty", None, None, a)
        big = measure(tmp / "big", built.path, old, a)
    label = f"{a.jobs / 1e6:g}M DB" if a.jobs >= 1_000_000 else f"{a.jobs:,}-job DB"

    p50_e, p50_b = percentile(empty.drops, 50), percentile(big.drops, 50)
    show_e, show_b = median(empty.show_new), median(big.show_new)
    show_old = median(big.show_old)
    rows = [
        Row(
            f"idle CPU over {a.seconds:g} s, poll {a.poll:g} s (% of one core)",
            f"{empty.idle_cpu:.2f} %",
            f"{big.idle_cpu:.2f} %",
            fmt_ratio(big.idle_cpu, empty.idle_cpu),
            "<= 0.5 %",
            big.idle_cpu <= 0.5,
        ),
        Row(
            f"drop -> batch created, p50 (ms; {len(big.drops)} drops)",
            _ms(empty.drops),
            _ms(big.drops),
            fmt_ratio(p50_b, p50_e),
            "<= 50 ms",
            bool(big.drops) and p50_b <= 0.05,
        ),
        Row(
            "drop -> batch created, p95 (ms)",
            _ms(empty.drops, 95),
            _ms(big.drops, 95),
            fmt_ratio(percentile(big.drops, 95), percentile(empty.drops, 95)),
            "-",
            None,
        ),
        Row(
            "`batchd show NAME`, newest job (ms, median)",
            f"{show_e * 1000:.0f}",
            f"{show_b * 1000:.0f}",
            fmt_ratio(show_b, show_e),
            "<= 300 ms",
            show_b <= 0.3,
        ),
        Row(
            "`batchd show NAME`, a job from half a year ago (ms)",
            "-",
            f"{show_old * 1000:.0f}",
            fmt_ratio(show_old, show_e),
            "<= 300 ms",
            show_old <= 0.3,
        ),
        Row(
            "`batchd --version`: the CLI's start-up alone (ms, median)",
            f"{median(empty.cli_floor) * 1000:.0f}",
            f"{median(big.cli_floor) * 1000:.0f}",
            "-",
            "-",
            None,
        ),
        Row(
            "`batchd jobs` (ms)",
            f"{empty.jobs_s * 1000:.0f}",
            f"{big.jobs_s * 1000:.0f}",
            fmt_ratio(big.jobs_s, empty.jobs_s),
            "<= 300 ms",
            big.jobs_s <= 0.3,
        ),
        Row(
            "daemon RSS, max",
            mb(empty.rss),
            mb(big.rss),
            fmt_ratio(big.rss, empty.rss),
            "<= 100 MB",
            big.rss <= 100e6,
        ),
        Row(
            "daemon start -> ready (s)",
            f"{empty.ready_s:.1f}",
            f"{big.ready_s:.1f}",
            fmt_ratio(big.ready_s, empty.ready_s),
            "-",
            None,
        ),
    ]
    notes = [
        f"{label}: {a.jobs:,} finished jobs over the past year ({mb(built.bytes)}; "
        + ("from the cache" if built.cached else f"built in {built.build_seconds:.0f} s")
        + f"; {build_s:.0f} s to make ready), old job `{old}`. Each side: a fresh daemon "
        f"(poll_interval_seconds = {a.poll:g}) settled {a.settle:g} s before the idle window.",
        f"`batchd jobs` printed {empty.jobs_lines:,} / {big.jobs_lines:,} lines, "
        f"peak RSS {mb(empty.jobs_rss)} / {mb(big.jobs_rss)} (empty / big).",
        f"drops whose batch took over {a.drop_timeout:g} s (not counted): "
        f"{empty.lost} / {big.lost}"
        + "".join(
            f"; {name}: drops stopped after {a.drop_budget:g} s"
            for name, side in (("empty", empty), ("big", big))
            if side.drops_cut
        )
        + ".",
    ]
    print_table("A year of history (bench.big_db)", rows, notes, ("empty DB", label))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
