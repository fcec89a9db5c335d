"""Run every benchmark, one after another (`make bench`).

    python -m bench.run_all [--smoke] [NAME ...]

Each runs as its own process and prints its own table; the exit status is non-zero
only when a benchmark failed to run (a missed target is reported, not an error).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from bench.common import ROOT, parser

BENCHMARKS = (
    "big_submit",
    "drop_latency",
    "burst",
    "tracking",
    "idle",
    "finished_db",  # builds (or finds cached) the database big_db uses
    "big_db",
    "download",
    "estimate",
    "facade",
    "cost_accuracy",
)


def main() -> int:
    """Run the benchmarks named (default: all) and report which failed to run."""
    p = parser(__doc__)
    p.add_argument("names", nargs="*", metavar="NAME", help=f"any of {', '.join(BENCHMARKS)}")
    a = p.parse_args()
    names = a.names or list(BENCHMARKS)
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        p.error(f"unknown benchmark(s): {', '.join(unknown)}")
    print(f"# batchd benchmarks ({'smoke' if a.smoke else 'full size'}; {os.cpu_count()} CPUs)")
    failed = []
    for name in names:
        t = time.monotonic()
        cmd = [sys.executable, "-m", f"bench.{name}", *(["--smoke"] if a.smoke else [])]
        rc = subprocess.run(cmd, cwd=ROOT).returncode
        print(f"\n({name}: {time.monotonic() - t:.0f} s, exit {rc})", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print(f"\nfailed to run: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
