"""Helpers of the queue-source tests (tests/test_sources_*.py)."""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

from batchd.daemon import Daemon
from tests.procs import ROOT


async def crash_daemon(point: str, config: Path, timeout: float = 60) -> str:
    """Run `batchd run -c CONFIG` under a crash point until it kills itself; its log."""
    log = config.with_suffix(f".crash-{point}.log")
    with log.open("wb") as err:
        p = subprocess.Popen(  # noqa: ASYNC220 - starting it does not block
            [sys.executable, "-m", "tests.crashpoint", point, "run", "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            cwd=ROOT,
            env=dict(os.environ),
        )
    try:
        rc = await asyncio.to_thread(p.wait, timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        await asyncio.to_thread(p.wait)
        raise AssertionError(f"never reached {point}: {log.read_text()}") from None
    assert rc == -9, f"exit {rc}, not SIGKILL at {point}: {log.read_text()}"
    return log.read_text()


def db_jobs(db: Path) -> list[dict[str, Any]]:
    """Every job row of a daemon's database (read-only; safe while it runs)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("SELECT * FROM jobs ORDER BY created_at, id")]
    finally:
        con.close()


def metric(text: str, name: str, **labels: str) -> float | None:
    """One sample's value in /metrics text (None when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = rf"^{re.escape(name)}(?:\{{{re.escape(want)}\}})? (\S+)$" if want else None
    for line in text.splitlines():
        if pattern and (m := re.match(pattern, line)):
            return float(m.group(1))
        if not pattern and line.startswith(name + " "):
            return float(line.split()[1])
    return None


def redelivered(d: Daemon, source: str = "nightly") -> float:
    """batchd_source_messages_redelivered_total of a daemon run in process."""
    value = d.metrics.registry.get_sample_value(
        "batchd_source_messages_redelivered_total", {"source": source}
    )
    return value or 0.0
