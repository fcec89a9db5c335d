"""Leases and claims of due work, for replicas sharing a PostgreSQL store.

An item (`job:ID`, `attempt:ID`) or a role (`role:tracker`, …) belongs to one owner
until its lease runs out (the server's clock); the owner renews it while working.
Due work is claimed with `FOR UPDATE SKIP LOCKED` (two replicas claiming at once take
different items), and admission is decided in the transaction of the submit claim,
under an advisory lock, from what the shared store says is in flight. The SQL is in
queries.pg.sql; batchd/leases.py is the replica's side (what it holds, renewal).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, cast

from batchd.states import JobState
from batchd.store.facade import Pending, Store
from batchd.store.queries import Stmt, pg_queries, q

if TYPE_CHECKING:
    from batchd.store.postgres import PgBackend, Session

_CLAIM_ROUNDS = 3  # claims of one state while jobs are lost to other replicas' leases
InFlight = dict[str, tuple[int, int]]  # model -> (estimated tokens, requests)
Decide = Callable[[list[Pending], InFlight], list[Pending]]


def _pg(name: str) -> str:
    return pg_queries()[name]


def _pending(r: object) -> Pending:
    row = cast("Sequence[object]", r)
    return Pending(
        str(row[0]),
        str(row[1]),
        int(cast(int, row[2])),
        float(cast(float, row[3])),
        float(cast(float, row[4])),
        int(cast(int, row[5])),
        str(row[6]),
        None if row[7] is None else str(row[7]),
    )


class Claims:
    """The lease statements of one PostgreSQL store."""

    def __init__(self, store: Store) -> None:
        if not store.shared:
            raise ValueError("leases need a PostgreSQL store")
        self._b = cast("PgBackend", store._b)

    async def take(self, key: str, owner: str, ttl: float) -> bool:
        """Take (or keep) `key` until ttl seconds from now, unless another owner holds it."""

        async def run(s: Session) -> int:
            return await s.execute(
                Stmt(_pg("lease_take"), {"key": key, "owner": owner, "ttl": ttl})
            )

        return await self._b.atomic(run) == 1

    async def renew(self, keys: Sequence[str], owner: str, ttl: float) -> set[str]:
        """Extend the leases of `keys` still ours; returns those (the others were lost)."""
        if not keys:
            return set()

        async def run(s: Session) -> set[str]:
            params = {"keys": list(keys), "owner": owner, "ttl": ttl}
            return {r[0] for r in await s.fetch(_pg("lease_renew"), params)}

        return await self._b.atomic(run)

    async def release(self, keys: Sequence[str], owner: str) -> None:
        """Give up `keys` (anyone may take them at once)."""
        if keys:
            await self._b.tx([Stmt(_pg("lease_release"), {"keys": list(keys), "owner": owner})])

    async def release_all(self, owner: str) -> None:
        """Give up every lease of `owner` (a replica stopping)."""
        await self._b.tx([Stmt(_pg("lease_release_all"), {"owner": owner})])

    async def holders(self, keys: Sequence[str]) -> dict[str, tuple[str, float]]:
        """Who holds these keys and for how many more seconds."""
        rows = await self._b.fetch(_pg("lease_holders"), {"keys": list(keys)})
        return {r[0]: (r[1], float(r[2])) for r in rows}

    async def counts(self) -> list[tuple[str, str, int]]:
        """(owner, kind, leases) of every lease not run out: who works on what."""
        return [(r[0], r[1], int(r[2])) for r in await self._b.fetch(_pg("lease_counts"), {})]

    async def new_jobs(self, owner: str, ttl: float, limit: int) -> list[str]:
        """Queued, then validating jobs nobody else works on (oldest first), now ours."""
        out: list[str] = []
        for state in (JobState.QUEUED, JobState.VALIDATING):
            for _ in range(_CLAIM_ROUNDS):
                if len(out) >= limit:
                    return out
                params = {
                    "state": state.value,
                    "owner": owner,
                    "ttl": ttl,
                    "limit": limit - len(out),
                }

                async def run(s: Session, p: dict[str, object] = params) -> tuple[int, list[str]]:
                    [row] = await s.fetch(_pg("claim_new_jobs"), p)
                    return int(row[0]), list(row[1])

                found, ids = await self._b.atomic(run)
                out += ids
                if len(ids) == found:
                    break  # none lost to a replica that leased them after our snapshot
        return out

    async def pending(
        self, owner: str, ttl: float, now: float, limit: int, decide: Decide
    ) -> list[Pending]:
        """Claim the due pending attempts admission lets through, deciding in the same
        transaction as the claim: what is in flight is the live batches plus the attempts
        any replica is submitting (leased), and one replica decides at a time."""

        async def run(s: Session) -> list[Pending]:
            await s.fetch(_pg("admission_lock"))
            flight: InFlight = {}
            for name in ("live_in_flight", "claimed_in_flight"):
                for r in await s.fetch(q(name) if name == "live_in_flight" else _pg(name)):
                    t, n = flight.get(r[0], (0, 0))
                    flight[r[0]] = (t + int(r[1] or 0), n + int(r[2] or 0))
            rows = await s.fetch(_pg("due_pending_unclaimed"), {"now": now, "limit": limit})
            chosen = decide([_pending(r) for r in rows], flight)
            for p in chosen:
                await s.execute(
                    Stmt(
                        _pg("lease_take"),
                        {"key": f"attempt:{p.id}", "owner": owner, "ttl": ttl},
                        must_change=True,
                    )
                )
            return chosen

        return await self._b.atomic(run)

    async def sweep(self) -> None:
        """Forget leases that ran out long ago (their owners died; nothing renews them)."""
        await self._b.tx([Stmt(_pg("lease_sweep"), {})])

    async def push_batch(self, batch_id: str, at: float) -> None:
        """A webhook named this batch: for whichever replica tracks."""
        await self._b.tx([Stmt(_pg("push_batch"), {"batch_id": batch_id, "at": at})])

    async def take_pushed(self) -> list[str]:
        """Batch ids webhooks named since the last call (taken: each is handed out once)."""

        async def run(s: Session) -> list[str]:
            return [r[0] for r in await s.fetch(_pg("take_pushed"))]

        return await self._b.atomic(run)
