"""SQLite and PostgreSQL behind one store interface: every named statement runs on both,
migrations are numbered one for one, and the store's behaviour is the same on both.

When this fails after a merge, the message names the statement or migration that needs
a PostgreSQL version (batchd/store/queries.pg.sql, migrations/postgresql/).
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from batchd.states import IllegalTransition, JobState
from batchd.store import Duplicate, NewJob, Store
from batchd.store.postgres import convert
from batchd.store.queries import migration_files, pg_queries, queries

# Statements only PostgreSQL replicas run (queries.pg.sql names absent from queries.sql).
PG_ONLY = ("lease_", "claim", "admission_", "due_pending_unclaimed", "push_batch", "take_pushed")


def _dummy(type_name: str) -> Any:
    """A value of a parameter's type that every statement accepts."""
    if type_name in ("int2", "int4", "int8"):
        return 1
    if type_name in ("float4", "float8", "numeric"):
        return 1.0
    if type_name in ("json", "jsonb"):
        return "[]"
    if type_name.startswith("_") or type_name.endswith("[]"):  # an array
        return []
    if type_name == "bool":
        return True
    return "x"


async def _run_pg(conn: asyncpg.Connection, sql: str) -> tuple[dict[str, Any], str | None]:
    """Prepare and run one statement in a transaction that is rolled back; returns the
    parameter values used (by name) and the error, if any."""
    text, names = convert(sql)
    tx = conn.transaction()
    await tx.start()
    try:
        stmt = await conn.prepare(text)
        values = [_dummy(t.name) for t in stmt.get_parameters()]
        try:
            await stmt.fetch(*values)
        except asyncpg.IntegrityConstraintViolationError:
            pass  # it ran: dummy rows break foreign keys or NOT NULL, which is fine here
        return dict(zip(names, values, strict=True)), None
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as e:
        return {}, f"{type(e).__name__}: {e}"
    finally:
        await tx.rollback()


def _run_sqlite(con: sqlite3.Connection, sql: str, params: dict[str, Any]) -> str | None:
    con.execute("BEGIN")
    try:
        con.execute(sql, params).fetchall()
    except sqlite3.IntegrityError:
        pass
    except sqlite3.Error as e:
        return f"{type(e).__name__}: {e}"
    finally:
        con.execute("ROLLBACK")
    return None


async def test_every_named_statement_runs_on_both_backends(pg_url: str, tmp_path: Path) -> None:
    """Each statement of queries.sql runs on SQLite and on PostgreSQL (as its variant in
    queries.pg.sql, where it has one); the PostgreSQL-only ones run on PostgreSQL."""
    await (await Store.open(tmp_path / "s.db")).close()
    con = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    conn = await asyncpg.connect(pg_url)
    problems: list[str] = []
    try:
        for name, sql in queries().items():
            params, err = await _run_pg(conn, sql)
            if err:
                problems.append(
                    f"{name}: fails on PostgreSQL ({err}); add a PostgreSQL variant named "
                    f"{name!r} to batchd/store/queries.pg.sql"
                )
                params = {n: 1 for n in convert(sql)[1]}
            if sql_err := _run_sqlite(con, sql, params):
                problems.append(f"{name}: fails on SQLite ({sql_err})")
        for name, sql in pg_queries().items():
            if name in queries():
                continue
            if not name.startswith(PG_ONLY):
                problems.append(
                    f"{name}: in queries.pg.sql but not in queries.sql (a misspelt variant? "
                    f"PostgreSQL-only statements start with one of {PG_ONLY})"
                )
            _params, err = await _run_pg(conn, sql)
            if err:
                problems.append(f"{name} (PostgreSQL only): {err}")
    finally:
        await conn.close()
        con.close()
    assert not problems, "\n".join(problems)


def test_every_migration_has_a_postgresql_version() -> None:
    """The rule (README, "Running more than one"): every SQLite migration has a twin of
    the same file name in migrations/postgresql/, bringing PostgreSQL to the same schema."""
    sqlite, pg = migration_files("sqlite"), migration_files("postgresql")
    problems = [
        f"batchd/store/migrations/{f} has no PostgreSQL twin: write "
        f"batchd/store/migrations/postgresql/{f} (same name, PostgreSQL's types)"
        for f in sqlite
        if f not in pg
    ] + [
        f"batchd/store/migrations/postgresql/{f} has no SQLite migration of that name "
        f"(renumbered on one side only?)"
        for f in pg
        if f not in sqlite
    ]
    assert not problems, "\n".join(problems)


async def test_both_backends_have_the_same_tables_and_columns(pg_url: str, tmp_path: Path) -> None:
    await (await Store.open(tmp_path / "s.db")).close()
    con = sqlite3.connect(tmp_path / "s.db")
    tables = [
        r[0]
        for r in con.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        )
    ]
    lite = {t: {r[1] for r in con.execute(f"PRAGMA table_xinfo({t})")} for t in tables}
    con.close()
    conn = await asyncpg.connect(pg_url)
    try:
        rows = await conn.fetch(
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE table_schema = 'public' AND table_name <> 'batchd_schema'"
        )
    finally:
        await conn.close()
    pg: dict[str, set[str]] = {}
    for r in rows:
        pg.setdefault(r["table_name"], set()).add(r["column_name"])
    assert pg == lite


# --- the store's behaviour, on both backends --------------------------------------------


async def test_names_are_unique_and_a_taken_name_gets_a_suffix(db_target: Path | str) -> None:
    async with Store.connect(db_target) as store:
        given = await store.create_jobs(
            [
                NewJob(f"J{i}", "nightly", f"processing/J{i}--nightly.jsonl", "inbox")
                for i in range(3)
            ]
        )
        assert sorted(given.values()) == ["nightly", "nightly-2", "nightly-3"]
        more = await store.create_jobs(
            [NewJob("J9", "nightly", "processing/J9--nightly.jsonl", "inbox")],
            dir_taken=lambda n: n == "nightly-4",
        )
        assert more == {"J9": "nightly-5"}
        with pytest.raises(Duplicate, match=r"jobs\.id"):
            await store.create_job("J1", "other", "processing/J1--other.jsonl", "inbox")
        again = [
            NewJob("J1", "x", "processing/J1--x.jsonl", "inbox"),
            NewJob("J10", "x", "processing/J10--x.jsonl", "inbox"),
        ]
        assert await store.create_jobs(again, skip_recorded=True) == {"J10": "x"}
        assert await store.count_by_state() == {"queued": 5}
        assert [j.id for j in await store.find_jobs("nightly-2")] == ["J1"]
        assert [j.name for j in await store.list_jobs(limit=2)][:1] in (["x"], ["nightly-5"])


async def test_one_retry_per_job_is_a_duplicate(db_target: Path | str) -> None:
    async with Store.connect(db_target) as store:
        await store.create_job("A", "a", "processing/A--a.jsonl", "inbox")
        await store.create_job("R1", "a-retry", "p/R1", "retry", retry_of="A")
        with pytest.raises(Duplicate, match=r"jobs\.retry_of"):
            await store.create_job("R2", "a-retry", "p/R2", "retry", retry_of="A")


async def test_attempt_phases_admission_and_settling(db_target: Path | str) -> None:
    now = [1000.0]
    async with Store.connect(db_target, clock=lambda: now[0]) as store:
        await store.create_job("J", "n", "processing/J--n.jsonl", "inbox")
        await store.transition("J", JobState.VALIDATING)
        from batchd.store import Piece

        pieces = [Piece("J", i, f"p{i}", 10, 100, 50, False) for i in range(2)]
        atts = [
            {
                "id": f"A{i}",
                "job_id": "J",
                "piece": i,
                "input_path": f"p{i}",
                "model": "m",
                "requests": 10,
                "est_tokens": 50,
            }
            for i in range(2)
        ]
        await store.validated(
            "J",
            pieces,
            atts,
            {"pieces": 2},
            endpoint="/v1/x",
            model="m",
            requests=20,
            bytes=200,
            est_tokens=100,
        )
        assert await store.due_pending(now[0], 10) == []  # not admitted yet
        assert await store.admit_job("J", 1234, {"reserved": "$0.0000"})
        assert not await store.admit_job("J", 1234)  # once
        due = await store.due_pending(now[0], 10)
        assert [p.id for p in due] == ["A0", "A1"] and due[0].tokens == 50
        await store.update_attempt(
            "A0",
            "created",
            batch_id="b0",
            status="validating",
            batch={"id": "b0", "created_at": 999},
        )
        assert await store.in_flight() == {"m": (50, 10)}
        [lb] = await store.live_batches()
        assert (lb.batch_id, lb.created) == ("b0", 999.0)
        assert [b.batch_id for b in await store.live_batches_changed(0.0)] == ["b0"]
        await store.record_batch(lb, {"id": "b0", "status": "completed"}, "completed", (10, 0, 10))
        assert [a.id for a in await store.ended_attempts()] == ["A0"]
        assert (await store.job("J")).completed == 10
        await store.settle_attempt(
            "A0", "completed", {"id": "b0"}, piece_done=True, remote_files=[("file-1", "input")]
        )
        assert await store.ended_attempts() == []
        assert (await store.attempt("A0")).phase == "settled"
        assert await store.due_remote_files(now[0], 10) == [("file-1", "J", "input", 0, None)]
        await store.learn_limit("m", 90_000)
        await store.learn_limit("m", 80_000)
        assert await store.learned_limits() == {"m": 80_000}
        await store.set_setting("k", "v")
        assert (await store.setting("k")) == ("v", 1000.0)
        with pytest.raises(IllegalTransition):
            await store.transition("J", JobState.QUEUED)


async def test_cost_budgets_and_charges_exactly_once(db_target: Path | str) -> None:
    """The cost statements (0006_cost) on both engines: a job waits for its budget, is
    admitted once, its charge is replaced (never added to) when settled again, and the
    sums come back as ints."""
    now = [1000.0]
    async with Store.connect(db_target, clock=lambda: now[0]) as store:
        from batchd.store import Piece

        for jid in ("J", "K"):
            await store.create_job(jid, jid.lower(), f"processing/{jid}.jsonl", "inbox")
            await store.transition(jid, JobState.VALIDATING)
            await store.validated(
                jid,
                [Piece(jid, 0, f"p-{jid}", 10, 100, 50, False)],
                [{"id": f"A{jid}", "job_id": jid, "piece": 0, "input_path": "p", "model": "m"}],
                {"pieces": 1},
                endpoint="/v1/x",
                model="m",
                requests=10,
                bytes=100,
                est_tokens=50,
            )
        assert [j.id for j in await store.unadmitted_jobs(10)] == ["J", "K"]
        await store.set_budget_wait("K", "daily limit $1.00 reached")
        assert await store.budget_waiting_count() == 1
        assert await store.admit_job("J", 3_000_000_000)
        assert [j.id for j in await store.unadmitted_jobs(10)] == ["K"]
        assert await store.budget_committed(900.0, 0.0) == [("m", "inbox", True, 3_000_000_000)]
        assert await store.budget_committed(1500.0, 0.0) == [("m", "inbox", False, 3_000_000_000)]
        await store.update_attempt("AJ", "created", batch_id="bJ", status="completed")
        charge = {
            "provider": "openai",
            "model": "m",
            "source": "inbox",
            "requests": 10,
            "input_tokens": 4_000_000_000,  # beyond 32 bits: BIGINT, not INTEGER
            "cached_tokens": 1,
            "cache_write_tokens": 2,
            "output_tokens": 3,
            "reasoning_tokens": 4,
            "cost_nanos": 5_000_000_000,
            "cost_unknown": None,
        }
        for _ in range(2):  # settled again after a crash: the charge is replaced
            await store.settle_attempt("AJ", "completed", {"id": "bJ"}, charge=charge)
        cost = await store.job_cost("J")
        assert cost["attempts"] == 1 and cost["input_tokens"] == 4_000_000_000
        assert cost["cost_nanos"] == 5_000_000_000 and cost["cost_unknown"] is None
        assert all(type(v) is int for k, v in cost.items() if k != "cost_unknown")
        [row] = await store.charges_since(0.0)
        assert (row["model"], row["requests"], row["cost_nanos"]) == ("m", 10, 5_000_000_000)
        await store.learn_limit("m", 90_000)
        await store.learn_request_limit("m", 50_000)
        await store.learn_request_limit("e", 1_000_000)
        assert await store.learned_limits() == {"m": 90_000}
        assert await store.learned_request_limits() == {"m": 50_000, "e": 1_000_000}


async def test_providers_are_carried_from_job_to_attempts_and_copies(
    db_target: Path | str,
) -> None:
    """The providers statements (0007_providers) on both engines: a job's provider NAME
    is copied onto its attempts, due pendings, live batches and the copies to delete;
    live providers and every provider's hold are read back."""
    async with Store.connect(db_target) as store:
        from batchd.store import Piece

        await store.create_job("J", "j", "processing/J~claude--j.jsonl", "inbox", provider="claude")
        await store.create_job("K", "k", "processing/K--k.jsonl", "inbox")
        assert await store.live_providers() == {"claude", None}
        await store.transition("J", JobState.VALIDATING)
        att = {"id": "A", "job_id": "J", "piece": 0, "input_path": "p", "model": "m"}
        await store.validated("J", [Piece("J", 0, "p", 1, 10, 5, False)], [att], {}, model="m")
        assert await store.admit_job("J", 0)
        [p] = await store.due_pending(9e9, 10)
        assert (p.id, p.provider) == ("A", "claude")
        assert (await store.attempt("A")).provider == "claude"
        await store.update_attempt("A", "created", batch_id="b", status="in_progress")
        assert not await store.batch_owned("other") and await store.batch_owned("b")
        [lb] = await store.live_batches()
        [changed] = await store.live_batches_changed(0.0)
        assert lb.provider == changed.provider == "claude"
        await store.record_batch(lb, {"id": "b"}, "completed", (1, 0, 1), raw_status="ended")
        usage = {"input_tokens": 3}
        await store.settle_attempt(
            "A",
            "completed",
            {"id": "b"},
            piece_done=True,
            remote_files=[("f", "input")],
            usage=usage,
        )
        settled = await store.attempt("A")
        assert (settled.raw_status, settled.usage, settled.refusals) == ("ended", usage, 0)
        assert [r[4] for r in await store.due_remote_files(9e9, 10)] == ["claude"]
        await store.set_setting("api_hold", '{"reason": "auth"}')
        await store.set_setting("api_hold:claude", '{"reason": "api_key"}')
        assert await store.holds() == {
            "openai": {"reason": "auth"},
            "claude": {"reason": "api_key"},
        }


async def test_retention_deletes_rows_and_counts_follow(db_target: Path | str) -> None:
    async with Store.connect(db_target, clock=lambda: 5.0) as store:
        for i in range(3):
            await store.create_job(f"J{i}", f"n{i}", f"p/J{i}", "inbox")
            await store.transition(f"J{i}", JobState.FAILED)
        assert await store.count_by_state() == {"failed": 3}
        ids = await store.expired_jobs(10.0, 2)
        assert ids == ["J0", "J1"]
        await store.delete_jobs(ids)
        assert await store.count_by_state() == {"failed": 1}
        assert await store.events("J0") == []


async def test_another_process_commit_changes_data_version(db_target: Path | str) -> None:
    async with Store.connect(db_target) as a, Store.connect(db_target) as b:
        await a.create_job("J", "n", "p/J", "inbox")
        before = await a.data_version()
        await b.request_cancel("J")
        for _ in range(100):
            if await a.data_version() != before:
                break
            await asyncio.sleep(0.02)
        assert await a.data_version() != before
        assert (await a.job("J")).cancel_requested
