"""The sub-commands: each reads its arguments, calls into batchd, prints the answer.

The read-only ones (jobs, show) are in reads.py: they run without an event loop."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import os
import sqlite3
import sys
from pathlib import Path

from batchd.cli import render
from batchd.cli.common import (
    EXIT_FAIL,
    EXIT_OK,
    EXIT_USAGE,
    Fail,
    NoDatabase,
    config,
    one_job,
    since,
    store,
)
from batchd.config import Config, ConfigError
from batchd.provider_config import DEFAULT_PROVIDER, ProviderConfig
from batchd.states import TERMINAL_JOB_STATES, JobState

# Modules with heavy imports (the HTTP client, the validator, logging) are imported
# inside the commands that need them.

# --- run ------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> int:
    """Run the daemon in the foreground."""
    from batchd import logs
    from batchd.daemon import Daemon

    cfg = config(args)
    logs.setup(cfg.log.level, cfg.log.format)
    daemon = Daemon(cfg, once=args.once)
    task = asyncio.create_task(daemon.run())
    if cfg.http.port == 0:  # say where it listens: nobody can guess a free port
        while daemon.listen is None and not task.done():
            await asyncio.sleep(0.01)
        if daemon.listen:
            print(f"batchd: listening on http://{daemon.listen}", file=sys.stderr, flush=True)
    return await task


# --- validate / submit ----------------------------------------------------------------


def _rules(args: argparse.Namespace) -> tuple[Config, ProviderConfig]:
    """The config of --config / $BATCHD_CONFIG (else the defaults: the API's limits,
    OpenAI's prices) and the provider whose rules and per-batch limits apply:
    `--provider P` (a configured NAME, or without a config a kind such as `anthropic`),
    else the default ([api])."""
    from batchd import formats
    from batchd.provider_config import KINDS, parse_one

    name = getattr(args, "provider", None)
    have_config = bool(getattr(args, "config", None) or os.environ.get("BATCHD_CONFIG"))
    cfg = config(args) if have_config else Config()
    providers = cfg.provider_configs()
    if name is None:
        return cfg, providers[DEFAULT_PROVIDER]
    if name in providers:
        return cfg, providers[name]
    if name in KINDS and name != "azure_openai":  # a kind's own rules and limits
        table = {"kind": name}
        return cfg, parse_one(f"{name}-rules", table, Path("."), cfg.upload)
    if name == "azure_openai":
        table = {"kind": name, "base_url": "https://example.openai.azure.com"}
        return cfg, parse_one("azure-rules", table, Path("."), cfg.upload)
    known = ", ".join([*providers, *(k for k in formats.KINDS if k not in providers)])
    raise Fail(
        f"--provider: {name!r} is neither a configured provider nor a kind ({known})", EXIT_USAGE
    )


def _check_file(name: str, pc: ProviderConfig, cfg: Config) -> tuple[bool, str, str]:
    """Validate one file as the daemon does for provider `pc` (bigger than one batch is
    fine: it is split) and estimate its cost as the daemon will; prints its problems;
    returns (ok, one-line summary, the estimate line)."""
    from batchd import formats, jsonl, pieces
    from batchd.estimate import configured
    from batchd.prices import PriceBook, price_source

    limits = pc.limits
    book = PriceBook(price_source(pc.kind, pc.api.base_url), cfg.prices)
    estimator = configured(cfg.estimate, book.price)
    try:
        summary = formats.validate_path(
            name,
            pc.kind,
            jsonl.UNBOUNDED,
            model=pc.model,
            endpoint=pc.endpoint,
            deployments=pc.deployments,
            on_request=estimator.add,
        )
    except OSError as e:
        print(f"{name}:0: unreadable: {e.strerror or e}")
        return False, "", ""
    for p in summary.problems:
        print(jsonl.format_problem(name, p))
    if not summary.ok:
        return False, "", ""
    lim = jsonl.Limits(
        limits.max_requests_per_batch,
        limits.max_bytes_per_batch,
        limits.max_embedding_inputs_per_batch,
    )
    batches = len(pieces.plan(Path(name), lim, summary.endpoint == "/v1/embeddings"))
    split = f"; split into {batches} batches" if batches > 1 else ""
    model = summary.model or "mixed models"
    what = f"{summary.requests} requests, {summary.endpoint}, {model}{split}"
    return True, what, estimator.finish().describe()


async def validate(args: argparse.Namespace) -> int:
    """Validate files locally with the same rules the daemon applies; estimate their cost."""
    cfg, rules = _rules(args)
    bad = 0
    for name in args.files:
        ok, what, estimate = await asyncio.to_thread(_check_file, name, rules, cfg)
        if ok:
            print(f"{name}: ok ({what})", file=sys.stderr)
            print(f"{name}: {estimate}", file=sys.stderr)
        else:
            bad += 1
    return EXIT_FAIL if bad else EXIT_OK


def _submit_names(args: argparse.Namespace) -> list[str]:
    """The job NAME of each FILE (`--name`, else the file name without `.jsonl`), all
    checked before anything is copied: a NAME intake would ignore (`.hidden`) or that
    is not `[A-Za-z0-9._-]{1,100}` is refused, never renamed."""
    from batchd.spool import check_name

    if args.name is not None:
        if len(args.files) > 1:
            raise Fail("--name needs exactly one FILE", EXIT_USAGE)
        try:
            return [check_name(args.name)]
        except ValueError as e:
            raise Fail(f"--name: {e}", EXIT_USAGE) from None
    names = []
    for name in args.files:
        try:
            names.append(check_name(Path(name).name))
        except ValueError as e:
            raise Fail(f"{name}: file name is not a job NAME: {e}; pass --name", EXIT_USAGE) from e
    return names


def _copy(src: Path, dest: Path) -> str:
    """Copy with fsync; returns the SHA-256 of what was copied."""
    sha = hashlib.sha256()
    with src.open("rb") as fin, dest.open("wb") as fout:
        while chunk := fin.read(1 << 20):
            sha.update(chunk)
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    return sha.hexdigest()


async def submit(args: argparse.Namespace) -> int:
    """Copy files into the inbox atomically (temp name, fsync, rename)."""
    from batchd.spool import Spool, enter_inbox, fsync_dir

    cfg = config(args)
    stems = _submit_names(args)
    spool = Spool(cfg.spool.dir, cfg.providers)
    provider = args.provider
    if provider == DEFAULT_PROVIDER:
        provider = None
    if provider is not None and provider not in cfg.providers:
        known = ", ".join(cfg.provider_configs())
        raise Fail(f"--provider: {provider!r} is not configured ({known})", EXIT_USAGE)
    rules = cfg.provider_configs()[provider or DEFAULT_PROVIDER]
    inbox = spool.inbox / provider if provider else spool.inbox
    try:
        spool.ensure()
    except OSError as e:
        raise Fail(f"[spool] dir: {cfg.spool.dir}: {e.strerror or e}", EXIT_USAGE) from None
    bad = 0
    for name, stem in zip(args.files, stems, strict=True):
        src = Path(name)
        what = estimate = ""
        if not args.no_validate:
            ok, what, estimate = await asyncio.to_thread(_check_file, name, rules, cfg)
            if not ok:
                bad += 1
                continue
        tmp = spool.inbox / f".submit-{os.getpid()}-{stem}.jsonl.part"  # (same filesystem)
        try:
            sha = await asyncio.to_thread(_copy, src, tmp)
            if args.allow_duplicate:  # before the file is in inbox/: intake may be quick
                marker = spool.allow_marker(sha)
                marker.parent.mkdir(exist_ok=True)
                marker.touch()
                fsync_dir(marker.parent)
            fname = enter_inbox(inbox, tmp, stem)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            print(f"batchd: {name}: {e.strerror or e}", file=sys.stderr)
            bad += 1
            continue
        print(f"{name} -> {inbox / fname}" + (f" ({what})" if what else ""))
        if estimate:
            print(f"{name}: {estimate}")
    return EXIT_FAIL if bad else EXIT_OK


# --- cost (jobs and show: reads.py) ---------------------------------------------------


async def cost(args: argparse.Namespace) -> int:
    """Report what results billed since --since, grouped by model, source or day."""
    from batchd import costreport
    from batchd.prices import Unknown

    cfg = config(args)
    t = since(args.since)
    rows: list[costreport.CostRow] = []
    try:
        async with store(cfg) as s:
            found = await s.charges_since(t)
    except NoDatabase as e:
        print(f"batchd: {e}", file=sys.stderr)
        found = []
    for r in found:
        nanos = r["cost_nanos"]
        rows.append(
            costreport.CostRow(
                at=float(r["at"]),
                model=r["model"],
                source=r["source"],
                requests=int(r["requests"]),
                input_tokens=int(r["input_tokens"]),
                cached_tokens=int(r["cached_tokens"]),
                output_tokens=int(r["output_tokens"]),
                cost=Unknown(r["cost_unknown"] or "not priced") if nanos is None else int(nanos),
            )
        )
    lines, total = costreport.group(rows, args.by, cfg.budget.timezone)
    if args.json:
        render.print_json({**costreport.as_json(lines, total, args.by), "since": render.iso(t)})
        return EXIT_OK
    print(costreport.render(lines, total, args.by))
    where = f"days in {cfg.budget.timezone}, " if args.by == "day" else ""
    print(
        f"(results collected since {render.ts(t)} UTC; {where}batch prices; charges are "
        f"deleted with their jobs after [retention] jobs_days)",
        file=sys.stderr,
    )
    return EXIT_OK


# --- cancel / retry -------------------------------------------------------------------


async def _await_end(cfg: Config, job_id: str, deadline: float) -> JobState:
    """A running daemon carries out the cancellation: watch the store until it ends."""
    loop = asyncio.get_running_loop()
    async with store(cfg) as s:
        while True:
            job = await s.job(job_id)
            if job.state in TERMINAL_JOB_STATES or loop.time() >= deadline:
                return job.state
            await asyncio.sleep(0.2)


async def cancel(args: argparse.Namespace) -> int:
    """Cancel a job's batches, wait for `cancelled`, collect partial results.

    A running daemon is only asked (the flag in the database). With none running, this
    command takes the spool lock (so no daemon starts meanwhile) and carries out just
    this job's cancellation itself; the inbox and other jobs are left alone.
    """
    from batchd import logs
    from batchd.spool import Spool, SpoolLocked
    from batchd.stages import cancel as canceller

    cfg = config(args)
    logs.setup(cfg.log.level, "console")
    deadline = asyncio.get_running_loop().time() + args.wait
    async with store(cfg) as s:
        job = await one_job(s, args.job)
        if not await s.request_cancel(job.id):
            raise Fail(f"job {job.id} already ended ({job.state})")
        print(f"cancelling {job.id} ({job.name})")
        spool = Spool(cfg.spool.dir, cfg.providers)
        try:
            if cfg.state.url is not None:  # replicas take no spool lock: one of them acts
                raise SpoolLocked("replicas share this store")
            spool.lock()
        except SpoolLocked:
            daemon = True
        except OSError as e:
            raise Fail(f"[spool] dir: {cfg.spool.dir}: {e.strerror or e}", EXIT_USAGE) from None
        else:
            daemon = False
            try:
                pc = cfg.provider_configs().get(job.provider or DEFAULT_PROVIDER)
                if pc is None or pc.api.api_key() is None:
                    raise Fail(
                        "no API key and no daemon running: the cancellation is recorded; "
                        "the next `batchd run` carries it out",
                        EXIT_USAGE,
                    )
                job = await canceller.drive(cfg, s, job.id, deadline)
            finally:
                spool.unlock()
    if daemon:
        state = await _await_end(cfg, job.id, deadline)
        async with store(cfg) as s:
            job = await s.job(job.id)
    else:
        state = job.state
    if state in TERMINAL_JOB_STATES:
        where = cfg.spool.dir / job.result_dir if job.result_dir else "-"
        print(f"{state}: {job.completed} completed, {job.failed} failed; results in {where}")
        return EXIT_OK
    if state in canceller.UNSUBMITTED:
        raise Fail(
            f"job {job.id} is {state} (no batch yet) and no daemon runs; the cancellation "
            "is recorded: the next `batchd run` carries it out"
        )
    who = "the daemon" if daemon else "the next `batchd run`"
    raise Fail(
        f"job {job.id} is still {state} after {args.wait:g}s; the cancel goes on ({who} "
        f"carries it out): `batchd show {job.name}` tells when it has ended"
    )


async def retry(args: argparse.Namespace) -> int:
    """Queue an ended job's failed and missing requests as a new job."""
    from batchd.formats import id_key
    from batchd.spool import Spool
    from batchd.stages.retry import RetryRefused, retry_job

    cfg = config(args)
    async with store(cfg) as s:
        job = await one_job(s, args.job)
        pc = cfg.provider_configs().get(job.provider or DEFAULT_PROVIDER)
        key = id_key(pc.kind) if pc else "custom_id"
        try:
            new, n = await retry_job(s, Spool(cfg.spool.dir, cfg.providers), job, key)
        except RetryRefused as e:
            raise Fail(f"cannot retry {job.name}: {e}") from None
    print(
        f"queued {n} request(s) of {job.id} ({job.name}) as job {new.id} ({new.name}); "
        "a running daemon submits it at once, else the next `batchd run`"
    )
    return EXIT_OK


# --- check ----------------------------------------------------------------------------

Result = tuple[bool, str, str]


def _check_spool(cfg: Config) -> Result:
    root = cfg.spool.dir
    if root.exists():
        if not root.is_dir():
            return False, "spool", f"{root}: not a directory"
        missing = [d for d in ("inbox", "processing", "done", "failed") if not (root / d).is_dir()]
        if not os.access(root, os.W_OK | os.X_OK):
            return False, "spool", f"{root}: not writable"
        note = f" ({', '.join(missing)} created at the first run)" if missing else ""
        return True, "spool", f"{root} writable{note}"
    parent = next((p for p in root.parents if p.exists()), None)
    if parent is None or not os.access(parent, os.W_OK | os.X_OK):
        return False, "spool", f"{root}: does not exist and {parent} is not writable"
    return True, "spool", f"{root} does not exist yet (created at the first run)"


async def _check_postgres(url: str) -> Result:
    """Reachable, and how far migrated (read only: a check never migrates anything)."""
    import asyncpg

    from batchd.store.backend import redact

    where = redact(url)
    try:
        conn = await asyncpg.connect(url, timeout=10)
    except (OSError, asyncpg.PostgresError, TimeoutError) as e:
        return False, "database", f"{where}: {e}"
    try:
        version = await conn.fetchval("SELECT MAX(version) FROM batchd_schema")
    except asyncpg.UndefinedTableError:
        version = None
    try:
        if version is None:
            return True, "database", f"{where} reachable (schema created at the first run)"
        n = await conn.fetchval("SELECT COALESCE(SUM(n), 0) FROM job_counts")
    finally:
        await conn.close()
    return True, "database", f"{where} ({n} jobs, schema {version})"


def _check_database(cfg: Config) -> Result:
    db = cfg.state.database
    if not db.exists():
        parent = next((p for p in db.parents if p.exists()), None)
        if parent is None or not os.access(parent, os.W_OK | os.X_OK):
            return False, "database", f"{db}: does not exist and {parent} is not writable"
        return True, "database", f"{db} does not exist yet (created at the first run)"
    try:  # read-only: a check never creates or migrates anything
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            version = con.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master")}
            table = "job_counts" if "job_counts" in tables else "jobs"
            expr = "SUM(n)" if table == "job_counts" else "COUNT(*)"
            n = con.execute(f"SELECT {expr} FROM {table}").fetchone()[0] or 0
        finally:
            con.close()
    except sqlite3.Error as e:
        return False, "database", f"{db}: {e}"
    return True, "database", f"{db} ({n} jobs, schema {version})"


async def _check_provider(pc: ProviderConfig) -> list[Result]:
    """The key, proxy and one authenticated call of one provider."""
    import ssl

    from batchd.metrics import Metrics
    from batchd.providers import make
    from batchd.providers.errors import ApiError, TlsError
    from batchd.transport import describe_proxy, probe_tls, proxy_for

    label = "" if pc.name == DEFAULT_PROVIDER else f" {pc.name}"
    try:
        key = pc.api.api_key()
    except OSError as e:
        return [(False, f"api key{label}", f"{pc.section} api_key_file: {e.strerror or e}")]
    if key is None:
        where = (
            f"${pc.api.api_key_env}, {pc.section} api_key_file or "
            f"$CREDENTIALS_DIRECTORY/{pc.api.credential}"
        )
        return [(False, f"api key{label}", f"not set ({where})")]
    out: list[Result] = [(True, f"api key{label}", f"found ({len(key)} characters)")]
    out.append((True, f"proxy{label}", describe_proxy(pc.api)))
    once = dataclasses.replace(pc, api=dataclasses.replace(pc.api, max_retries=1))
    url = pc.api.base_url
    what = f"api{label}"
    try:
        async with make(once, key, Metrics([pc.name])) as provider:
            listed = await provider.probe()
        kind = "" if pc.name == DEFAULT_PROVIDER else f" ({pc.kind})"
        out.append((True, what, f"{url}{kind} reachable, key accepted ({listed} listed)"))
    except TlsError as e:
        out.append((False, what, f"{url}: {e.cause}"))
    except ApiError as e:
        why = f"HTTP {e.status}: {e.message}" if e.status else e.message
        if not e.status and url.startswith("https://"):
            # A dropped connection may be a TLS refusal that came too late for the HTTP
            # client to read: one quiet handshake names it.
            cause = await asyncio.to_thread(probe_tls, pc.api, proxy_for(pc.api))
            why = cause or why
        out.append((False, what, f"{url}: {why}"))
    except (OSError, ssl.SSLError) as e:  # ca_file / client certificate unusable
        out.append((False, what, f"{url}: TLS setup: {e}"))
    return out


async def _check_api(cfg: Config) -> list[Result]:
    out: list[Result] = []
    for pc in cfg.provider_configs().values():
        out += await _check_provider(pc)
    return out


async def _check_sources(cfg: Config) -> list[Result]:
    """One line per [sources.NAME]: its broker reachable, and what it holds (reads only)."""
    if not cfg.sources:
        return []
    from batchd.sources import probe

    out: list[Result] = []
    for name, scfg in cfg.sources.items():
        ok, detail = await probe(scfg, cfg.spool.dir)
        out.append((ok, f"source {name}", f"{scfg.kind} {detail}"))
    return out


async def check(args: argparse.Namespace) -> int:
    """Check config, spool, database and API reachability; one line per check."""
    try:
        cfg = config(args)
    except ConfigError as e:
        print(f"FAIL  config    {e}")
        return EXIT_FAIL
    results: list[Result] = [(True, "config", str(cfg.source or ""))]
    results.append(_check_spool(cfg))
    url = cfg.state.url
    results.append(await _check_postgres(url) if url else _check_database(cfg))
    results += await _check_api(cfg)
    results += await _check_sources(cfg)
    for ok, what, detail in results:
        print(f"{'ok  ' if ok else 'FAIL'}  {what:9} {detail}")
    return EXIT_OK if all(ok for ok, _, _ in results) else EXIT_FAIL


# --- emulator / demo ------------------------------------------------------------------


async def emulator(args: argparse.Namespace) -> int:
    """Serve the built-in Batch API emulator until interrupted."""
    import binascii

    from batchd.emulator import EmulatorConfig, serve
    from batchd.emulator.faults import FaultConfig
    from batchd.emulator.providers import PREFIXES
    from batchd.emulator.webhooks import secret_key

    if args.webhook_secret is not None:
        try:
            if not args.webhook_secret.startswith("whsec_") or not secret_key(args.webhook_secret):
                raise ValueError
        except (ValueError, binascii.Error):
            raise Fail("--webhook-secret must be whsec_<base64>", EXIT_USAGE) from None
    faults = FaultConfig(
        seed=args.fault_seed,
        rate_limit=args.fault_rate_limit,
        server_error=args.fault_server_error,
        drop_connection=args.fault_drop,
        slow=args.fault_slow,
        slow_seconds=args.fault_slow_seconds,
        ghost_create=args.fault_ghost_create,
        truncated_download=args.fault_truncate,
        force_first=args.fault_force_first,
    )
    cfg = EmulatorConfig(
        time_scale=args.time_scale,
        seed=args.seed,
        api_key=args.api_key,
        bandwidth_bytes_per_s=args.bandwidth_bytes_per_s,
        output_pad_bytes=args.output_pad_bytes,
        expire_after_seconds=args.expire_after_seconds,
        token_limits=dict(args.token_limit),
        request_limits=dict(args.request_limit),
        faults=faults,
        webhook_url=args.webhook_url,
        webhook_secret=args.webhook_secret,
        providers=frozenset(args.provider) if args.provider else None,
        azure_deployments=frozenset(args.azure_deployment) if args.azure_deployment else None,
    )

    def ready(host: str, port: int) -> None:
        print(f"batchd emulator on http://{host}:{port}/v1", file=sys.stderr)
        for name, prefix in PREFIXES.items():
            if not args.provider or name in args.provider:
                print(f"batchd emulator: {name:9} http://{host}:{port}{prefix}", file=sys.stderr)
        sys.stderr.flush()

    try:
        await serve(args.host, args.port, cfg, ready)
    except OSError as e:
        raise Fail(f"--port {args.port}: {(e.strerror or str(e)).lower()}", EXIT_USAGE) from None
    return EXIT_OK


async def demo(args: argparse.Namespace) -> int:
    """Run emulator + daemon on a temporary spool and show one file flowing through."""
    from batchd.demo import run_demo

    return await run_demo(Path(args.dir) if args.dir else None)
