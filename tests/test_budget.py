"""Budgets are pure decisions: tested without I/O."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import pytest

from batchd import config
from batchd.budget import (
    TOTAL,
    Admit,
    Committed,
    JobCost,
    Period,
    Spend,
    Wait,
    decide,
    decide_in_order,
    period_bounds,
)
from batchd.config import BudgetConfig, ConfigError, Limit
from batchd.prices import Unknown, to_nanos

USD = to_nanos(1)
NOW = datetime(2026, 11, 30, 15, 0, tzinfo=UTC).timestamp()
TOMORROW = datetime(2026, 12, 1, tzinfo=UTC).timestamp()  # also the next month


def ts(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()  # type: ignore[arg-type]


def job(usd: float | Unknown, model: str = "gpt-4o", source: str = "a", i: str = "j") -> JobCost:
    high = usd if isinstance(usd, Unknown) else round(usd * USD)
    return JobCost(i, model, source, high)


def spent(*items: tuple[float, str, str, float]) -> Spend:
    """Spend from (admitted_at, model, source, usd) records."""
    return Spend.of([Committed(at, m, s, round(usd * USD)) for at, m, s, usd in items], NOW)


def test_no_budget_admits_everything() -> None:
    assert decide(job(1e6), Spend(), BudgetConfig(), NOW) == Admit()
    assert decide(job(Unknown("?")), Spend(), BudgetConfig(), NOW) == Admit()
    assert not BudgetConfig().enabled
    assert BudgetConfig(models={"x": Limit(daily=1)}).enabled


def test_daily_total_fits_exactly_then_waits_until_midnight() -> None:
    b = BudgetConfig(total=Limit(daily=10 * USD))
    s = spent((ts(2026, 11, 30, 9), "gpt-4o", "a", 6))
    assert decide(job(4), s, b, NOW) == Admit()
    d = decide(job(4.01), s, b, NOW)
    assert isinstance(d, Wait) and d.until == TOMORROW
    assert "the total's daily budget of $10.00" in d.reason and "$4.00 left" in d.reason


def test_monthly_limit_waits_until_the_month_rolls_over() -> None:
    b = BudgetConfig(total=Limit(daily=100 * USD, monthly=500 * USD))
    now = ts(2026, 12, 15, 12)
    s = Spend.of([Committed(ts(2026, 12, 2), "gpt-4o", "a", 495 * USD)], now)
    d = decide(job(10), s, b, now)
    assert isinstance(d, Wait) and d.until == ts(2027, 1, 1)
    assert "monthly" in d.reason and "daily" not in d.reason


def test_a_job_above_a_whole_limit_cannot_fit_by_waiting() -> None:
    b = BudgetConfig(total=Limit(daily=10 * USD))
    d = decide(job(11), Spend(), b, NOW)
    assert isinstance(d, Wait) and d.until is None


def test_per_model_and_star() -> None:
    b = BudgetConfig(models={"gpt-4o": Limit(daily=5 * USD), "*": Limit(daily=2 * USD)})
    s = spent((NOW - 60, "gpt-4o", "a", 4), (NOW - 60, "o3", "a", 1.5))
    assert isinstance(decide(job(2, "gpt-4o"), s, b, NOW), Wait)
    assert decide(job(1, "gpt-4o"), s, b, NOW) == Admit()
    assert isinstance(decide(job(1, "o3"), s, b, NOW), Wait)  # "*": o3 has $0.50 left
    assert decide(job(1.9, "gpt-4.1"), s, b, NOW) == Admit()  # "*" is per model


def test_per_source_limits_are_separate() -> None:
    b = BudgetConfig(sources={"*": Limit(monthly=3 * USD), "big": Limit(monthly=100 * USD)})
    s = spent((NOW - 60, "gpt-4o", "team-a", 3), (NOW - 60, "gpt-4o", "big", 50))
    wait = decide(job(0.01, source="team-a"), s, b, NOW)
    assert isinstance(wait, Wait) and "source 'team-a'" in wait.reason
    assert wait.until == TOMORROW  # the month ends with this day
    assert decide(job(3, source="team-b"), s, b, NOW) == Admit()
    assert decide(job(50, source="big"), s, b, NOW) == Admit()


def test_every_blocking_limit_is_named_and_the_latest_rollover_counts() -> None:
    b = BudgetConfig(
        total=Limit(daily=10 * USD, monthly=10 * USD), models={"gpt-4o": Limit(daily=1 * USD)}
    )
    now = ts(2026, 11, 10, 12)
    d = decide(job(5), Spend.of([Committed(now - 1, "gpt-4o", "a", 8 * USD)], now), b, now)
    assert isinstance(d, Wait)
    assert d.reason.count("exceeds") == 3
    assert d.until is None  # $5 is above model gpt-4o's whole daily budget of $1
    d = decide(job(0.5), Spend.of([Committed(now - 1, "o3", "a", 9.9 * USD)], now), b, now)
    assert isinstance(d, Wait) and d.until == ts(2026, 12, 1)  # the month, not the day


def test_unknown_price_waits_or_is_admitted_as_configured() -> None:
    b = BudgetConfig(total=Limit(monthly=USD))
    d = decide(job(Unknown("no price for 'x'")), Spend(), b, NOW)
    assert isinstance(d, Wait) and d.until is None
    assert '[prices."gpt-4o"]' in d.reason and "no price for 'x'" in d.reason
    admit = BudgetConfig(total=Limit(monthly=USD), unknown_price="admit")
    assert decide(job(Unknown("?")), Spend(), admit, NOW) == Admit()
    # A limit of another model does not apply: no budget stands in the way.
    other = BudgetConfig(models={"o3": Limit(daily=USD)})
    assert decide(job(Unknown("?")), Spend(), other, NOW) == Admit()


def test_jobs_in_order_count_what_was_admitted_before_them() -> None:
    b = BudgetConfig(total=Limit(daily=10 * USD))
    jobs = [job(6, i="a"), job(6, i="big"), job(3, i="c"), job(2, i="d")]
    got = [(j.id, type(d).__name__) for j, d in decide_in_order(jobs, Spend(), b, NOW)]
    # "big" waits; smaller later jobs that fit still go; never half of a job.
    assert got == [("a", "Admit"), ("big", "Wait"), ("c", "Admit"), ("d", "Wait")]


def test_spend_is_attributed_to_the_period_a_job_was_admitted_in() -> None:
    records = [
        Committed(ts(2026, 10, 31, 23, 59), "gpt-4o", "a", 100 * USD),  # last month
        Committed(ts(2026, 11, 29, 23, 59), "gpt-4o", "a", 10 * USD),  # yesterday
        Committed(ts(2026, 11, 30, 0, 0), "o3", "b", 1 * USD),  # today
    ]
    s = Spend.of(records, NOW)
    assert s.get(Period.DAY, TOTAL) == 1 * USD
    assert s.get(Period.MONTH, TOTAL) == 11 * USD
    assert s.get(Period.MONTH, ("model", "gpt-4o")) == 10 * USD
    assert s.get(Period.DAY, ("source", "b")) == 1 * USD
    assert s.plus("o3", "b", USD).get(Period.DAY, ("model", "o3")) == 2 * USD


def test_after_the_rollover_the_waiting_job_is_admitted() -> None:
    b = BudgetConfig(total=Limit(daily=10 * USD))
    records = [Committed(NOW - 3600, "gpt-4o", "a", 9 * USD)]
    d = decide(job(5), Spend.of(records, NOW), b, NOW)
    assert isinstance(d, Wait) and d.until is not None
    assert decide(job(5), Spend.of(records, d.until), b, d.until) == Admit()


def test_raising_the_budget_admits_it() -> None:
    s = spent((NOW - 60, "gpt-4o", "a", 9))
    assert isinstance(decide(job(5), s, BudgetConfig(total=Limit(daily=10 * USD)), NOW), Wait)
    assert decide(job(5), s, BudgetConfig(total=Limit(daily=20 * USD)), NOW) == Admit()


def test_period_bounds_utc() -> None:
    assert period_bounds(Period.DAY, NOW) == (ts(2026, 11, 30), TOMORROW)
    assert period_bounds(Period.MONTH, NOW) == (ts(2026, 11, 1), ts(2026, 12, 1))
    assert period_bounds(Period.MONTH, ts(2026, 12, 31, 23, 59)) == (
        ts(2026, 12, 1),
        ts(2027, 1, 1),
    )


def test_period_bounds_follow_the_configured_time_zone() -> None:
    try:
        zone = ZoneInfo("Europe/Berlin")
    except ZoneInfoNotFoundError:
        pytest.skip("no time zone database on this machine")
    # 2026-03-29 has 23 hours in Berlin (clocks go forward at 02:00).
    start, end = period_bounds(Period.DAY, ts(2026, 3, 29, 12), "Europe/Berlin")
    assert end - start == 23 * 3600
    assert datetime.fromtimestamp(start, zone).hour == 0
    # 23:30 UTC on Nov 30 is already December 1 in Berlin.
    m0, _ = period_bounds(Period.MONTH, ts(2026, 11, 30, 23, 30), "Europe/Berlin")
    assert datetime.fromtimestamp(m0, zone).date().isoformat() == "2026-12-01"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_budget_config(tmp_path: Path) -> None:
    cfg = config.load(
        write(
            tmp_path,
            "[budget]\ndaily_usd = 50.1\nmonthly_usd = 1000\n"
            '[budget.models]\n"gpt-4o" = { daily_usd = 0.1 }\n'
            '[budget.sources]\n"*" = { monthly_usd = 5 }\n',
        ),
        env={},
    )
    b = cfg.budget
    assert b.total == Limit(daily=50_100_000_000, monthly=1000 * USD)
    assert b.models == {"gpt-4o": Limit(daily=100_000_000)}
    assert b.sources == {"*": Limit(monthly=5 * USD)}
    assert (b.timezone, b.unknown_price, b.enabled) == ("UTC", "wait", True)
    assert not config.load(write(tmp_path, ""), env={}).budget.enabled


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[budget]\ndaily_usd = -1\n", r"\[budget\] daily_usd"),
        ("[budget]\nmonthly_usd = 'lots'\n", r"\[budget\] monthly_usd"),
        ("[budget]\ntimezone = 'Mars/Olympus'\n", r"\[budget\] timezone"),
        ("[budget]\nunknown_price = 'free'\n", r"\[budget\] unknown_price"),
        ("[budget]\nweekly_usd = 1\n", r"\[budget\] weekly_usd: unknown key"),
        ('[budget.models]\n"m" = { daily = 1 }\n', r'\[budget.models."m"\] daily: unknown key'),
        ('[budget.sources]\n"s" = 3\n', r'\[budget.sources."s"\]: must be a table'),
        ('[budget.models]\n"m" = { daily_usd = inf }\n', r'\[budget.models."m"\] daily_usd'),
    ],
)
def test_bad_budget_config_names_the_key(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        config.load(write(tmp_path, text), env={})
