"""Command line: argument parsing and sub-commands only; the work lives elsewhere.

Exit codes: 0 success; 1 a checked thing failed (invalid file, job failed, check
failed); 2 usage or configuration error; 3 not found / ambiguous job reference.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import shutil
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from batchd import __version__, jsonl, logs
from batchd.config import Config, ConfigError, load, parse_since
from batchd.spool import Spool, SpoolLocked, check_name, enter_inbox
from batchd.states import TERMINAL_JOB_STATES, JobState
from batchd.store import Job, Store

# The emulator's APIs (batchd.emulator.providers.PROVIDERS; kept here so that parsing arguments
# does not import the emulator).
PROVIDER_NAMES = ("openai", "azure", "groq", "together", "anthropic", "gemini", "mistral")

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_NOT_FOUND = 0, 1, 2, 3


def _ts(t: float | None) -> str:
    if t is None:
        return "-"
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _print_json(obj: Any) -> None:
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode() + "\n")


# --- run ------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    """Run the daemon in the foreground."""
    from batchd.daemon import Daemon

    cfg = _config(args)
    logs.setup(cfg.log.level, cfg.log.format)
    try:
        return asyncio.run(Daemon(cfg, once=args.once).run())
    except SpoolLocked as e:
        print(f"batchd: {e}", file=sys.stderr)
        return EXIT_USAGE


# --- validate -------------------------------------------------------------------------


def cmd_validate(args: argparse.Namespace) -> int:
    """Validate files locally with the same rules the daemon applies."""
    bad = 0
    for name in args.files:
        try:
            summary = jsonl.validate_path(name)
        except OSError as e:
            print(f"{name}:0: unreadable: {e.strerror or e}")
            bad += 1
            continue
        for p in summary.problems:
            print(jsonl.format_problem(name, p))
        if summary.ok:
            print(
                f"{name}: ok ({summary.requests} requests, {summary.endpoint}, {summary.model})",
                file=sys.stderr,
            )
        else:
            bad += 1
    return EXIT_FAIL if bad else EXIT_OK


# --- jobs / show ----------------------------------------------------------------------


async def _with_store(cfg: Config) -> Store:
    if not cfg.state.database.exists():
        raise ConfigError(f"[state] database: {cfg.state.database} does not exist yet")
    return await Store.open(cfg.state.database)


def cmd_jobs(args: argparse.Namespace) -> int:
    """List jobs."""
    cfg = _config(args)

    states = [JobState(s) for s in args.state] if args.state else None
    since = _parse_since(args.since) if args.since else None

    async def go() -> list[Job]:
        store = await _with_store(cfg)
        try:
            return await store.jobs(states, since)
        finally:
            await store.close()

    jobs = asyncio.run(go())
    if args.json:
        _print_json([j.to_dict() for j in jobs])
        return EXIT_OK
    print(f"{'ID':26}  {'NAME':24}  {'STATE':10}  {'REQS':>6}  {'OK':>6}  {'FAIL':>5}  CREATED")
    for j in jobs:
        print(
            f"{j.id:26}  {j.name[:24]:24}  {j.state.value:10}  {j.requests or 0:>6}  "
            f"{j.completed:>6}  {j.failed:>5}  {_ts(j.created_at)}"
        )
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    """Show one job with its batches and history."""
    cfg = _config(args)

    async def go() -> tuple[list[Job], dict[str, Any]]:
        store = await _with_store(cfg)
        try:
            found = await store.find_jobs(args.job)
            if len(found) != 1:
                return found, {}
            j = found[0]
            return found, {
                "job": j.to_dict(),
                "attempts": [a.to_dict() for a in await store.attempts(j.id)],
                "events": [e.to_dict() for e in await store.events(j.id)],
            }
        finally:
            await store.close()

    found, info = asyncio.run(go())
    if not found:
        print(f"batchd: no job matches {args.job!r}", file=sys.stderr)
        return EXIT_NOT_FOUND
    if len(found) > 1:
        print(f"batchd: {args.job!r} matches {len(found)} jobs:", file=sys.stderr)
        for j in found:
            print(f"  {j.id}  {j.name}  {j.state.value}", file=sys.stderr)
        return EXIT_NOT_FOUND
    if args.json:
        _print_json(info)
        return EXIT_OK
    j = found[0]
    where = cfg.spool.dir / j.result_dir if j.result_dir else None
    print(f"job        {j.id}\nname       {j.name}\nstate      {j.state.value}")
    print(f"endpoint   {j.endpoint or '-'}   model {j.model or '-'}")
    print(f"requests   {j.requests or 0}  completed {j.completed}  failed {j.failed}")
    if j.usage:
        print(f"usage      {orjson.dumps(j.usage).decode()}")
    if where:
        print(f"results    {where}")
    if j.reason:
        print(f"reason     {j.reason.get('reason')}: {j.reason.get('message', '')}")
    print("batches:")
    for a in info["attempts"]:
        print(f"  {a['batch_id'] or '(not created)'}  {a['status'] or '-'}  attempt {a['id']}")
    print("events:")
    for e in info["events"]:
        st = f"{e['old_state'] or ''}->{e['new_state']}" if e["new_state"] else ""
        detail = orjson.dumps(e["detail"]).decode() if e["detail"] else ""
        print(f"  {_ts(e['at'])}  {e['kind']:14} {st:24} {detail}")
    return EXIT_OK


# --- cancel / retry -------------------------------------------------------------------


def _one_job(store_jobs: list[Job], ref: str) -> Job | None:
    if len(store_jobs) == 1:
        return store_jobs[0]
    if not store_jobs:
        print(f"batchd: no job matches {ref!r}", file=sys.stderr)
    else:
        print(f"batchd: {ref!r} matches {len(store_jobs)} jobs:", file=sys.stderr)
        for j in store_jobs:
            print(f"  {j.id}  {j.name}  {j.state.value}", file=sys.stderr)
    return None


_UNSUBMITTED = frozenset({JobState.QUEUED, JobState.VALIDATING})


async def _drive_cancel(cfg: Config, store: Store, job_id: str, deadline: float) -> Job:
    """With no daemon running (the caller holds the spool lock): carry out this job's
    cancellation, and nothing else of the spool's work, until it ends or `deadline`.

    Each round does for this one job what the collect stage does: cancel its remote
    batches (attempts not yet created are dropped), refresh its batches, settle the
    ended ones, publish a decided failure, and publish the job (`cancelled`, with
    the partial results) once it is collecting. The inbox is not touched and no
    other job is submitted, tracked or collected.
    """
    from batchd.api import ApiError, AuthError, BatchApi, InvalidRequest
    from batchd.metrics import Metrics
    from batchd.stages import Context, collect, sync_job, track

    live = (JobState.SUBMITTING, JobState.TRACKING)
    loop = asyncio.get_running_loop()
    metrics = Metrics()
    async with BatchApi(cfg.api, cfg.api.api_key(), metrics) as api:
        ctx = Context(cfg, store, Spool(cfg.spool.dir), api, metrics, logs.get("batchd"))
        while True:
            job = await store.job(job_id)
            if job.state in TERMINAL_JOB_STATES or job.state in _UNSUBMITTED:
                return job
            try:
                # Acts on every cancel-requested job, i.e. only on cancels already asked.
                await collect.cancel_requested(ctx)
                mine = {a.batch_id for a in await store.attempts(job_id) if a.batch_id and a.open}
                if mine:
                    await track.sweep(ctx, only=mine)
                for att in await store.ended_attempts():
                    if att.job_id != job_id:
                        continue
                    try:
                        await collect.settle(ctx, att)
                    except AuthError:
                        raise
                    except InvalidRequest as e:  # as collect.run: the results are gone
                        report = {"reason": "download_failed", **e.to_dict()}
                        await collect.fail_job(ctx, await store.job(job_id), report)
                job = await store.job(job_id)
                if job.reason is not None and job.state not in TERMINAL_JOB_STATES:
                    await collect.fail_job(ctx, job, job.reason)
                elif job.state in live:
                    await sync_job(ctx, job_id)
                job = await store.job(job_id)
                if job.state == JobState.COLLECTING and job.reason is None:
                    await collect.finish(ctx, job)
            except (ApiError, OSError) as e:
                ctx.log.warning("cancel_retry", job_id=job_id, error=str(e))
            job = await store.job(job_id)
            left = deadline - loop.time()
            if job.state in TERMINAL_JOB_STATES or left <= 0:
                return job
            await asyncio.sleep(min(track.interval(ctx, "cancelling"), left))


async def _await_end(store: Store, job_id: str, deadline: float) -> Job:
    """A running daemon carries out the cancellation: watch the store until it ends."""
    loop = asyncio.get_running_loop()
    while True:
        job = await store.job(job_id)
        if job.state in TERMINAL_JOB_STATES or loop.time() >= deadline:
            return job
        await asyncio.sleep(0.2)


def cmd_cancel(args: argparse.Namespace) -> int:
    """Cancel a job's batches, wait for `cancelled`, collect partial results.

    A running daemon is only asked (the flag in the database). With none running, this
    command takes the spool lock (so no daemon starts meanwhile) and carries out just
    this job's cancellation itself; the inbox and other jobs are left alone.
    """
    cfg = _config(args)
    logs.setup(cfg.log.level, "console")

    async def go() -> int:
        store = await _with_store(cfg)
        try:
            job = _one_job(await store.find_jobs(args.job), args.job)
            if job is None:
                return EXIT_NOT_FOUND
            if not await store.request_cancel(job.id):
                print(f"batchd: job {job.id} already ended ({job.state.value})", file=sys.stderr)
                return EXIT_FAIL
            print(f"cancelling {job.id} ({job.name})")
            deadline = asyncio.get_running_loop().time() + args.wait
            spool = Spool(cfg.spool.dir)
            try:
                spool.ensure()
                spool.lock()
            except SpoolLocked:
                job = await _await_end(store, job.id, deadline)
            except OSError as e:
                print(f"batchd: [spool] dir: {cfg.spool.dir}: {e.strerror or e}", file=sys.stderr)
                return EXIT_FAIL
            else:
                try:
                    if cfg.api.api_key() is None:
                        print(
                            f"batchd: no API key (${cfg.api.api_key_env}, [api] api_key_file or"
                            " $CREDENTIALS_DIRECTORY/openai_api_key) and no daemon running;"
                            " the cancellation is recorded for the daemon",
                            file=sys.stderr,
                        )
                        return EXIT_USAGE
                    job = await _drive_cancel(cfg, store, job.id, deadline)
                finally:
                    spool.unlock()
            if job.state in TERMINAL_JOB_STATES:
                where = cfg.spool.dir / job.result_dir if job.result_dir else "-"
                print(
                    f"{job.state.value}: {job.completed} completed, {job.failed} failed;"
                    f" results in {where}"
                )
                return EXIT_OK
            if job.state in _UNSUBMITTED:
                print(
                    f"batchd: job {job.id} is {job.state.value} (no batch yet) and no daemon"
                    " runs; the cancellation is recorded for the daemon to carry out",
                    file=sys.stderr,
                )
                return EXIT_FAIL
            print(f"batchd: still {job.state.value} after {args.wait}s", file=sys.stderr)
            return EXIT_FAIL
        finally:
            await store.close()

    return asyncio.run(go())


def cmd_retry(args: argparse.Namespace) -> int:
    """Resubmit a failed or cancelled job's unfinished requests as a new job."""
    from batchd import pieces

    cfg = _config(args)

    async def go() -> int:
        store = await _with_store(cfg)
        try:
            job = _one_job(await store.find_jobs(args.job), args.job)
        finally:
            await store.close()
        if job is None:
            return EXIT_NOT_FOUND
        if job.state.value not in ("failed", "cancelled") or not job.result_dir:
            print(
                f"batchd: job {job.id} is {job.state.value}; only failed or cancelled jobs"
                " can be retried",
                file=sys.stderr,
            )
            return EXIT_FAIL
        result = cfg.spool.dir / job.result_dir
        done_ids: set[str] = set()
        if (result / "output.jsonl").exists():
            done_ids = pieces.read_outcome(result / "output.jsonl", None).succeeded
        todo = set(pieces.custom_ids(result / "input.jsonl")) - done_ids
        if not todo:
            print(f"batchd: every request of {job.id} already succeeded", file=sys.stderr)
            return EXIT_FAIL
        spool = Spool(cfg.spool.dir)
        spool.ensure()
        tmp = spool.inbox / f".retry-{job.id}.jsonl.part"
        sub = pieces.write_subset(result / "input.jsonl", todo, tmp)
        fname = enter_inbox(spool.inbox, tmp, f"{job.name}-retry")
        print(f"resubmitted {sub.requests} unfinished request(s) of {job.id} as inbox/{fname}")
        return EXIT_OK

    return asyncio.run(go())


def _submit_names(args: argparse.Namespace) -> list[str] | None:
    """The job NAME of each FILE (`--name`, else the file name without `.jsonl`), all
    checked before anything is copied: a NAME intake would ignore (`.hidden`) or that
    is not `[A-Za-z0-9._-]{1,100}` is refused, never renamed. None after the message."""
    if args.name is not None:
        try:
            return [check_name(args.name)]
        except ValueError as e:
            print(f"batchd: --name: {e}", file=sys.stderr)
            return None
    names = []
    for name in args.files:
        try:
            names.append(check_name(Path(name).name))
        except ValueError as e:
            print(f"batchd: {name}: file name is not a job NAME: {e}; pass --name", file=sys.stderr)
            return None
    return names


def cmd_submit(args: argparse.Namespace) -> int:
    """Copy files into the inbox atomically (temp name, fsync, rename)."""
    cfg = _config(args)
    if args.name is not None and len(args.files) > 1:
        print("batchd: --name needs exactly one FILE", file=sys.stderr)
        return EXIT_USAGE
    stems = _submit_names(args)
    if stems is None:
        return EXIT_USAGE
    spool = Spool(cfg.spool.dir)
    try:
        spool.ensure()
    except OSError as e:
        print(f"batchd: [spool] dir: {cfg.spool.dir}: {e.strerror or e}", file=sys.stderr)
        return EXIT_FAIL
    bad = 0
    for name, stem in zip(args.files, stems, strict=True):
        src = Path(name)
        if not args.no_validate:
            try:
                summary = jsonl.validate_path(src)
            except OSError as e:
                print(f"{name}:0: unreadable: {e.strerror or e}")
                bad += 1
                continue
            if not summary.ok:
                for p in summary.problems:
                    print(jsonl.format_problem(name, p))
                bad += 1
                continue
        tmp = spool.inbox / f".submit-{os.getpid()}-{stem}.jsonl.part"
        try:
            with src.open("rb") as fin, tmp.open("wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
                fout.flush()
                os.fsync(fout.fileno())
            fname = enter_inbox(spool.inbox, tmp, stem)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            print(f"batchd: {name}: {e.strerror or e}", file=sys.stderr)
            bad += 1
            continue
        print(f"{name} -> {spool.inbox / fname}")
    return EXIT_FAIL if bad else EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    """Check config, spool, database and API reachability; one line per check."""
    results: list[tuple[bool, str, str]] = []
    try:
        cfg = _config(args)
    except ConfigError as e:
        print(f"FAIL  config    {e}")
        return EXIT_FAIL
    results.append((True, "config", str(cfg.source or "")))
    try:
        Spool(cfg.spool.dir).ensure()
        probe = cfg.spool.dir / "inbox" / f".check-{os.getpid()}.tmp"
        probe.write_bytes(b"")
        probe.unlink()
        results.append((True, "spool", f"{cfg.spool.dir} writable"))
    except OSError as e:
        results.append((False, "spool", f"{cfg.spool.dir}: {e.strerror or e}"))

    async def db_and_api() -> list[tuple[bool, str, str]]:
        out: list[tuple[bool, str, str]] = []
        try:
            store = await Store.open(cfg.state.database)
            try:
                n = sum((await store.count_by_state()).values())
            finally:
                await store.close()
            out.append((True, "database", f"{cfg.state.database} ({n} jobs)"))
        except Exception as e:  # any failure is the answer to this check
            out.append((False, "database", f"{cfg.state.database}: {e}"))
        key = None
        try:
            key = cfg.api.api_key()
        except OSError as e:
            out.append((False, "api key", f"[api] api_key_file: {e.strerror or e}"))
        if key is None:
            out.append(
                (
                    False,
                    "api key",
                    f"not set (${cfg.api.api_key_env}, [api] api_key_file"
                    " or $CREDENTIALS_DIRECTORY/openai_api_key)",
                )
            )
            return out
        out.append((True, "api key", f"found ({len(key)} characters)"))
        from batchd.api import ApiError, BatchApi
        from batchd.metrics import Metrics

        api_cfg = dataclasses.replace(cfg.api, max_retries=1)
        try:
            async with BatchApi(api_cfg, key, Metrics()) as api:
                page = await api.list_batches(1)
            out.append(
                (
                    True,
                    "api",
                    f"{cfg.api.base_url} reachable, key accepted "
                    f"({len(page.get('data') or [])} batch listed)",
                )
            )
        except ApiError as e:
            out.append((False, "api", f"{cfg.api.base_url}: HTTP {e.status}: {e.message}"))
        return out

    results += asyncio.run(db_and_api())
    for ok, what, detail in results:
        print(f"{'ok  ' if ok else 'FAIL'}  {what:9} {detail}")
    return EXIT_OK if all(ok for ok, _, _ in results) else EXIT_FAIL


# --- emulator / demo ------------------------------------------------------------------


def cmd_emulator(args: argparse.Namespace) -> int:
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
            print("batchd: --webhook-secret must be whsec_<base64>", file=sys.stderr)
            return EXIT_USAGE
    faults = FaultConfig(
        seed=args.fault_seed,
        rate_limit=args.fault_rate_limit,
        server_error=args.fault_server_error,
        drop_connection=args.fault_drop,
        slow=args.fault_slow,
        slow_seconds=args.fault_slow_seconds,
        ghost_create=args.fault_ghost_create,
        truncated_download=args.fault_truncate,
    )
    cfg = EmulatorConfig(
        time_scale=args.time_scale,
        seed=args.seed,
        api_key=args.api_key,
        bandwidth_bytes_per_s=args.bandwidth_bytes_per_s,
        output_pad_bytes=args.output_pad_bytes,
        expire_after_seconds=args.expire_after_seconds,
        token_limits=dict(args.token_limit),
        faults=faults,
        webhook_url=args.webhook_url,
        webhook_secret=args.webhook_secret,
        providers=frozenset(args.provider) if args.provider else None,
        azure_deployments=frozenset(args.azure_deployment) if args.azure_deployment else None,
    )
    for name, prefix in PREFIXES.items():
        if not args.provider or name in args.provider:
            url = f"http://{args.host}:{args.port}{prefix}"
            print(f"batchd emulator: {name:9} {url}", file=sys.stderr)
    try:
        asyncio.run(serve(args.host, args.port, cfg))
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    """Run emulator + daemon on a temporary spool and show one file flowing through."""
    from batchd.demo import run_demo

    return asyncio.run(run_demo(Path(args.dir) if args.dir else None))


# --- plumbing -------------------------------------------------------------------------


def _config(args: argparse.Namespace) -> Config:
    return load(args.config)


def _parse_since(text: str) -> float:
    try:
        return parse_since(text)
    except ValueError as e:
        raise ConfigError(f"--since: {e}") from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every sub-command."""
    p = argparse.ArgumentParser(prog="batchd", description=__doc__.split("\n")[0])
    p.add_argument("--version", action="version", version=f"batchd {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--config", "-c", help="TOML config file (default: $BATCHD_CONFIG)")
        return sp

    r = with_config(sub.add_parser("run", help="run the daemon in the foreground"))
    r.add_argument("--once", action="store_true", help="process everything, then exit")
    r.set_defaults(func=cmd_run)

    sm = with_config(sub.add_parser("submit", help="copy files into the inbox atomically"))
    sm.add_argument("files", nargs="+", metavar="FILE")
    sm.add_argument("--name", help="job NAME (one FILE only; default: the file name)")
    sm.add_argument(
        "--no-validate",
        action="store_true",
        help="skip the local check (the daemon validates anyway)",
    )
    sm.set_defaults(func=cmd_submit)

    ck = with_config(sub.add_parser("check", help="check config, spool, database, API"))
    ck.set_defaults(func=cmd_check)

    v = sub.add_parser("validate", help="check JSONL files with the daemon's rules")
    v.add_argument("files", nargs="+", metavar="FILE")
    v.set_defaults(func=cmd_validate)

    j = with_config(sub.add_parser("jobs", help="list jobs"))
    j.add_argument("--json", action="store_true")
    j.add_argument(
        "--state",
        action="append",
        choices=[s.value for s in JobState],
        help="only jobs in this state (repeatable)",
    )
    j.add_argument("--since", help="only jobs claimed since: 2h, 30m, 7d, or ISO-8601 time")
    j.set_defaults(func=cmd_jobs)

    s = with_config(sub.add_parser("show", help="show one job"))
    s.add_argument("job", metavar="JOB", help="job id, unique id prefix, or NAME")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_show)

    c = with_config(sub.add_parser("cancel", help="cancel a job; collect partial results"))
    c.add_argument("job", metavar="JOB", help="job id, unique id prefix, or NAME")
    c.add_argument("--wait", type=float, default=900.0, help="seconds to wait (default 900)")
    c.set_defaults(func=cmd_cancel)

    rt = with_config(sub.add_parser("retry", help="resubmit a failed/cancelled job's rest"))
    rt.add_argument("job", metavar="JOB", help="job id, unique id prefix, or NAME")
    rt.set_defaults(func=cmd_retry)

    e = sub.add_parser("emulator", help="serve the built-in Batch API emulator")
    e.add_argument("--host", default="127.0.0.1")
    e.add_argument("--port", type=int, default=8787)
    e.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="multiply simulated durations (0.01 = 100x faster)",
    )
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--api-key", help="accept only this bearer token (default: any)")

    def probability(v: str) -> float:
        p = float(v)
        if not 0.0 <= p <= 1.0:
            raise argparse.ArgumentTypeError(f"{v} is not a probability in [0, 1]")
        return p

    def token_limit(v: str) -> tuple[str, int]:
        model, _, n = v.rpartition("=")
        if not model or not n.isdigit():
            raise argparse.ArgumentTypeError(f"{v!r} is not MODEL=N")
        return model, int(n)

    for flag, what in (
        ("rate-limit", "429 with Retry-After"),
        ("server-error", "500/502/503"),
        ("drop", "a connection closed without response"),
        ("slow", "a response delayed by --fault-slow-seconds"),
        ("ghost-create", "POST /v1/batches creating but losing the response"),
        ("truncate", "a file download cut short"),
    ):
        e.add_argument(
            f"--fault-{flag}", type=probability, default=0.0, metavar="P", help=f"P({what})"
        )
    e.add_argument("--fault-slow-seconds", type=float, default=0.5, metavar="S")
    e.add_argument("--fault-seed", type=int, default=0, metavar="N", help="fault RNG seed")
    e.add_argument("--bandwidth-bytes-per-s", type=float, metavar="B", help="throttle files")
    e.add_argument("--output-pad-bytes", type=int, default=0, metavar="N", help="pad results")
    e.add_argument("--expire-after-seconds", type=float, metavar="S", help="expire batches")
    e.add_argument(
        "--token-limit",
        type=token_limit,
        action="append",
        default=[],
        metavar="MODEL=N",
        help="enqueued-token limit per model (repeatable)",
    )
    e.add_argument(
        "--provider",
        action="append",
        choices=PROVIDER_NAMES,
        metavar="NAME",
        help=f"serve only this API (repeatable; default: all of {', '.join(PROVIDER_NAMES)})",
    )
    e.add_argument(
        "--azure-deployment",
        action="append",
        metavar="NAME",
        help="an Azure batch deployment name (repeatable; default: any name is one)",
    )
    e.add_argument("--webhook-url", help="POST Standard Webhooks batch.* events here")
    e.add_argument("--webhook-secret", metavar="whsec_...", help="sign webhooks with this")
    e.set_defaults(func=cmd_emulator)

    d = sub.add_parser("demo", help="show a file flowing inbox -> done against the emulator")
    d.add_argument("--dir", help="spool/work directory to use (default: a new temp dir)")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `batchd` command."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as e:
        print(f"batchd: config error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
