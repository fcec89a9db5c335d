"""The CLI's import diet: `batchd jobs` and `show` on a SQLite store run without an event
loop and import neither the HTTP client nor the price tables; `--version` imports no
command at all. (Their start-up time is measured by bench/big_db.py, not here.)"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from batchd.cli.common import finish
from batchd.store import Store
from tests.conftest import config_file

# What `jobs` and `show` must not load (each costs the start-up milliseconds).
HEAVY = (
    "asyncio",
    "aiosqlite",
    "aiohttp",
    "ssl",
    "genai_prices",
    "batchd.prices",
    "batchd.cli.commands",
    "batchd.store.sqlite",
)

# Runs the CLI's entry point in a fresh interpreter, then reports what was imported.
_PROBE = """
import sys, orjson
from batchd.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
sys.stdout.flush()
watched = {heavy!r}
loaded = sorted(m for m in watched if m in sys.modules)
sys.stderr.write("\\nLOADED " + orjson.dumps({{"code": code, "loaded": loaded}}).decode() + "\\n")
"""


def _probe(*args: str) -> tuple[int, list[str], str]:
    """(exit code, the watched modules it imported, stdout) of `batchd ARGS`."""
    watched = (*HEAVY, "batchd.config", "batchd.store", "batchd.cli.reads")
    p = subprocess.run(
        [sys.executable, "-c", _PROBE.format(heavy=watched), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    report = orjson.loads(p.stderr.rpartition("LOADED ")[2])
    return int(report["code"]), list(report["loaded"]), p.stdout


async def _one_job(tmp_path: Path) -> Path:
    conf = config_file(tmp_path, "http://127.0.0.1:9/v1")
    async with Store.connect(tmp_path / "batchd.db") as s:
        await s.create_job("01JOBIMPORTDIET0000000000A", "nightly", "nightly.jsonl", "inbox")
    return conf


async def test_jobs_and_show_on_sqlite_import_no_event_loop(tmp_path: Path) -> None:
    conf = str(await _one_job(tmp_path))
    for args in (
        ("jobs", "-c", conf),
        ("jobs", "--json", "-c", conf),
        ("show", "nightly", "-c", conf),
        ("show", "--json", "nightly", "-c", conf),
    ):
        code, loaded, out = _probe(*args)
        assert code == 0, (args, out)
        assert "01JOBIMPORTDIET0000000000A" in out, args  # it did read the store
        assert "batchd.cli.reads" in loaded
        assert not set(loaded) & set(HEAVY), (args, loaded)


async def test_a_missing_job_and_no_database_still_answer_without_a_loop(tmp_path: Path) -> None:
    conf = str(await _one_job(tmp_path))
    code, loaded, _ = _probe("show", "nope", "-c", conf)
    assert code == 3
    assert not set(loaded) & set(HEAVY)
    (tmp_path / "empty").mkdir()
    empty = str(config_file(tmp_path / "empty", "http://127.0.0.1:9/v1"))
    code, loaded, _ = _probe("jobs", "-c", empty)
    assert code == 0
    assert not set(loaded) & set(HEAVY)


def test_version_and_help_load_no_command() -> None:
    for args in (("--version",), ("--help",), ("jobs", "--help")):
        code, loaded, out = _probe(*args)
        assert code == 0
        assert out.strip()
        assert not set(loaded) & {*HEAVY, "batchd.config", "batchd.store", "batchd.cli.reads"}


async def test_the_read_only_store_reads_what_the_store_wrote_and_refuses_writes(
    tmp_path: Path,
) -> None:
    await _one_job(tmp_path)
    s = await Store.open_read_only(tmp_path / "batchd.db")
    try:
        [job] = await s.find_jobs("nightly")
        assert job.id == "01JOBIMPORTDIET0000000000A"
        with pytest.raises(RuntimeError, match="read-only"):
            await s.add_event(job.id, "note", None)
    finally:
        await s.close()


def test_finish_refuses_a_coroutine_that_waits() -> None:
    async def waits() -> int:
        await asyncio.sleep(0)
        return 1

    async def done() -> int:
        return 2

    assert finish(done()) == 2
    with pytest.raises(RuntimeError, match="without an event loop"):
        finish(waits())
