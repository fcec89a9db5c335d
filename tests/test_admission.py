"""Token admission is a pure decision: tested without I/O."""

from __future__ import annotations

from batchd.admission import Candidate, admit, limit_from_message
from batchd.states import JobState, desired_job_state


def c(i: str, tokens: int, since: float = 0.0, model: str = "m", nb: float = 0.0) -> Candidate:
    return Candidate(i, model, tokens, since, nb)


def test_no_budget_admits_everything_oldest_first() -> None:
    assert admit([c("b", 5, 2), c("a", 9, 1)], {}, {}, now=10) == ["a", "b"]


def test_largest_that_fits_first_never_over_budget() -> None:
    cands = [c("s1", 10), c("big", 60), c("s2", 30), c("huge", 95)]
    assert admit(cands, {"m": 0}, {"m": 100}, now=1) == ["huge"]
    assert admit(cands, {"m": 20}, {"m": 100}, now=1) == ["big", "s1"]


def test_piece_bigger_than_budget_goes_alone() -> None:
    assert admit([c("x", 500)], {"m": 0}, {"m": 100}, now=1) == ["x"]
    assert admit([c("x", 500)], {"m": 1}, {"m": 100}, now=1) == []


def test_starving_piece_reserves_the_budget() -> None:
    cands = [c("old-big", 80, since=0), c("new-small", 10, since=900)]
    # not starving yet: the small one gets in beside what is in flight
    assert admit(cands, {"m": 50}, {"m": 100}, now=100) == ["new-small"]
    # starving: nothing else is admitted until the big one fits
    assert admit(cands, {"m": 50}, {"m": 100}, now=1000) == []
    assert admit(cands, {"m": 0}, {"m": 100}, now=1000) == ["old-big"]


def test_backoff_and_models_are_separate() -> None:
    cands = [c("later", 1, nb=50), c("other", 1, model="o")]
    assert admit(cands, {"m": 0}, {"m": 10, "o": 10}, now=10) == ["other"]


def test_limit_from_message() -> None:
    msg = (
        "Enqueued token limit reached for gpt-4o in organization org-x. Limit: 90,000 "
        "enqueued tokens. Please try again once some in_progress batches have been completed."
    )
    assert limit_from_message(msg) == 90_000
    assert limit_from_message("something else") is None


def test_desired_job_state() -> None:
    s, t = JobState.SUBMITTING, JobState.TRACKING
    assert desired_job_state(s, [False], [(True, "in_progress")], False) == t
    assert desired_job_state(t, [False, False], [(True, "x"), (False, None)], False) == s
    assert desired_job_state(t, [True, True], [], False) == JobState.COLLECTING
    assert desired_job_state(t, [False], [(True, "cancelling")], True) == t
    assert desired_job_state(s, [False], [(False, None)], True) == t  # a create in flight
    assert desired_job_state(s, [False], [], True) == JobState.COLLECTING
    assert desired_job_state(JobState.QUEUED, [], [], True) == JobState.QUEUED
