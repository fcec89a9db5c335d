"""Token admission is a pure decision: tested without I/O."""

from __future__ import annotations

from batchd.admission import Candidate, admit, limit_from_message, request_limit_from_message
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


def r(i: str, requests: int, tokens: int = 1, since: float = 0.0, model: str = "m") -> Candidate:
    return Candidate(i, model, tokens, since, requests=requests)


def test_enqueued_requests_under_the_limit() -> None:
    cands = [r("a", 50_000, since=1), r("b", 50_000, since=2), r("c", 50_000, since=3)]
    # 1,000,000 requests allowed, 920,000 in flight: one more 50k piece fits, not two.
    got = admit(
        cands, {}, {}, now=10, request_limits={"m": 1_000_000}, in_flight_requests={"m": 920_000}
    )
    assert got == ["a"]
    assert admit(cands, {}, {}, 10, request_limits={"m": 1_000_000}) == ["a", "b", "c"]
    full = {"m": 1_000_000}
    assert admit(cands, {}, {}, 10, request_limits=full, in_flight_requests=full) == []


def test_tokens_and_requests_must_both_fit() -> None:
    cands = [r("many-small", 40, tokens=10, since=1), r("few-big", 5, tokens=60, since=2)]
    limits = {"request_limits": {"m": 50}, "in_flight_requests": {"m": 20}}
    # Tokens alone would take both (70 <= 100); requests allow only 30 more.
    assert admit(cands, {"m": 0}, {"m": 100}, now=10, **limits) == ["few-big"]  # type: ignore[arg-type]
    assert admit(cands, {"m": 0}, {"m": 100}, now=10) == ["few-big", "many-small"]


def test_request_limits_per_model_and_the_oversized_piece() -> None:
    cands = [r("x", 500), r("y", 10, model="o")]
    lim = {"m": 100, "o": 5}
    # Each is bigger than its model's whole limit: it may go alone (the API decides).
    assert admit(cands, {}, {}, 1, request_limits=lim) == ["x", "y"]
    assert admit(cands, {}, {}, 1, request_limits=lim, in_flight_requests={"m": 1}) == ["y"]


def test_a_starving_piece_reserves_the_request_limit() -> None:
    cands = [r("old-big", 80, since=0), r("new-small", 10, since=900)]
    lim, used = {"m": 100}, {"m": 50}
    assert admit(cands, {}, {}, 100, request_limits=lim, in_flight_requests=used) == ["new-small"]
    assert admit(cands, {}, {}, 1000, request_limits=lim, in_flight_requests=used) == []


def test_request_limit_from_message() -> None:
    # As reported by a user (OpenAI community forum) for text-embedding-3-small.
    msg = (
        "Enqueued request limit reached for text-embedding-3-small in organization "
        "org-XXXXXX. Limit: 1,000,000 enqueued requests. Please try again once some "
        "in_progress batches have been completed."
    )
    assert request_limit_from_message(msg) == 1_000_000
    assert limit_from_message(msg) is None  # not the token limit
    tokens = "Enqueued token limit reached for gpt-4o. Limit: 90,000 enqueued tokens."
    assert request_limit_from_message(tokens) is None
    assert request_limit_from_message("") is None


def test_desired_job_state() -> None:
    s, t = JobState.SUBMITTING, JobState.TRACKING
    assert desired_job_state(s, [False], [(True, "in_progress")], False) == t
    assert desired_job_state(t, [False, False], [(True, "x"), (False, None)], False) == s
    assert desired_job_state(t, [True, True], [], False) == JobState.COLLECTING
    assert desired_job_state(t, [False], [(True, "cancelling")], True) == t
    assert desired_job_state(s, [False], [(False, None)], True) == t  # a create in flight
    assert desired_job_state(s, [False], [], True) == JobState.COLLECTING
    assert desired_job_state(JobState.QUEUED, [], [], True) == JobState.QUEUED
