"""The API hold: when the API refuses access (a missing, wrong or revoked key; a base
URL that is not the API), no job can get through, so every job waits instead of
failing. The hold is recorded in the store (other processes show it), reported by
/readyz and a metric, and lifted by itself once a probe gets through again (the key
is re-read before each probe and on SIGHUP).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from batchd.api import AccessDenied, ApiError, WrongEndpoint
from batchd.store.facade import HOLD_SETTING

if TYPE_CHECKING:
    from batchd.stages import Context

SETTING = HOLD_SETTING
REASONS = ("api_key", "endpoint")
PROBE_MIN, PROBE_MAX = 5.0, 60.0


@dataclass
class Hold:
    """Why the API cannot be used now (reason None: it can)."""

    reason: str | None = None  # "api_key" | "endpoint"
    message: str = ""
    status: int = 0
    since: float = 0.0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def blocked(self) -> bool:
        """True while jobs wait for the operator."""
        return self.reason is not None

    def view(self) -> dict[str, Any] | None:
        """What `batchd jobs`, `/readyz` and the HTTP queue show."""
        if self.reason is None:
            return None
        return {
            "reason": self.reason,
            "message": self.message,
            "status": self.status,
            "since": self.since,
        }

    async def block(
        self, ctx: Context, err: ApiError | None = None, reason: str = "", message: str = ""
    ) -> None:
        """Hold every job: the API refuses access (`err`), or there is no key at all."""
        reason = reason or ("endpoint" if isinstance(err, WrongEndpoint) else "api_key")
        message = message or (err.message if err else "")
        status = err.status if err else 0
        first = self.reason is None
        if not first and (reason, message, status) == (self.reason, self.message, status):
            return
        self.reason, self.message, self.status = reason, message, status
        if first:
            self.since = ctx.clock()
        _gauge(ctx)
        await ctx.store.set_setting(SETTING, orjson.dumps(self.view()).decode())
        ctx.log.error(
            "api_access_denied",
            reason=reason,
            status=status,
            message=message,
            action="jobs wait; fix the key or [api] base_url (SIGHUP re-reads the key); "
            "batchd carries on by itself",
        )
        self.changed.set()

    async def clear(self, ctx: Context) -> None:
        """The API answers again: release every job."""
        if self.reason is None:
            return
        held_for = ctx.clock() - self.since
        self.reason, self.message, self.status, self.since = None, "", 0, 0.0
        _gauge(ctx)
        await ctx.store.set_setting(SETTING, None)
        ctx.log.warning("api_access_restored", held_seconds=round(held_for, 1))
        self.changed.set()
        ctx.wake_all()


def _gauge(ctx: Context) -> None:
    for r in REASONS:
        ctx.metrics.api_access_denied.labels(r).set(1 if ctx.hold.reason == r else 0)


async def probe(ctx: Context) -> bool:
    """Re-read the key and try the API once; True when access works again."""
    try:
        key = ctx.cfg.api.api_key()
    except OSError as e:
        await ctx.hold.block(ctx, reason="api_key", message=f"cannot read the key: {e}")
        return False
    if key is None:
        await ctx.hold.block(ctx, reason="api_key", message=no_key_message(ctx))
        return False
    ctx.api.set_key(key)
    try:
        await ctx.api.list_batches(1)
    except AccessDenied as e:
        await ctx.hold.block(ctx, e)
        return False
    except ApiError as e:  # unreachable or failing: not an access problem; try later
        ctx.log.info("api_probe_failed", error=str(e))
        return False
    await ctx.hold.clear(ctx)
    return True


def no_key_message(ctx: Context) -> str:
    """Where batchd looked for the key."""
    api = ctx.cfg.api
    where = f"${api.api_key_env}"
    if api.api_key_file:
        where = f"[api] api_key_file ({api.api_key_file})"
    return f"no API key: set {where} or $CREDENTIALS_DIRECTORY/openai_api_key"


async def run(ctx: Context) -> None:
    """While held, probe with backoff (5 s doubling to 60 s); otherwise sleep."""
    delay = PROBE_MIN
    while not ctx.stopping:
        if not ctx.hold.blocked:
            delay = PROBE_MIN
            ctx.hold.changed.clear()
            await ctx.hold.changed.wait()
            continue
        ctx.hold.changed.clear()
        try:
            async with asyncio.timeout(delay):
                await ctx.hold.changed.wait()  # SIGHUP (new key) or a new reason: now
        except TimeoutError:
            pass
        if ctx.stopping:
            return
        if await probe(ctx):
            continue
        delay = min(PROBE_MAX, delay * 2)
