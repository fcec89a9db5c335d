"""The daemon: builds the parts, runs the stages in a TaskGroup, stops on signals."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from batchd import logs, sdnotify, watch
from batchd.api import BatchApi
from batchd.config import Config, ConfigError, load
from batchd.metrics import Metrics
from batchd.spool import Spool
from batchd.stages import Context, collect, submit, track
from batchd.states import TERMINAL_JOB_STATES, JobState
from batchd.store import Store
from batchd.web import READY, create_app

IDLE_CHECK_SECONDS = 0.05


class _Stop(Exception):
    """Raised inside the TaskGroup to end it."""


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
        self.metrics = Metrics()
        self.log = logs.get("batchd")
        self.stop_event = asyncio.Event()
        self.ctx: Context | None = None

    async def _refresh_gauges(self) -> None:
        ctx = self.ctx
        if ctx is None:
            return
        counts = await ctx.store.count_by_state()
        for s in JobState:
            self.metrics.jobs.labels(s.value).set(counts.get(s.value, 0))
        oldest = await ctx.store.oldest_live_created_at()
        self.metrics.oldest_job_age.set(0 if oldest is None else max(0.0, self.clock() - oldest))
        self.metrics.inbox_files.set(len(ctx.spool.waiting()))

    async def _idle_watch(self, ctx: Context) -> None:
        """In --once mode: stop when the inbox is empty and every job has ended."""
        live = [s for s in JobState if s not in TERMINAL_JOB_STATES]
        while True:
            await asyncio.sleep(IDLE_CHECK_SECONDS)
            if not ctx.spool.waiting() and not await ctx.store.jobs(live):
                raise _Stop

    async def _wait_stop(self) -> None:
        await self.stop_event.wait()
        raise _Stop

    async def _supervised(
        self, name: str, stage: Callable[[Context], Awaitable[None]], ctx: Context
    ) -> None:
        """Run a stage for ever; if it fails (disk full, database locked, a bug), log it
        and start it again after a backoff. Every stage is level-triggered, so a
        restart picks up exactly where the store says things are."""
        failures = 0
        while True:
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
                live = sum(n for s, n in counts.items() if s not in TERMINAL_JOB_STATES)
                sdnotify.status(
                    f"{live} job(s) in progress, {counts.get('tracking', 0)} tracking, "
                    f"{counts.get('done', 0)} done, {counts.get('failed', 0)} failed"
                )
            except Exception as e:  # a status line is not worth stopping the daemon for
                self.log.warning("status_failed", error=str(e))
            await asyncio.sleep(5)

    def reload(self) -> None:
        """SIGHUP: re-read the config; apply log level/format, poll interval, metadata."""
        ctx = self.ctx
        try:
            new = load(self.cfg.source) if self.cfg.source else None
        except ConfigError as e:
            self.log.error("reload_failed", error=str(e))
            return
        if new is None or ctx is None:
            self.log.warning("reload_skipped", reason="no config file to re-read")
            return
        batch = dataclasses.replace(
            ctx.cfg.batch,
            poll_interval_seconds=new.batch.poll_interval_seconds,
            metadata=new.batch.metadata,
        )
        self.cfg = ctx.cfg = dataclasses.replace(ctx.cfg, batch=batch, log=new.log)
        logs.setup(new.log.level, new.log.format)
        ctx.wake_track.set()
        self.log.info(
            "reloaded",
            log_level=new.log.level,
            poll_interval_seconds=batch.poll_interval_seconds,
            metadata_keys=sorted(batch.metadata),
        )

    def request_stop(self) -> None:
        """Ask the daemon to stop (signal handlers call this)."""
        sdnotify.stopping()
        self.stop_event.set()

    async def run(self) -> int:
        """Run until stopped (or, with once=True, until idle). Returns an exit code."""
        cfg = self.cfg
        # Read secrets before touching anything: a bad one is a config error (exit 2).
        token = cfg.http.token() if self.serve_http else None
        webhook_secret = cfg.webhooks.secret() if self.serve_http else None
        spool = Spool(cfg.spool.dir)
        spool.ensure()
        spool.lock()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        store = await Store.open(cfg.state.database, self.clock)
        runner: web.AppRunner | None = None
        try:
            async with BatchApi(cfg.api, cfg.api.api_key(), self.metrics) as api:
                ctx = self.ctx = Context(cfg, store, spool, api, self.metrics, self.log, self.clock)
                if self.serve_http:
                    app = create_app(self.metrics, self._refresh_gauges, ctx, token, webhook_secret)
                    runner = web.AppRunner(app, access_log=None)
                    await runner.setup()
                    await web.TCPSite(runner, cfg.http.host, cfg.http.port).start()
                    app[READY]["ready"] = True
                sdnotify.ready()
                self.log.info(
                    "started",
                    spool=str(spool.root),
                    once=self.once,
                    listen=cfg.http.listen if self.serve_http else None,
                )
                async with asyncio.TaskGroup() as tg:
                    for name, stage in (
                        ("intake", watch.run),
                        ("submit", submit.run),
                        ("track", track.run),
                        ("collect", collect.run),
                    ):
                        tg.create_task(self._supervised(name, stage, ctx), name=name)
                    tg.create_task(self._wait_stop(), name="stop")
                    tg.create_task(self._watchdog(), name="watchdog")
                    tg.create_task(self._status(ctx), name="status")
                    if self.once:
                        tg.create_task(self._idle_watch(ctx), name="idle")
        except* _Stop:
            pass
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            if runner is not None:
                await runner.cleanup()
            await store.close()
            spool.unlock()
            self.log.info("stopped")
        return 0
