"""The daemon: builds the parts, supervises the stages, stops cleanly.

Shutdown drains: at SIGTERM intake stops claiming, no stage starts new work, work in
flight gets `[daemon] shutdown_grace_seconds` to finish, and only then is the rest
cancelled (every store transaction completes even then; whatever was cut off is
taken up again at the next start).
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable

from aiohttp import web

from batchd import facade, logs, sdnotify, sources
from batchd.config import RELOADABLE, Config, ConfigError, changed_keys, load
from batchd.errors import StartupError
from batchd.leases import Leases
from batchd.metrics import Metrics
from batchd.providers import Providers
from batchd.spool import Spool
from batchd.stages import Context, collect, health, intake, retention, submit, track
from batchd.states import JobState
from batchd.store import LIVE_STATES, Store
from batchd.web import READY, create_app

IDLE_CHECK_SECONDS = 0.05
DATA_VERSION_SECONDS = 0.25  # how soon a CLI's change (cancel, retry) is acted on
STATUS_SECONDS = 5.0


class Daemon:
    """One batchd process: spool + store + API client + stages + HTTP endpoint."""

    def __init__(
        self,
        cfg: Config,
        once: bool = False,
        clock: Callable[[], float] = time.time,
        serve_http: bool = True,
    ) -> None:
        self.cfg = cfg
        self.once = once
        self.clock = clock
        self.serve_http = serve_http
        self.metrics = Metrics(list(cfg.provider_configs()))
        self.log = logs.get("batchd")
        self.stop_event = asyncio.Event()
        self.ctx: Context | None = None
        self.outcomes: Counter[str] = Counter()  # jobs ended while this daemon ran
        self.listen: str | None = None  # the address actually bound
        self.exit_code: int | None = None
        self.facade: facade.Facade | None = None  # the OpenAI-compatible API, with tenants

    async def _refresh_gauges(self) -> None:
        ctx = self.ctx
        if ctx is None:
            return
        m = self.metrics
        # These are the group's figures (the shared store and spool): with replicas only
        # the tracking one reports them and the others say 0, so that a sum over
        # instances (the dashboard's) counts each job once.
        if not ctx.leases.has_role("tracker"):
            for s in JobState:
                m.jobs.labels(s.value).set(0)
            for g in (m.oldest_job_age, m.inbox_files, m.budget_waiting):
                g.set(0)
            return
        counts = await ctx.store.count_by_state()
        for s in JobState:
            m.jobs.labels(s.value).set(counts.get(s.value, 0))
        oldest = await ctx.store.oldest_live_created_at()
        m.oldest_job_age.set(0 if oldest is None else max(0.0, self.clock() - oldest))
        m.inbox_files.set(len(ctx.spool.waiting()))
        m.budget_waiting.set(await ctx.store.budget_waiting_count())

    async def _idle_watch(self, ctx: Context) -> None:
        """In --once mode: stop when the inbox is empty, every job has ended and the
        provider's copies due for deletion are gone, or when the API refuses access
        (nothing could get further; the jobs wait)."""
        default = ctx.providers.default_name
        while True:
            await asyncio.sleep(IDLE_CHECK_SECONDS)
            held = {h.provider: h for h in ctx.holds.values() if h.blocked}
            if held:
                live = {p or default for p in await ctx.store.live_providers()}
                stuck = [held[n] for n in held if n in live]
                if stuck:
                    for h in stuck:
                        self.log.error(
                            "once_stopped_held",
                            provider=h.provider,
                            reason=h.reason,
                            message=h.message,
                        )
                    ctx.stuck_held = True
                    self.stop_event.set()
                    return
            if ctx.claiming or ctx.spool.waiting():
                continue
            if await ctx.store.live_count() or ctx.claiming:
                continue
            if not await sources.idle(ctx):  # still reading, or outcomes to publish
                continue
            # The provider's copies due for deletion now go too (not those backing off).
            due = await ctx.store.next_remote_file_at()
            if due is None or due > self.clock():
                self.stop_event.set()
                return

    async def _watch_store(self, ctx: Context) -> None:
        """Another process (`batchd retry`, `cancel`) changed the store: look at once."""
        version = await ctx.store.data_version()
        while True:
            await asyncio.sleep(DATA_VERSION_SECONDS)
            now = await ctx.store.data_version()
            if now != version:
                version = now
                ctx.wake_all()

    async def _supervised(
        self, name: str, stage: Callable[[Context], Awaitable[None]], ctx: Context
    ) -> None:
        """Run a stage until shutdown; if it fails (disk full, database locked, a bug),
        log it and start it again after a backoff. Every stage is level-triggered, so a
        restart picks up exactly where the store says things are."""
        failures = 0
        while not ctx.stopping:
            started = asyncio.get_running_loop().time()
            try:
                await stage(ctx)
            except Exception as e:
                if asyncio.get_running_loop().time() - started > 60:
                    failures = 0
                failures += 1
                delay = min(60.0, 0.5 * 2 ** min(failures, 7))
                self.metrics.stage_restarts.labels(name).inc()
                self.log.error(
                    "stage_failed",
                    stage=name,
                    error=f"{type(e).__name__}: {e}",
                    retry_in=delay,
                    exc_info=True,
                )
                await asyncio.sleep(delay)

    async def _warm_prices(self, ctx: Context) -> None:
        """Load the price database off the event loop at start-up (~1 s), so the first
        job's estimate does not stall the loop while it loads."""
        try:
            await asyncio.to_thread(ctx.prices.warm)
        except Exception as e:  # prices then load (or fail: "unknown") at first use
            self.log.warning("prices_unavailable", error=f"{type(e).__name__}: {e}")

    async def _watchdog(self) -> None:
        """Ping systemd's watchdog from the event loop, so a hung loop gets restarted."""
        period = sdnotify.watchdog_interval()
        if period is None:
            return
        while True:
            sdnotify.watchdog()
            await asyncio.sleep(period)

    async def _status(self, ctx: Context) -> None:
        """Keep `systemctl status` showing a one-line summary."""
        if not sdnotify.enabled():
            return
        while True:
            try:
                counts = await ctx.store.count_by_state()
                live = sum(counts.get(s.value, 0) for s in LIVE_STATES)
                held = "".join(
                    f"; HELD ({h.provider}): {h.message}" for h in ctx.holds.values() if h.blocked
                )
                sdnotify.status(
                    f"{live} job(s) in progress, {counts.get('tracking', 0)} tracking, "
                    f"{counts.get('done', 0)} done, {counts.get('failed', 0)} failed{held}"
                )
            except Exception as e:  # a status line is not worth stopping the daemon for
                self.log.warning("status_failed", error=str(e))
            await asyncio.sleep(STATUS_SECONDS)

    def reload(self) -> None:
        """SIGHUP: re-read the config and the API key; apply what can change live and
        say which changed keys need a restart."""
        ctx = self.ctx
        try:
            new = load(self.cfg.source) if self.cfg.source else None
        except ConfigError as e:
            self.log.error("reload_failed", error=str(e))
            return
        if new is None or ctx is None:
            self.log.warning("reload_skipped", reason="no config file to re-read")
            return
        changed = changed_keys(ctx.cfg, new)
        restart = sorted(k for k in changed if k not in RELOADABLE)
        batch = dataclasses.replace(
            ctx.cfg.batch,
            poll_interval_seconds=new.batch.poll_interval_seconds,
            metadata=new.batch.metadata,
        )
        api = dataclasses.replace(
            ctx.cfg.api, api_key_env=new.api.api_key_env, api_key_file=new.api.api_key_file
        )
        admission = dataclasses.replace(
            ctx.cfg.admission,
            token_budgets=new.admission.token_budgets,
            request_limits=new.admission.request_limits,
        )
        webhooks = dataclasses.replace(
            ctx.cfg.webhooks, poll_interval_seconds=new.webhooks.poll_interval_seconds
        )
        self.cfg = ctx.cfg = dataclasses.replace(
            ctx.cfg,
            api=api,
            batch=batch,
            log=new.log,
            intake=new.intake,
            retention=new.retention,
            admission=admission,
            webhooks=webhooks,
            prices=new.prices,
            estimate=new.estimate,
            budget=new.budget,
        )
        ctx.reprice()
        logs.setup(new.log.level, new.log.format)
        for name, provider in ctx.providers.items():
            pc = new.provider_configs().get(name, provider.cfg)
            # The key's source may change live; the rest of a provider needs a restart.
            provider.cfg = dataclasses.replace(
                provider.cfg,
                api=dataclasses.replace(
                    provider.cfg.api,
                    api_key_env=pc.api.api_key_env,
                    api_key_file=pc.api.api_key_file,
                ),
            )
            try:
                provider.set_key(provider.cfg.api.api_key())
            except OSError as e:
                self.log.error("reload_key_failed", provider=name, error=str(e))
            ctx.hold_of(name).changed.set()  # a held provider is probed with it at once
        ctx.admission_version += 1
        ctx.wake_all()
        self.log.info(
            "reloaded",
            applied=sorted(k for k in changed if k in RELOADABLE),
            log_level=new.log.level,
            poll_interval_seconds=batch.poll_interval_seconds,
        )
        if restart:
            self.log.warning("reload_needs_restart", keys=restart)

    def request_stop(self) -> None:
        """Ask the daemon to stop (signal handlers call this)."""
        sdnotify.stopping()
        self.stop_event.set()

    def _open_spool(self) -> Spool:
        spool = Spool(self.cfg.spool.dir, self.cfg.providers)
        try:
            spool.ensure()
        except OSError as e:
            raise StartupError(f"[spool] dir: {spool.root}: {_why(e)}") from None
        if self.cfg.state.url is None:  # replicas on PostgreSQL share the spool (leases)
            spool.lock()
        return spool

    async def _serve(self, ctx: Context, token: str | None, secret: bytes | None) -> web.AppRunner:
        cfg = self.cfg
        app = create_app(self.metrics, self._refresh_gauges, ctx, token, secret, self.facade)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, cfg.http.host, cfg.http.port).start()
        except OSError as e:
            await runner.cleanup()
            raise StartupError(f"[http] listen: {cfg.http.listen}: {_why(e)}") from None
        host, port = runner.addresses[0][:2]
        self.listen = f"{host}:{port}"
        app[READY]["ready"] = True
        return runner

    async def _stopper(
        self, ctx: Context, stages: list[asyncio.Task[None]], side: list[asyncio.Task[None]]
    ) -> None:
        """At stop: no new work, a grace period for what is in flight, then cancel."""
        await self.stop_event.wait()
        ctx.stopping = True
        ctx.wake_all()
        for hold in ctx.holds.values():
            hold.changed.set()
        grace = self.cfg.daemon.shutdown_grace_seconds
        _done, pending = await asyncio.wait(stages, timeout=grace + 1.0)
        if pending:
            self.log.warning("shutdown_cancelling", stages=sorted(t.get_name() for t in pending))
        for t in (*pending, *side):
            t.cancel()

    async def run(self) -> int:
        """Run until stopped (or, with once=True, until idle). Returns an exit code:
        with once=True, 1 when a job failed during the run."""
        cfg = self.cfg
        # Read secrets before touching anything: a bad one is a config error (exit 2).
        token = cfg.http.token() if self.serve_http else None
        webhook_secret = cfg.webhooks.secret() if self.serve_http else None
        tenants = facade.load(cfg.facade) if self.serve_http and cfg.facade.tenants else None
        keys: dict[str, str | None] = {}
        for name, pc in cfg.provider_configs().items():
            try:
                keys[name] = pc.api.api_key()
            except OSError as e:
                raise StartupError(
                    f"{pc.section} api_key_file: {pc.api.api_key_file}: {_why(e)}"
                ) from None
        spool = self._open_spool()
        loop = asyncio.get_running_loop()
        runner: web.AppRunner | None = None
        try:
            async with (
                Store.connect(cfg.state.target, self.clock) as store,
                Providers.build(cfg, self.metrics, keys) as providers,
            ):
                ctx = self.ctx = Context(
                    cfg, store, spool, providers, self.metrics, self.log, self.clock
                )
                ctx.outcomes = self.outcomes
                if self.once:  # before any stage runs: the idle check waits for them
                    ctx.sources_draining.update(cfg.sources)
                ctx.leases = Leases.for_store(store, cfg.replicas, self.log, self.metrics)
                for name in providers:
                    hold = ctx.hold_of(name)
                    if keys[name] is None:
                        why = health.no_key_message(ctx, name)
                        await hold.block(ctx, reason="api_key", message=why)
                    else:
                        await store.set_setting(hold.setting, None)  # a stale hold
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.add_signal_handler(sig, self.request_stop)
                loop.add_signal_handler(signal.SIGHUP, self.reload)
                if tenants:
                    self.facade = facade.Facade(ctx, tenants)
                    await self.facade.start()  # before the stages: a create cut off by a crash
                if self.serve_http:
                    runner = await self._serve(ctx, token, webhook_secret)
                sdnotify.ready()
                self.log.info(
                    "started",
                    spool=str(spool.root),
                    once=self.once,
                    listen=self.listen,
                    replica=ctx.leases.owner if ctx.leases.shared else None,
                )
                try:
                    await self._run_stages(ctx)
                finally:
                    await ctx.leases.close()  # the others take over at once
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            if runner is not None:
                await runner.cleanup()
            spool.unlock()
            if self.listen is not None or not self.serve_http:
                self.log.info("stopped")
        held = self.ctx is not None and self.ctx.stuck_held
        gave_up = self.ctx is not None and bool(self.ctx.sources_failed)
        self.exit_code = 1 if self.once and (self.outcomes["failed"] or held or gave_up) else 0
        return self.exit_code

    async def _run_stages(self, ctx: Context) -> None:
        named: list[tuple[str, Callable[[Context], Awaitable[None]]]] = [
            ("intake", intake.run),
            ("submit", submit.run),
            ("track", track.run),
            ("collect", collect.run),
            ("retention", retention.run),
            ("health", health.run),
        ]
        if self.facade is not None:
            named.append(("facade", self.facade.run))
        named += [
            (f"source:{name}", sources.stage(scfg, self.once))
            for name, scfg in self.cfg.sources.items()
        ]
        async with asyncio.TaskGroup() as tg:
            stages = [
                tg.create_task(self._supervised(name, fn, ctx), name=name) for name, fn in named
            ]
            side = [
                tg.create_task(self._watchdog(), name="watchdog"),
                tg.create_task(self._status(ctx), name="status"),
                tg.create_task(self._watch_store(ctx), name="store-watch"),
                tg.create_task(ctx.leases.run(), name="leases"),
                tg.create_task(self._warm_prices(ctx), name="prices"),
            ]
            if self.once:
                side.append(tg.create_task(self._idle_watch(ctx), name="idle"))
            tg.create_task(self._stopper(ctx, stages, side), name="stopper")


def _why(e: OSError) -> str:
    if e.errno == errno.EADDRINUSE:
        return "address already in use (another batchd, or another program, listens there)"
    return (e.strerror or str(e)).lower()
