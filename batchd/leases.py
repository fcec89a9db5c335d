"""What this replica holds: leases on items it works on and the roles it plays.

With a PostgreSQL store several daemons (replicas) share the store and the spool; any
may die at any moment. Per-item work (validating a job, submitting or settling an
attempt, failing or publishing a job) is leased to one replica, renewed while it works;
a lease that runs out is anyone's, so a dead replica's work is taken up by the others.
One replica at a time tracks (the `tracker` role: list pages are not multiplied by the
number of replicas), runs retention and the facade's stage, and admits jobs against
the [budget] limits; a role is taken over within
`[replicas] role_lease_seconds` of its holder's death.

With SQLite one daemon owns the spool (its lock), and `Leases.solo()` grants everything
without a word to the database: the single-daemon path is unchanged.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ulid import ULID

from batchd.config import ReplicasConfig

if TYPE_CHECKING:
    from batchd.metrics import Metrics
    from batchd.store import Store
    from batchd.store.claims import Claims

Item = Callable[[], Awaitable[None]]
ROLES = ("tracker", "retention", "facade", "budget")


class LeaseLost(Exception):
    """Another replica took over an item this one was working on (it was too slow)."""


def replica_id() -> str:
    """host:pid:ulid — unique even when a pid is reused after a restart."""
    return f"{socket.gethostname()}:{os.getpid()}:{ULID()}"


class Leases:
    """This replica's leases (see module doc); `shared` False = a daemon alone (SQLite)."""

    def __init__(
        self,
        claims: Claims | None,
        cfg: ReplicasConfig,
        log: Any = None,
        metrics: Metrics | None = None,
        owner: str | None = None,
    ) -> None:
        self.claims = claims
        self.shared = claims is not None
        self.cfg = cfg
        self.owner = owner or replica_id()
        self._log = log
        self._metrics = metrics
        self._items: set[str] = set()
        self._roles: set[str] = set()
        self._ok_at = time.monotonic()  # last renewal that reached the database

    @classmethod
    def solo(cls) -> Leases:
        """A daemon alone on its store: every item and role is its own."""
        return cls(None, ReplicasConfig())

    @classmethod
    def for_store(cls, store: Store, cfg: ReplicasConfig, log: Any, metrics: Metrics) -> Leases:
        """Leases in the store when it is shared (PostgreSQL), else solo."""
        if not store.shared:
            return cls.solo()
        from batchd.store.claims import Claims

        return cls(Claims(store), cfg, log, metrics)

    # --- items ----------------------------------------------------------------------------

    async def take(self, key: str) -> bool:
        """Take `key` (`job:ID`, `attempt:ID`) unless another replica works on it."""
        if self.claims is None:
            return True
        if await self.claims.take(key, self.owner, self.cfg.lease_seconds):
            self._items.add(key)
            self._gauge()
            return True
        return False

    def hold(self, keys: list[str]) -> None:
        """Keys claimed in bulk (new jobs, admitted attempts) are now renewed as held."""
        self._items.update(keys)
        self._gauge()

    async def release(self, key: str) -> None:
        """Done with `key`: anyone may take it now."""
        if self.claims is None or key not in self._items:
            return
        self._items.discard(key)
        self._gauge()
        await self.claims.release([key], self.owner)

    def held(self, key: str, item: Item) -> Item:
        """`item`, releasing `key` when it ends (however it ends)."""
        if self.claims is None:
            return item

        async def run() -> None:
            try:
                await item()
            finally:
                await self.release(key)

        return run

    async def fence(self, key: str) -> None:
        """Before an act that must happen once (a batch create): renew `key` now and raise
        LeaseLost if another replica has it. Solo: nothing to check."""
        if self.claims is None:
            return
        renewed = await self.claims.renew([key], self.owner, self.cfg.lease_seconds)
        if key not in renewed:
            self._items.discard(key)
            raise LeaseLost(key)

    # --- roles ----------------------------------------------------------------------------

    def has_role(self, role: str) -> bool:
        """True while this replica holds `role` (always, for a daemon alone). Not after a
        stall: a role not renewed lately may have run out, and another replica may play
        it now (the renewal tells)."""
        if self.claims is None:
            return True
        fresh = time.monotonic() - self._ok_at < self.cfg.role_lease_seconds * 0.8
        return role in self._roles and fresh

    async def role(self, role: str) -> bool:
        """Hold `role`: True when it is (or has just become) this replica's."""
        if self.claims is None or self.has_role(role):
            return True
        if role in self._roles:
            return False  # held, but not renewed lately: wait for the renewal's word
        if await self.claims.take(f"role:{role}", self.owner, self.cfg.role_lease_seconds):
            self._ok_at = time.monotonic()  # the database answered just now
            self._roles.add(role)
            self._gauge()
            if self._log is not None:
                self._log.info("role_taken", role=role, replica=self.owner)
            return True
        return False

    # --- renewal --------------------------------------------------------------------------

    @property
    def renew_every(self) -> float:
        """Seconds between renewals: a role's lease is renewed three times in its life."""
        return self.cfg.role_lease_seconds / 3

    async def renew(self) -> None:
        """Renew everything held; forget what was lost (another replica took it over)."""
        if self.claims is None:
            return
        now = time.monotonic()
        try:
            roles = [f"role:{r}" for r in self._roles]
            kept = await self.claims.renew(roles, self.owner, self.cfg.role_lease_seconds)
            items = sorted(self._items)
            kept |= await self.claims.renew(items, self.owner, self.cfg.lease_seconds)
        except Exception as e:  # the database is out of reach (or restarting)
            # What was held is given up once its lease may have run out, so a role is
            # never played by two replicas at once.
            self._warn("lease_renew_failed", error=f"{type(e).__name__}: {e}")
            if now - self._ok_at > self.cfg.role_lease_seconds * 0.8:
                self._drop({f"role:{r}" for r in self._roles})
            if now - self._ok_at > self.cfg.lease_seconds * 0.8:
                self._drop(set(self._items))
            return
        self._ok_at = now
        lost = ({f"role:{r}" for r in self._roles} | set(items)) - kept
        self._drop(lost)

    def _drop(self, keys: set[str]) -> None:
        if not keys:
            return
        for key in keys:
            if key.startswith("role:"):
                self._roles.discard(key[5:])
            else:
                self._items.discard(key)
        if self._metrics is not None:
            self._metrics.replica_lease_lost.inc(len(keys))
        self._warn("leases_lost", keys=sorted(keys)[:10], count=len(keys))
        self._gauge()

    def _warn(self, event: str, **kw: Any) -> None:
        if self._log is not None:
            self._log.warning(event, replica=self.owner, **kw)

    def _gauge(self) -> None:
        m = self._metrics
        if m is None:
            return
        kinds = {"job": 0, "attempt": 0}
        for key in self._items:
            kind = key.partition(":")[0]
            kinds[kind] = kinds.get(kind, 0) + 1
        for kind, n in kinds.items():
            m.replica_leases.labels(kind).set(n)
        m.replica_leases.labels("role").set(len(self._roles))
        for role in ROLES:
            m.replica_role.labels(role).set(int(role in self._roles))

    async def run(self) -> None:
        """Renew until cancelled (a side task of the daemon, cancelled once the stages
        have drained: what they held stays theirs until then)."""
        if self.claims is None:
            return
        while True:
            await asyncio.sleep(self.renew_every)
            await self.renew()

    async def close(self) -> None:
        """A replica stopping: give every lease up, so the others take over at once."""
        if self.claims is None:
            return
        self._items.clear()
        self._roles.clear()
        self._gauge()
        try:
            await self.claims.release_all(self.owner)
        except Exception as e:  # they run out by themselves
            self._warn("lease_release_failed", error=f"{type(e).__name__}: {e}")
