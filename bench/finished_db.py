"""A database with N finished jobs, built fast: a real daemon's rows, cloned.

    python -m bench.finished_db [--smoke] [--jobs N] [--cache-dir DIR] [--rebuild]

The real daemon (`batchd run --once`) takes four small files through the emulator:
three end done (one with a failed request, one of embeddings), one fails
validation. Their rows in every table are the templates `bench.rowclone` copies
with SQL into N jobs in all (one in ten failed), spread over the past year.
1,000,000 jobs take about a minute and ~4 GB.

The file is cached in $BATCHD_BENCH_CACHE (default ~/.cache/batchd-bench), keyed by
N, the schema the daemon wrote and this builder's source, so a schema change
rebuilds it; older builds for the same N are removed. Users get a copy to write to.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from bench import rowclone
from bench.common import (
    PY,
    ROOT,
    Emulator,
    Row,
    _env,
    free_port,
    mb,
    parser,
    print_table,
    small_chat,
    workdir,
    write_config,
)

# The template jobs: NAME -> file content. NAMEs are long and distinct because the
# cloner rewrites a NAME wherever it appears (paths, result dirs, event details).
_EMB = {"model": "text-embedding-3-small", "input": "hello"}
TEMPLATES: dict[str, bytes] = {
    "benchtpl0done": small_chat(3, tag="a"),
    "benchtpl1errs": b"".join(
        orjson.dumps(
            {
                "custom_id": f"r{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": "gpt-4o-mini",
                    "messages": [{"role": "user", "content": f"q{i}"}],
                    **({"x_emulator": {"status": 400}} if i == 2 else {}),
                },
            }
        )
        + b"\n"
        for i in range(4)
    ),
    "benchtpl2embed": b"".join(
        orjson.dumps(
            {"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings"} | {"body": _EMB}
        )
        + b"\n"
        for i in range(2)
    ),
    "benchtpl3invalid": small_chat(2, tag="b") + b"{not json\n",
}
# Which template each clone copies, in turn: one in ten fails.
PATTERN = ("benchtpl0done", "benchtpl1errs", "benchtpl2embed") * 3 + ("benchtpl3invalid",)
YEAR = 365 * 86400.0


@dataclass
class Built:
    """A finished-jobs database and how it was made."""

    path: Path
    jobs: int
    rows: dict[str, int]
    bytes: int
    build_seconds: float  # template run + cloning (0 if taken from the cache)
    cached: bool


def make_template(work: Path) -> Path:
    """Run the real daemon once on the template files; returns its database."""
    work.mkdir(parents=True, exist_ok=True)
    with Emulator(time_scale=0.001) as emu:
        cfg = write_config(work, emu.url, free_port(), batch={"poll_interval_seconds": 0.05})
        inbox = work / "spool" / "inbox"
        inbox.mkdir(parents=True, exist_ok=True)
        for name, data in TEMPLATES.items():
            (inbox / f".{name}.part").write_bytes(data)
            os.rename(inbox / f".{name}.part", inbox / f"{name}.jsonl")
        proc = subprocess.run(
            [PY, "-m", "batchd", "run", "--once", "--config", str(cfg)],
            cwd=ROOT,
            env=_env(),
            capture_output=True,
            timeout=120,
        )
    if proc.returncode not in (0, 1):  # 1: a job failed (benchtpl3invalid, on purpose)
        raise RuntimeError(f"template run exited {proc.returncode}: {proc.stderr[-2000:]!r}")
    return work / "batchd.db"


def fingerprint(db: Path) -> str:
    """Schema of `db` + this builder's source: what a cached build depends on."""
    h = hashlib.sha256()
    con = sqlite3.connect(db)
    try:
        h.update(str(con.execute("PRAGMA user_version").fetchone()).encode())
        for (sql,) in con.execute("SELECT sql FROM sqlite_master ORDER BY type, name"):
            h.update(str(sql).encode())
    finally:
        con.close()
    for module in (rowclone.__file__, __file__):
        h.update(Path(module).read_bytes())
    return h.hexdigest()[:12]


def cache_dir() -> Path:
    """Where built databases are kept between runs."""
    env = os.environ.get("BATCHD_BENCH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "batchd-bench"


def build(n: int, out: Path, template: Path) -> Built:
    """Write a database of n jobs (the templates and n - 4 clones of them) to `out`."""
    t = time.perf_counter()
    part = out.with_name(f".{out.name}.part")
    shutil.copyfile(template, part)
    try:
        report = rowclone.clone(
            part, max(0, n - len(TEMPLATES)), end=time.time() - 3600, span=YEAR, pattern=PATTERN
        )
        os.replace(part, out)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    seconds = time.perf_counter() - t
    built = Built(out, n, report.rows, out.stat().st_size, seconds, cached=False)
    out.with_suffix(".json").write_text(
        json.dumps({"jobs": n, "rows": report.rows, "build_seconds": seconds})
    )
    return built


def finished_db(n: int, cache: Path | None = None, rebuild: bool = False) -> Built:
    """The cached database of n finished jobs, built first if missing or stale."""
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with workdir("tpl") as tmp:
        t = time.perf_counter()
        template = make_template(tmp / "tpl")
        tpl_seconds = time.perf_counter() - t
        path = cache / f"finished-{n}-{fingerprint(template)}.db"
        if path.exists() and not rebuild:
            meta = json.loads(path.with_suffix(".json").read_text())
            return Built(path, n, meta["rows"], path.stat().st_size, 0.0, cached=True)
        for old in cache.glob(f"finished-{n}-*"):  # stale builds of this size
            old.unlink()
        built = build(n, path, template)
    built.build_seconds += tpl_seconds
    return built


def main() -> int:
    """Build (or find in the cache) and print what the database holds."""
    p = parser(__doc__)
    p.add_argument("--jobs", type=int, help="finished jobs (default 1,000,000; smoke 2,000)")
    p.add_argument("--cache-dir", type=Path, help="default $BATCHD_BENCH_CACHE or ~/.cache")
    p.add_argument("--rebuild", action="store_true", help="build even if cached")
    a = p.parse_args()
    n = a.jobs or (2_000 if a.smoke else 1_000_000)
    with workdir("finished") as tmp:
        # --smoke builds in a temporary directory: no cache to leave behind.
        built = finished_db(n, tmp if a.smoke else a.cache_dir, a.rebuild or a.smoke)
        rows = [
            Row("jobs in the database", f"{n:,}", "-", "-", "-", None),
            *(
                Row(f"rows added to {t}", f"{k:,}", "-", "-", "-", None)
                for t, k in sorted(built.rows.items())
            ),
            Row("file size", mb(built.bytes), "-", "-", "-", None),
            Row(
                "build time, template run + cloning (s)",
                "cached" if built.cached else f"{built.build_seconds:.1f}",
                "-",
                "-",
                "<= 120 s" if n == 1_000_000 else "-",
                None if built.cached or n != 1_000_000 else built.build_seconds <= 120,
            ),
        ]
    notes = [f"database: {built.path if not a.smoke else '(temporary)'}"]
    print_table("Finished-jobs database (bench.finished_db)", rows, notes, ("built", "-"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
