"""How jobs look on a terminal and in JSON (the CLI and the HTTP queue share the JSON)."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from batchd.store import Attempt, Event, Job


def format_usd(nanos: int, places: int) -> str:
    """batchd.prices.format_usd, imported when a cost is shown (`jobs` without --cost
    never loads the price tables' module)."""
    from batchd.prices import format_usd

    return format_usd(nanos, places)


def ts(t: float | None) -> str:
    """A unix time as `YYYY-MM-DD HH:MM:SS` (UTC)."""
    if t is None:
        return "-"
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S")


def iso(t: float | None) -> str | None:
    """A unix time as ISO-8601 UTC (None stays None)."""
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def print_json(obj: Any) -> None:
    """Pretty JSON on stdout."""
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode() + "\n")


def held_line(held: dict[str, Any] | None) -> str | None:
    """One line saying that (and why) jobs wait for the operator."""
    if not held:
        return None
    provider = held.get("provider")
    who = f"provider {provider}'s API" if provider and provider != "openai" else "the API"
    where = f"[providers.{provider}]" if provider and provider != "openai" else "[api]"
    return (
        f"HELD since {ts(held.get('since'))} UTC: {who} refuses access "
        f"({held.get('reason')}: {held.get('message')}); jobs wait. Fix the key or "
        f"{where} base_url (SIGHUP re-reads the key); batchd carries on by itself."
    )


def held_for(job: Job, holds: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The hold that keeps this job waiting, if its provider is held."""
    return holds.get(job.provider or "openai")


def waits_for_budget(job: Job) -> bool:
    """Validated, not admitted by its budget yet, and told why."""
    return job.admitted_at is None and job.budget_wait is not None and not job.ended


def state_text(job: Job, held: dict[str, Any] | None, why: bool = False) -> str:
    """A job's state, `(held)` while the API refuses access and it has not ended,
    `(waiting for budget)` while a budget holds it back (`why`: with the reason)."""
    if held and not job.ended:
        return f"{job.state} (held)"
    if waits_for_budget(job):
        return f"{job.state} (waiting for budget" + (f": {job.budget_wait})" if why else ")")
    return str(job.state)


def usd(nanos: int | None, unknown: str | None = None) -> str:
    """nano-dollars as USD for a table ("-" when absent; "+?" when part is unknown)."""
    if nanos is None:
        return "unknown" if unknown else "-"
    return format_usd(nanos, 4) + ("+?" if unknown else "")


def estimate_range(est: dict[str, Any] | None) -> str:
    """`$0.0100-$0.0300` of a job's estimate, "unknown" without a price, "-" without one."""
    if not est:
        return "-"
    low, high = est.get("cost_low_nanousd"), est.get("cost_high_nanousd")
    if not isinstance(low, int) or not isinstance(high, int):
        return "unknown"
    return f"{format_usd(low, 4)}-{format_usd(high, 4)}"


def jobs_table(jobs: list[Job], holds: dict[str, dict[str, Any]], cost: bool = False) -> str:
    """The `batchd jobs` table: full names, counts, claim time in UTC; with `cost`, the
    estimate (low-high) and the actual cost of each job."""
    name_w = max([4, *(len(j.name) for j in jobs)])
    state_w = max([5, *(len(state_text(j, held_for(j, holds))) for j in jobs)])
    est_w = max([8, *(len(estimate_range(j.estimate)) for j in jobs)]) if cost else 0
    cost_w = max([4, *(len(usd(j.cost_nanos, j.cost_unknown)) for j in jobs)]) if cost else 0
    head = (
        f"{'ID':26}  {'NAME':{name_w}}  {'STATE':{state_w}}  {'REQS':>7}  {'OK':>7}  {'FAIL':>6}  "
    )
    if cost:
        head += f"{'ESTIMATE':>{est_w}}  {'COST':>{cost_w}}  "
    lines = [head + "CREATED (UTC)"]
    for j in jobs:
        row = (
            f"{j.id:26}  {j.name:{name_w}}  {state_text(j, held_for(j, holds)):{state_w}}  "
            f"{j.requests or 0:>7}  {j.completed:>7}  {j.failed:>6}  "
        )
        if cost:
            row += f"{estimate_range(j.estimate):>{est_w}}  "
            row += f"{usd(j.cost_nanos, j.cost_unknown):>{cost_w}}  "
        lines.append(row + ts(j.created_at))
    return "\n".join(lines)


def estimate_text(est: dict[str, Any]) -> str:
    """The estimate line of `batchd show`."""
    unknown = est.get("cost_unknown_reason")
    money = f"unknown ({unknown})" if unknown else estimate_range(est).replace("-$", " to $")
    text = (
        f"{money}   ({est.get('requests', 0):,} requests, ~{est.get('input_tokens', 0):,} input "
        f"tokens ({est.get('method')}), {est.get('output_tokens_low', 0):,} to "
        f"{est.get('output_tokens_high', 0):,} output tokens)"
    )
    if est.get("unbounded_requests"):
        text += f"; {est['unbounded_requests']:,} set no max tokens"
    return text


def cost_text(cost: dict[str, Any], ended: bool) -> str:
    """The actual cost line of `batchd show`: what the collected results billed."""
    money = format_usd(cost["cost_nanos"], 6)
    if cost["cost_unknown"]:
        money += f" + unknown ({cost['cost_unknown']})"
    so_far = "" if ended else ", so far"
    return (
        f"{money}   ({cost['requests']:,} requests billed{so_far}: "
        f"{cost['input_tokens']:,} input tokens ({cost['cached_tokens']:,} cached), "
        f"{cost['output_tokens']:,} output ({cost['reasoning_tokens']:,} reasoning))"
    )


def error_text(err: dict[str, Any] | None) -> str | None:
    """A first error as `custom_id: HTTP 400 code: message` or `code: message (line N)`."""
    if not err:
        return None
    parts = []
    if err.get("custom_id"):
        parts.append(f"{err['custom_id']}:")
    if err.get("status_code"):
        parts.append(f"HTTP {err['status_code']}")
    if err.get("code"):
        parts.append(f"{err['code']}:")
    parts.append(str(err.get("message") or ""))
    text = " ".join(parts).strip()
    return f"{text} (line {err['line']})" if err.get("line") else text


def first_error(job: Job, events: list[Event]) -> dict[str, Any] | None:
    """The first error of a job: of a failed batch, or the first failed request."""
    if job.reason and isinstance(job.reason.get("first_error"), dict):
        return dict(job.reason["first_error"])
    for e in reversed(events):
        if e.detail and isinstance(e.detail.get("first_error"), dict):
            return dict(e.detail["first_error"])
    return None


def attempt_line(a: Attempt) -> str:
    """One batch of `batchd show`: batchd's status, the provider's own when it differs."""
    counts = f"{a.completed}/{a.total} done, {a.failed} failed" if a.total else ""
    state = a.status or ("abandoned" if a.abandoned else "-")
    if a.raw_status and a.raw_status != a.status:
        state = f"{state} ({a.raw_status})"
    return (
        f"  {a.batch_id or '(not created)'}  {state:11} {counts:24} "
        f"piece {a.piece}  attempt {a.id}" + (f"  -> {a.outcome}" if a.outcome else "")
    ).rstrip()


def show_text(
    job: Job,
    attempts: list[Attempt],
    events: list[Event],
    held: dict[str, Any] | None,
    results: str | None,
    retries: list[Job],
    cost: dict[str, Any] | None = None,
) -> str:
    """`batchd show JOB` as text."""
    out = [f"job        {job.id}"]
    dropped = f"   (dropped as {job.stem})" if job.stem and job.stem != job.name else ""
    out.append(f"name       {job.name}{dropped}")
    out.append(f"state      {state_text(job, held, why=True)}   source {job.source}")
    out.append(f"provider   {job.provider or 'openai'}")
    if held and not job.ended:
        out.append(f"held       {held_line(held)}")
    out.append(f"endpoint   {job.endpoint or '-'}   model {job.model or '-'}")
    running = "   (so far)" if not job.ended else ""
    out.append(
        f"requests   {job.requests or 0}  completed {job.completed}  failed {job.failed}{running}"
    )
    if job.usage:
        out.append(f"usage      {orjson.dumps(job.usage).decode()}")
    if job.estimate:
        out.append(f"estimate   {estimate_text(job.estimate)}")
    if cost is not None and (cost["attempts"] or job.ended):
        out.append(f"cost       {cost_text(cost, job.ended)}")
    if results:
        out.append(f"results    {results}")
    if job.reason:
        out.append(f"reason     {job.reason.get('reason')}: {job.reason.get('message', '')}")
    err = error_text(first_error(job, events))
    if err:
        out.append(f"first err  {err}")
    if job.retry_of:
        out.append(f"retry of   {job.retry_of}")
    for r in retries:
        out.append(f"retried as {r.id} ({r.name}, {r.state})")
    out.append(
        f"claimed    {ts(job.created_at)} UTC"
        + (f"   ended {ts(job.finished_at)} UTC" if job.finished_at else "")
    )
    out.append("batches:")
    out += [attempt_line(a) for a in attempts] or ["  (none yet)"]
    out.append("events (UTC):")
    for e in events:
        st = f"{e.old_state or ''}->{e.new_state}" if e.new_state else ""
        detail = orjson.dumps(e.detail).decode() if e.detail else ""
        out.append(f"  {ts(e.at)}  {e.kind:18} {st:24} {detail}".rstrip())
    return "\n".join(out)
