"""Budgets: may a job be submitted now without any configured spending limit being exceeded?

Pure decisions, no I/O. Limits ([budget] in the config) are per day and per month,
globally, per model and per source (a drop-folder subdirectory, an HTTP-queue token or
tenant: whatever name intake gives the job). `"*"` under models or sources is the limit
of every model or source not named, each on its own.

Periods are calendar days and months in `[budget] timezone` (UTC by default): a day
ends at local midnight, a month at local midnight before the 1st.

Attribution: a job's money counts in the day and month in which it was *admitted*,
which is when the decision was made: while it runs, its high estimate is reserved;
once collected, its actual cost replaces the reservation. So the jobs admitted in a
period can never exceed that period's limits unless their actual cost exceeds their
high estimate (an input estimate that was too low), and a job admitted at 23:59 that
finishes after midnight does not eat into the next day's budget.

A job that does not fit waits: `Wait.until` is when waiting can end by itself (the
rollover of every period that blocks it); it may fit earlier when a running job
finishes below its reservation, or when the budget is raised (SIGHUP), so the caller
decides again on those events too. `until` is None when time alone cannot help (the
job's estimate is above a whole limit, or its price is unknown). A job is admitted or
not as a whole: nothing is ever half-submitted because of a budget.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from enum import StrEnum
from typing import Final
from zoneinfo import ZoneInfo

from batchd.config import BudgetConfig, Limit
from batchd.prices import Unknown, format_usd

__all__ = [
    "TOTAL",
    "Admit",
    "Committed",
    "Decision",
    "JobCost",
    "Period",
    "Spend",
    "Wait",
    "decide",
    "decide_in_order",
    "period_bounds",
]

Scope = tuple[str, str]  # ("total", ""), ("model", NAME) or ("source", NAME)
TOTAL: Final[Scope] = ("total", "")


class Period(StrEnum):
    DAY = "day"
    MONTH = "month"


def period_bounds(period: Period, now: float, tz: str = "UTC") -> tuple[float, float]:
    """(start, end) in unix seconds of the day or month around `now` in time zone `tz`."""
    zone = ZoneInfo(tz)
    local = datetime.fromtimestamp(now, zone)
    if period is Period.DAY:
        start = local.date()
        end = start + timedelta(days=1)
    else:
        start = date(local.year, local.month, 1)
        end = date(local.year + local.month // 12, local.month % 12 + 1, 1)

    def midnight(d: date) -> float:
        return datetime(d.year, d.month, d.day, tzinfo=zone).timestamp()

    return midnight(start), midnight(end)


@dataclass(frozen=True)
class Committed:
    """Money one job holds, in nano-dollars: its actual cost if collected, else its high
    estimate; `at` is when it was admitted (unix seconds)."""

    at: float
    model: str
    source: str
    nanos: int


@dataclass(frozen=True)
class Spend:
    """Money committed in the current day and month, per scope (nano-dollars)."""

    day: Mapping[Scope, int] = field(default_factory=dict)
    month: Mapping[Scope, int] = field(default_factory=dict)

    @classmethod
    def of(cls, committed: Iterable[Committed], now: float, tz: str = "UTC") -> Spend:
        """Sum the jobs admitted in the current day and month (older ones are ignored)."""
        day0, _ = period_bounds(Period.DAY, now, tz)
        month0, _ = period_bounds(Period.MONTH, now, tz)
        day: dict[Scope, int] = defaultdict(int)
        month: dict[Scope, int] = defaultdict(int)
        for c in committed:
            if c.at < month0:
                continue
            for scope in (TOTAL, ("model", c.model), ("source", c.source)):
                month[scope] += c.nanos
                if c.at >= day0:
                    day[scope] += c.nanos
        return cls(dict(day), dict(month))

    def plus(self, model: str, source: str, nanos: int) -> Spend:
        """This spend with one more job admitted now."""
        scopes = (TOTAL, ("model", model), ("source", source))
        day, month = dict(self.day), dict(self.month)
        for s in scopes:
            day[s] = day.get(s, 0) + nanos
            month[s] = month.get(s, 0) + nanos
        return Spend(day, month)

    def get(self, period: Period, scope: Scope) -> int:
        """Money committed in `period` for `scope`."""
        return (self.day if period is Period.DAY else self.month).get(scope, 0)


@dataclass(frozen=True)
class JobCost:
    """What the budget needs to know about a job waiting to be submitted."""

    id: str
    model: str
    source: str
    high: int | Unknown  # the high estimate, nano-dollars


@dataclass(frozen=True)
class Admit:
    """Submit the job now."""


@dataclass(frozen=True)
class Wait:
    """Hold the job; `until` = the rollover that lets it fit (None: time alone cannot)."""

    reason: str
    until: float | None = None


Decision = Admit | Wait


def _limits(budget: BudgetConfig, model: str, source: str) -> list[tuple[Scope, str, Limit]]:
    """The limits that apply to a job: (scope, label for messages, limit)."""
    found: list[tuple[Scope, str, Limit]] = [(TOTAL, "the total", budget.total)]
    for kind, table, name in (("model", budget.models, model), ("source", budget.sources, source)):
        limit = table.get(name, table.get("*"))
        if limit is not None:
            found.append(((kind, name), f"{kind} {name!r}", limit))
    return found


def decide(job: JobCost, spend: Spend, budget: BudgetConfig, now: float) -> Decision:
    """Admit the job if its high estimate fits what is left of every limit that applies."""
    checks: list[tuple[Scope, str, Period, int]] = [
        (scope, label, period, amount)
        for scope, label, limit in _limits(budget, job.model, job.source)
        for period, amount in ((Period.DAY, limit.daily), (Period.MONTH, limit.monthly))
        if amount is not None
    ]
    if not checks:
        return Admit()
    if isinstance(job.high, Unknown):
        if budget.unknown_price == "admit":
            return Admit()
        return Wait(
            f"the cost of model {job.model!r} is unknown ({job.high.reason}) and a budget"
            f' applies: add [prices."{job.model}"] or set [budget] unknown_price = "admit"'
        )
    high = job.high
    blocking: list[str] = []
    ends: list[float] = []
    never = False
    for scope, label, period, amount in checks:
        spent = spend.get(period, scope)
        if spent + high <= amount:
            continue
        left = max(amount - spent, 0)
        per = "daily" if period is Period.DAY else "monthly"
        blocking.append(
            f"up to {format_usd(high)} exceeds the {format_usd(left)} left of {label}'s {per}"
            f" budget of {format_usd(amount)}"
        )
        never = never or high > amount
        ends.append(period_bounds(period, now, budget.timezone)[1])
    if not blocking:
        return Admit()
    return Wait("; ".join(blocking), None if never else max(ends))


def decide_in_order(
    jobs: Sequence[JobCost], spend: Spend, budget: BudgetConfig, now: float
) -> list[tuple[JobCost, Decision]]:
    """Decide for each job in the order given (oldest first), counting those admitted.

    A job that waits does not hold back a later, smaller one that fits.
    """
    out: list[tuple[JobCost, Decision]] = []
    for job in jobs:
        d = decide(job, spend, budget, now)
        if isinstance(d, Admit) and not isinstance(job.high, Unknown):
            spend = spend.plus(job.model, job.source, job.high)
        out.append((job, d))
    return out
