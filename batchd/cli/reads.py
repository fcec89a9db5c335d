"""The read-only commands, jobs and show: on a SQLite store they run without an event
loop (batchd.cli._run), so this module imports nothing that needs one (no asyncio)."""

from __future__ import annotations

import argparse
import sys

from batchd.cli import render
from batchd.cli.common import (
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_USAGE,
    Fail,
    NoDatabase,
    config,
    one_job,
    since,
    store,
)
from batchd.states import JobState


async def jobs(args: argparse.Namespace) -> int:
    """List jobs, newest first."""
    cfg = config(args)
    if args.limit < 1:
        raise Fail("--limit: at least 1", EXIT_USAGE)
    states = [JobState(s) for s in args.state] if args.state else None
    t = since(args.since) if args.since else None
    try:
        async with store(cfg, read_only=True) as s:
            found = await s.list_jobs(states, t, args.limit + 1)
            holds = await s.holds()
            oldest = await s.oldest_job_at()
    except NoDatabase as e:
        print(f"batchd: {e}", file=sys.stderr)
        return EXIT_OK
    more = len(found) > args.limit
    found = found[: args.limit]
    if args.json:
        render.print_json([j.to_dict() for j in found])
        return EXIT_OK
    for held in holds.values():
        if line := render.held_line(held):
            print(f"batchd: {line}", file=sys.stderr)
    if not found:
        print("no jobs yet" if oldest is None else "no jobs match", file=sys.stderr)
        return EXIT_OK
    print(render.jobs_table(found, holds, cost=args.cost))
    notes = []
    if more:
        notes.append(f"the newest {args.limit} shown; --limit N for more")
    days = cfg.retention.jobs_days
    if days and oldest is not None:
        notes.append(
            f"jobs that ended over {days:g} days ago are deleted ([retention] jobs_days); "
            f"the oldest kept was claimed {render.ts(oldest)} UTC"
        )
    for n in notes:
        print(f"({n})", file=sys.stderr)
    return EXIT_OK


async def show(args: argparse.Namespace) -> int:
    """Show one job with its batches and history."""
    cfg = config(args)
    try:
        async with store(cfg, read_only=True) as s:
            job = await one_job(s, args.job)
            attempts = await s.attempts(job.id)
            events = await s.events(job.id)
            held = render.held_for(job, await s.holds())
            retries = await s.retries_of(job.id)
            cost = await s.job_cost(job.id)
    except NoDatabase:
        raise Fail(f"no job matches {args.job!r} (no jobs yet)", EXIT_NOT_FOUND) from None
    if args.json:
        render.print_json(
            {
                "job": job.to_dict(),
                "cost": cost,
                "first_error": render.first_error(job, events),
                "held": held if not job.ended else None,
                "attempts": [a.to_dict() for a in attempts],
                "events": [e.to_dict() for e in events],
            }
        )
        return EXIT_OK
    results = str(cfg.spool.dir / job.result_dir) if job.result_dir else None
    print(render.show_text(job, attempts, events, held, results, retries, cost))
    return EXIT_OK
