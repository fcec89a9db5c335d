"""The bench's database builder: a real daemon's rows cloned into many coherent jobs,
whatever columns and tables the schema has."""

from __future__ import annotations

import itertools
import json
import shutil
import sqlite3
import time
from pathlib import Path

import pytest

from bench import rowclone
from bench.finished_db import PATTERN, TEMPLATES, YEAR, make_template
from tests.conftest import run_cli

N = 200


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real daemon's database after taking the four template files through."""
    return make_template(tmp_path_factory.mktemp("tpl") / "work")


def _copy(template: Path, tmp_path: Path) -> Path:
    db = tmp_path / "batchd.db"
    shutil.copyfile(template, db)
    return db


def _rows(db: Path, sql: str) -> list[tuple[object, ...]]:
    con = sqlite3.connect(db)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_clones_are_coherent_jobs_the_cli_reads(template: Path, tmp_path: Path) -> None:
    db = _copy(template, tmp_path)
    end = time.time() - 3600
    report = rowclone.clone(db, N, end=end, span=YEAR, pattern=PATTERN)

    assert report.rows["jobs"] == N
    assert _rows(db, "PRAGMA foreign_key_check") == []
    assert _rows(db, "PRAGMA integrity_check") == [("ok",)]
    jobs = _rows(db, "SELECT id, name, created_at, state FROM jobs")
    assert len(jobs) == N + len(TEMPLATES)
    assert len({j[1] for j in jobs}) == len(jobs)  # every NAME distinct
    # ULIDs sort as the jobs were created, clones spread over the year before `end`.
    assert [j[0] for j in sorted(jobs, key=lambda j: float(str(j[2])))] == sorted(
        str(j[0]) for j in jobs
    )
    clones = [float(str(j[2])) for j in jobs if str(j[1]) not in TEMPLATES]
    assert end - YEAR - 60 < min(clones) < end - YEAR + 60
    assert end - YEAR / N - 60 < max(clones) < end
    states = [j[3] for j in jobs if str(j[1]) not in TEMPLATES]
    assert states.count("failed") == N // len(PATTERN)
    # Event ids follow time (the templates, the newest jobs, were moved after the clones).
    times = [float(str(r[0])) for r in _rows(db, "SELECT at FROM events ORDER BY id")]
    assert all(b >= a - 1 for a, b in itertools.pairwise(times))
    # No id of a template leaked into a clone.
    tpl_ids = [tok for t in report.templates for tok in t.tokens]
    blob = "\n".join(
        str(r)
        for r in _rows(
            db,
            "SELECT * FROM attempts WHERE job_id NOT IN "
            "(SELECT id FROM jobs WHERE name LIKE 'benchtpl%')",
        )
    )
    assert not [tok for tok in tpl_ids if tok in blob]

    cfg = tmp_path / "batchd.toml"
    cfg.write_text(
        f'[api]\nbase_url = "http://127.0.0.1:9/v1"\n[state]\ndatabase = "{db}"\n'
        f'[spool]\ndir = "{tmp_path / "spool"}"\n'
    )
    name = rowclone.name_of(N // 2)  # a clone of benchtpl0done (pattern position 0)
    shown = run_cli("show", name, "--json", "--config", str(cfg))
    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)
    assert info["job"]["name"] == name and info["job"]["state"] == "done"
    assert info["job"]["result_dir"] == f"done/{name}"
    assert [a["batch_id"] for a in info["attempts"]] == [info["attempts"][0]["batch"]["id"]]
    assert info["attempts"][0]["batch"]["metadata"]["batchd_job"] == info["job"]["id"]
    original = run_cli("show", "benchtpl0done", "--json", "--config", str(cfg))
    assert [e["kind"] for e in info["events"]] == [
        e["kind"] for e in json.loads(original.stdout)["events"]
    ]


def test_a_new_column_and_table_are_cloned_without_edits(template: Path, tmp_path: Path) -> None:
    db = _copy(template, tmp_path)
    con = sqlite3.connect(db)
    with con:  # what a later migration might add
        con.execute("ALTER TABLE jobs ADD COLUMN next_at REAL")
        con.execute("UPDATE jobs SET next_at = created_at + 5")
        con.execute("ALTER TABLE jobs ADD COLUMN dedup_key TEXT")
        con.execute("UPDATE jobs SET dedup_key = sha256")
        con.execute("CREATE UNIQUE INDEX jobs_dedup ON jobs(dedup_key)")
        con.execute(
            "CREATE TABLE job_tags (job_id TEXT NOT NULL REFERENCES jobs(id), tag TEXT,"
            " UNIQUE (job_id, tag))"
        )
        con.execute("INSERT INTO job_tags SELECT id, 'team:' || name FROM jobs")
        con.execute("CREATE TABLE bench_extra (key TEXT PRIMARY KEY, value TEXT)")
        con.execute("INSERT INTO bench_extra VALUES ('instance', '01M8P945RN25XKH0Q16XSF33ZZ')")
    con.close()

    rowclone.clone(db, N, end=time.time() - 3600, span=YEAR)

    assert _rows(db, "SELECT COUNT(*) FROM job_tags")[0][0] == N + len(TEMPLATES)
    assert _rows(db, "SELECT COUNT(*) FROM bench_extra")[0][0] == 1  # not a job's row
    assert _rows(db, "PRAGMA foreign_key_check") == []
    keys = _rows(db, "SELECT COUNT(DISTINCT dedup_key), COUNT(dedup_key) FROM jobs")[0]
    assert keys[0] == keys[1] > N // 2  # a unique value made unique per clone
    # Each clone's tag names its own job; its next_at moved with its other times.
    assert _rows(
        db,
        "SELECT COUNT(*) FROM job_tags t JOIN jobs j ON j.id = t.job_id"
        " WHERE t.tag = 'team:' || j.name AND abs(j.next_at - j.created_at - 5) < 1e-3",
    ) == [(N + len(TEMPLATES),)]
