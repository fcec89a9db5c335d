"""Tracking cost: the real daemon with 10,000 batches in flight.

    python -m bench.tracking [--smoke] [--batches N] [--poll S] [--seconds S]
                             [--status validating|in_progress]

Setup, on an in-process emulator whose batches stay `validating` (or `in_progress`):
the real daemon takes two small files to their batches; then N - 2 more batches
are created in the emulator, and the two jobs' rows are cloned (`bench.rowclone`)
onto them, so the database holds N jobs in flight, each with a batch that exists.
A daemon with `poll_interval_seconds` = 0.5 is started on that database, left to
settle, then watched for S seconds (30; smoke 3), counting what the emulator answers:

- status calls (GET /v1/batches, GET /v1/batches/{id}) per configured interval: on
  average, and the most in any window one interval long;
- per full sweep: the calls between two moments at which every in-flight batch has
  been reported since the previous such moment (whatever the daemon's way of
  sweeping), and the spacing of those moments;
- CPU (% of one core) and RSS of the daemon's process tree.

Baseline: one GET /v1/batches/{id} per in-flight batch per poll (the SDK's retrieve
loop), N calls a poll. Targets: <= N/100 + 1 calls, CPU <= 25 %.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from pathlib import Path

from bench import rowclone
from bench.common import (
    STATUS_ROUTES,
    Call,
    Daemon,
    Http,
    InProcessEmulator,
    Row,
    fmt_ratio,
    mb,
    median,
    parser,
    print_table,
    small_chat,
    watch,
    workdir,
)

TEMPLATES = ("benchtrk0job", "benchtrk1job")


def inflight_db(emu: InProcessEmulator, work: Path, n: int, poll: float) -> Path:
    """A database of n jobs in flight (batches on `emu`): two made by the real daemon,
    the rest cloned from them onto batches created straight in the emulator."""
    with Daemon(work / "tpl", emu.url, batch={"poll_interval_seconds": poll}) as d:
        for k, name in enumerate(TEMPLATES):
            src = work / f"{name}.src"
            src.write_bytes(small_chat(2, tag=str(k)))
            d.drop(src, f"{name}.jsonl")
        created = emu.wait_created(len(TEMPLATES), 60)
        # Stop once the daemon has recorded the ids it got back and a sweep has seen the
        # batches in the status they keep (else every clone would change status at once).
        deadline = time.perf_counter() + 60
        while not any(c.t > created + 0.5 and c.route in STATUS_ROUTES for c in emu.calls):
            if time.perf_counter() > deadline:
                raise TimeoutError("the template daemon never polled its batches")
            time.sleep(0.05)
        time.sleep(0.5)
    db = work / "tpl" / "batchd.db"
    extra = emu.add_batches(n - len(TEMPLATES))
    report = rowclone.clone(
        db, n - len(TEMPLATES), end=time.time(), span=600, fixed={"batch_": extra}
    )
    found = {tok for t in report.templates for tok in t.tokens if tok.startswith("batch_")}
    if len(found) != len(TEMPLATES):
        raise RuntimeError(f"template jobs hold {len(found)} batch ids, not {len(TEMPLATES)}")
    return db


@dataclass
class Sweeps:
    """What the emulator answered during the window."""

    status_calls: int
    per_interval: float  # average status calls per configured interval
    busiest: int  # most status calls in any window one interval long
    full: list[int]  # calls of each complete full sweep
    ends: list[float]  # when each full sweep completed
    list_starts: list[float]  # GET /v1/batches without a cursor (a paged sweep begins)
    other_calls: int


def analyse(calls: list[Call], inflight: set[str], t0: float, t1: float, poll: float) -> Sweeps:
    """Status calls per interval and per full sweep, from the emulator's answers."""
    window = [c for c in calls if t0 <= c.t <= t1]
    status = [c for c in window if c.route in STATUS_ROUTES]
    times = [c.t for c in status]
    busiest, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] <= t - poll:
            lo += 1
        busiest = max(busiest, hi - lo + 1)
    full: list[int] = []
    ends: list[float] = []
    seen: set[str] = set()
    k = 0
    for c in status:
        k += 1
        seen.update(i for i in c.ids if i in inflight)
        if len(seen) == len(inflight):
            full.append(k)
            ends.append(c.t)
            seen, k = set(), 0
    # The window opens mid-sweep: the first "sweep" counted is a partial one.
    return Sweeps(
        len(status),
        len(status) * poll / (t1 - t0),
        busiest,
        full[1:],
        ends,
        [c.t for c in status if c.route == "GET /v1/batches" and not c.after],
        len(window) - len(status),
    )


def _spacing(ts: list[float]) -> str:
    gaps = [b - a for a, b in itertools.pairwise(ts)]
    return f"{median(gaps):.2f} / {min(gaps):.2f}" if gaps else "-"


def main() -> int:
    """Set up, watch the daemon, print the table."""
    p = parser(__doc__)
    p.add_argument("--batches", type=int, help="in-flight batches (default 10000; smoke 300)")
    p.add_argument("--poll", type=float, default=0.5, help="poll_interval_seconds (0.5)")
    p.add_argument("--seconds", type=float, help="window (default 30; smoke 3)")
    p.add_argument("--settle", type=float, help="seconds after ready before it (5; smoke 1)")
    p.add_argument("--status", choices=("validating", "in_progress"), default="validating")
    a = p.parse_args()
    n = a.batches or (300 if a.smoke else 10_000)
    window = a.seconds or (3.0 if a.smoke else 30.0)
    settle = a.settle if a.settle is not None else (1.0 if a.smoke else 5.0)
    stay = {"validating_seconds": 1e9} if a.status == "validating" else {}
    stay |= {"in_progress_seconds": 1e9}
    limit = n // 100 + 1
    with workdir("track") as tmp, InProcessEmulator(record_ids=True, **stay) as emu:
        t = time.perf_counter()
        db = inflight_db(emu, tmp, n, a.poll)
        setup_s = time.perf_counter() - t
        inflight = {b["id"] for b in emu.run(_all_batches(emu))}
        with Daemon(
            tmp / "d",
            emu.url,
            database=db,
            ready_timeout=300,
            batch={"poll_interval_seconds": a.poll},
        ) as d:
            ready_s = d.ready_s
            time.sleep(settle)
            t0 = time.perf_counter()
            ((cpu, rss), (emu_cpu, _)) = watch([d.proc.pid, os.getpid()], window)
            t1 = time.perf_counter()
        sw = analyse(list(emu.calls), inflight, t0, t1, a.poll)
        # Baseline: time a sample of one-by-one GETs (N of them make one poll).
        http = Http(emu.port)
        sample = sorted(inflight)[: min(n, 2000)]
        tb = time.perf_counter()
        for bid in sample:
            http.get(f"/v1/batches/{bid}")
        base_s = (time.perf_counter() - tb) * n / len(sample)
        http.close()
    per_sweep = median([float(x) for x in sw.full]) if sw.full else float("nan")
    rows = [
        Row(
            f"status calls per configured interval ({a.poll:g} s), average",
            f"{sw.per_interval:.0f}",
            str(n),
            fmt_ratio(sw.per_interval, n),
            f"<= {limit}",
            sw.per_interval <= limit,
        ),
        Row(
            "status calls in the busiest window of one interval",
            str(sw.busiest),
            str(n),
            fmt_ratio(sw.busiest, n),
            f"<= {limit}",
            sw.busiest <= limit,
        ),
        Row(
            f"status calls per full sweep (median of {len(sw.full)})",
            f"{per_sweep:.0f}" if sw.full else "no full sweep",
            str(n),
            fmt_ratio(per_sweep, n) if sw.full else "-",
            f"<= {limit}",
            bool(sw.full) and per_sweep <= limit,
        ),
        Row(
            "full sweeps in the window; spacing median / min (s)",
            f"{max(0, len(sw.ends) - 1)}; {_spacing(sw.ends)}",
            f"1 per {a.poll:g} s, {base_s:.1f} s each",
            "-",
            f">= {a.poll:g} s apart",
            None,
        ),
        Row(
            f"daemon CPU over {window:g} s (% of one core)",
            f"{cpu:.1f} %",
            "-",
            "-",
            "<= 25 %",
            cpu <= 25,
        ),
        Row("daemon RSS, max over the window", mb(rss), "-", "-", "-", None),
    ]
    notes = [
        f"{n} jobs in flight, all batches `{a.status}`; poll_interval_seconds = {a.poll:g}; "
        f"window {window:g} s after {settle:g} s settling. Setup (template run + "
        f"{n - 2} batches + cloning) {setup_s:.1f} s; daemon ready {ready_s:.1f} s after start.",
        f"paged sweeps begun (GET /v1/batches without cursor): {len(sw.list_starts)}, "
        f"spacing median / min {_spacing(sw.list_starts)} s; {sw.status_calls} status calls "
        f"and {sw.other_calls} other calls in the window; the emulator (in the bench's "
        f"process) used {emu_cpu:.0f} % of a core.",
        "baseline = one GET /v1/batches/{id} per in-flight batch per poll (the SDK's "
        f"batches.retrieve loop); its wall time from {min(n, 2000)} sequential GETs, scaled",
    ]
    print_table("Tracking cost (bench.tracking)", rows, notes)
    return 0


async def _all_batches(emu: InProcessEmulator) -> list[dict[str, object]]:
    return list(emu.state.batches())


if __name__ == "__main__":
    raise SystemExit(main())
