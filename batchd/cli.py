"""Command line: argument parsing and sub-commands only; the work lives elsewhere.

Exit codes: 0 success; 1 a checked thing failed (invalid file, job failed, check
failed); 2 usage or configuration error; 3 not found / ambiguous job reference.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from batchd import __version__, jsonl, logs
from batchd.config import Config, ConfigError, load
from batchd.spool import SpoolLocked
from batchd.store import Job, Store

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

    async def go() -> list[Job]:
        store = await _with_store(cfg)
        try:
            return await store.jobs()
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


# --- emulator / demo ------------------------------------------------------------------


def cmd_emulator(args: argparse.Namespace) -> int:
    """Serve the built-in Batch API emulator until interrupted."""
    from batchd.emulator import EmulatorConfig, serve

    cfg = EmulatorConfig(time_scale=args.time_scale, seed=args.seed)
    print(f"batchd emulator on http://{args.host}:{args.port}/v1", file=sys.stderr)
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

    v = sub.add_parser("validate", help="check JSONL files with the daemon's rules")
    v.add_argument("files", nargs="+", metavar="FILE")
    v.set_defaults(func=cmd_validate)

    j = with_config(sub.add_parser("jobs", help="list jobs"))
    j.add_argument("--json", action="store_true")
    j.set_defaults(func=cmd_jobs)

    s = with_config(sub.add_parser("show", help="show one job"))
    s.add_argument("job", metavar="JOB", help="job id, unique id prefix, or NAME")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_show)

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
