"""Idle cost: CPU and RSS of a daemon with nothing to do (empty database).

    python -m bench.idle [--smoke] [--seconds S] [--poll S]

A ready daemon (empty spool and database, `poll_interval_seconds` = 0.1 unless
--poll) is watched for S seconds (60; smoke 3): CPU time of its process tree over
wall time, and its RSS. Baseline, in the same window: the SDK script waiting on one
in-flight batch (poll `retrieve` every 30 s). Target: <= 0.5 % of one core, <= 80 MB.
(`bench.big_db` measures the same with 1,000,000 finished jobs in the database.)
"""

from __future__ import annotations

import subprocess
import time

from bench.common import (
    PY,
    ROOT,
    Daemon,
    Emulator,
    Row,
    _env,
    fmt_ratio,
    mb,
    parser,
    print_table,
    small_chat,
    wait_until,
    watch,
    workdir,
)


def main() -> int:
    """Measure and print the table."""
    p = parser(__doc__)
    p.add_argument("--seconds", type=float, help="window (default 60; smoke 3)")
    p.add_argument("--poll", type=float, default=0.1, help="poll_interval_seconds (0.1)")
    a = p.parse_args()
    window = a.seconds or (3.0 if a.smoke else 60.0)
    with (
        workdir("idle") as tmp,
        Emulator(time_scale=10_000) as emu,
        Daemon(tmp / "d", emu.url, batch={"poll_interval_seconds": a.poll}) as d,
    ):
        src = tmp / "one.jsonl"
        src.write_bytes(small_chat(3))
        sdk = subprocess.Popen(
            [PY, "-m", "bench.sdk_submit", str(src), "--base-url", emu.url, "--poll", "30"],
            cwd=ROOT,
            env=_env(),
            stdout=subprocess.DEVNULL,
        )
        try:
            wait_until(lambda: emu.stats()["batches_created"] >= 1, 60, every=0.05)
            time.sleep(2.0)  # both settled: start-up work done
            (cpu_d, rss_d), (cpu_s, rss_s) = watch([d.proc.pid, sdk.pid], window)
        finally:
            sdk.terminate()
            sdk.wait()
    rows = [
        Row(
            f"CPU over {window:g} s, poll {a.poll:g} s (% of one core)",
            f"{cpu_d:.2f} %",
            f"{cpu_s:.2f} %",
            fmt_ratio(cpu_d, cpu_s) if cpu_s >= 0.01 else "-",
            "<= 0.5 %",
            cpu_d <= 0.5,
        ),
        Row(
            "RSS, max over the window",
            mb(rss_d),
            mb(rss_s),
            fmt_ratio(rss_d, rss_s),
            "<= 80 MB",
            rss_d <= 80e6,
        ),
    ]
    notes = [
        f"batchd: empty database, poll_interval_seconds = {a.poll:g}, nothing in flight; "
        "baseline = the SDK script polling one in-flight batch every 30 s"
    ]
    print_table("Idle cost (bench.idle)", rows, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
