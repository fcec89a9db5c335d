"""Every benchmark still runs: each script in --smoke mode (tiny sizes, a few seconds).

Only that it finishes and prints its table is checked here, never a timing.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.run_all import BENCHMARKS
from tests.conftest import skip_without

ROOT = Path(__file__).resolve().parent.parent


# System tools a benchmark needs (a missing one skips locally, fails under CI).
NEEDS = {"sources": "redis-server"}


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_runs_in_smoke_mode(name: str) -> None:
    if name in NEEDS:
        skip_without(NEEDS[name])
    proc = subprocess.run(
        [sys.executable, "-m", f"bench.{name}", "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    header = r"^\| figure \| [^|]+ \| [^|]+ \| ratio \| target \| met\? \|$"
    assert re.search(header, proc.stdout, re.M), proc.stdout[-3000:]
