"""The API hold: when a provider's API refuses access (a missing, wrong or revoked key;
a base URL that is not the API), none of its jobs can get through, so they wait
instead of failing. A hold is per provider: a bad Anthropic key holds the Anthropic
jobs, not the OpenAI ones. It is recorded in the store (other processes show it),
reported by /readyz and a metric, and lifted by itself once a probe gets through
again (the key is re-read before each probe and on SIGHUP).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from batchd.providers.errors import AccessDenied, ApiError, WrongEndpoint
from batchd.store.facade import HOLD_SETTING

if TYPE_CHECKING:
    from batchd.stages import Context

SETTING = HOLD_SETTING
REASONS = ("api_key", "endpoint")
PROBE_MIN, PROBE_MAX = 5.0, 60.0


@dataclass
class Hold:
    """Why one provider's API cannot be used now (reason None: it can)."""

    reason: str | None = None  # "api_key" | "endpoint"
    message: str = ""
    status: int = 0
    since: float = 0.0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    provider: str = "openai"
    default: bool = True  # the default provider's hold keeps the setting's old key

    @property
    def blocked(self) -> bool:
        """True while jobs wait for the operator."""
        return self.reason is not None

    @property
    def setting(self) -> str:
        """The settings key the hold is recorded under."""
        return SETTING if self.default else f"{SETTING}:{self.provider}"

    def view(self) -> dict[str, Any] | None:
        """What `batchd jobs`, `/readyz` and the HTTP queue show."""
        if self.reason is None:
            return None
        return {
            "reason": self.reason,
            "message": self.message,
            "status": self.status,
            "since": self.since,
            "provider": self.provider,
        }

    async def block(
        self, ctx: Context, err: ApiError | None = None, reason: str = "", message: str = ""
    ) -> None:
        """Hold this provider's jobs: its API refuses access (`err`), or there is no key."""
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
        await ctx.store.set_setting(self.setting, orjson.dumps(self.view()).decode())
        ctx.log.error(
            "api_access_denied",
            provider=self.provider,
            reason=reason,
            status=status,
            message=message,
            action="jobs wait; fix the key or the base_url (SIGHUP re-reads the key); "
            "batchd carries on by itself",
        )
        self.changed.set()

    async def clear(self, ctx: Context) -> None:
        """The API answers again: release the provider's jobs."""
        if self.reason is None:
            return
        held_for = ctx.clock() - self.since
        self.reason, self.message, self.status, self.since = None, "", 0, 0.0
        _gauge(ctx)
        await ctx.store.set_setting(self.setting, None)
        ctx.log.warning(
            "api_access_restored", provider=self.provider, held_seconds=round(held_for, 1)
        )
        self.changed.set()
        ctx.wake_all()


def _gauge(ctx: Context) -> None:
    for r in REASONS:
        held = any(h.reason == r for h in ctx.holds.values())
        ctx.metrics.api_access_denied.labels(r).set(1 if held else 0)


async def probe(ctx: Context, name: str | None = None) -> bool:
    """Re-read one provider's key and try its API once; True when access works again."""
    provider = ctx.provider(name)
    hold = ctx.hold_of(provider.name)
    try:
        key = provider.cfg.api.api_key()
    except OSError as e:
        await hold.block(ctx, reason="api_key", message=f"cannot read the key: {e}")
        return False
    if key is None:
        await hold.block(ctx, reason="api_key", message=no_key_message(ctx, provider.name))
        return False
    provider.set_key(key)
    try:
        await provider.probe()
    except AccessDenied as e:
        await hold.block(ctx, e)
        return False
    except ApiError as e:  # unreachable or failing: not an access problem; try later
        ctx.log.info("api_probe_failed", provider=provider.name, error=str(e))
        return False
    await hold.clear(ctx)
    return True


def no_key_message(ctx: Context, name: str | None = None) -> str:
    """Where batchd looked for a provider's key."""
    pc = ctx.provider(name).cfg
    api = pc.api
    where = f"${api.api_key_env}"
    if api.api_key_file:
        where = f"{pc.section} api_key_file ({api.api_key_file})"
    return f"no API key: set {where} or $CREDENTIALS_DIRECTORY/{api.credential}"


async def _watch(ctx: Context, name: str) -> None:
    """While one provider is held, probe it with backoff (5 s doubling to 60 s)."""
    hold = ctx.hold_of(name)
    delay = PROBE_MIN
    while not ctx.stopping:
        if not hold.blocked:
            delay = PROBE_MIN
            hold.changed.clear()
            await hold.changed.wait()
            continue
        hold.changed.clear()
        try:
            async with asyncio.timeout(delay):
                await hold.changed.wait()  # SIGHUP (new key) or a new reason: now
        except TimeoutError:
            pass
        if ctx.stopping:
            return
        if await probe(ctx, name):
            continue
        delay = min(PROBE_MAX, delay * 2)


async def run(ctx: Context) -> None:
    """A probe loop per provider; each sleeps unless its provider is held."""
    async with asyncio.TaskGroup() as tg:
        for name in ctx.providers:
            tg.create_task(_watch(ctx, name), name=f"health:{name}")
