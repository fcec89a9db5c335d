"""Job states, remote batch statuses, and the one table of allowed job transitions."""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    """batchd's own state of a job (one input file)."""

    QUEUED = "queued"  # claimed into processing/, not yet looked at
    VALIDATING = "validating"  # local validation running
    SUBMITTING = "submitting"  # upload and batch create (per attempt, idempotent)
    TRACKING = "tracking"  # batch exists remotely; polling for a terminal status
    COLLECTING = "collecting"  # terminal status seen; results being written to the spool
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_JOB_STATES = frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED})

_ANY_LIVE = {
    JobState.QUEUED,
    JobState.VALIDATING,
    JobState.SUBMITTING,
    JobState.TRACKING,
    JobState.COLLECTING,
}

# from-state -> states it may move to. Failing is possible from every live state
# (a bad file, a 4xx from the API); COLLECTING ends in any terminal state.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.VALIDATING, JobState.FAILED}),
    JobState.VALIDATING: frozenset({JobState.SUBMITTING, JobState.FAILED}),
    # Back to VALIDATING: the input changed before any of its batches was created.
    JobState.SUBMITTING: frozenset(
        {JobState.TRACKING, JobState.FAILED, JobState.COLLECTING, JobState.VALIDATING}
    ),
    JobState.TRACKING: frozenset({JobState.COLLECTING, JobState.SUBMITTING, JobState.FAILED}),
    JobState.COLLECTING: frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED}),
    # Ended for good: `batchd retry` makes a new job of what is left.
    JobState.DONE: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}
assert set(TRANSITIONS) == _ANY_LIVE | TERMINAL_JOB_STATES


class IllegalTransition(Exception):
    """A state change the transition table does not allow (a bug, not an input problem)."""


def check_transition(old: JobState, new: JobState) -> None:
    """Raise IllegalTransition unless old -> new is in the table (same state is a no-op)."""
    if old != new and new not in TRANSITIONS[old]:
        raise IllegalTransition(f"job state {old} -> {new} is not allowed")


class BatchStatus(StrEnum):
    """OpenAI's batch statuses, stored verbatim."""

    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


TERMINAL_BATCH_STATUSES = frozenset(
    {BatchStatus.FAILED, BatchStatus.COMPLETED, BatchStatus.EXPIRED, BatchStatus.CANCELLED}
)


def is_terminal_status(status: str | None) -> bool:
    """True when a remote batch status will not change any more."""
    return status in TERMINAL_BATCH_STATUSES


def desired_job_state(
    current: JobState,
    pieces_done: list[bool],
    open_attempts: list[tuple[bool, str | None]],
    cancel_requested: bool,
) -> JobState:
    """Where a submitted job belongs, from its pieces and open attempts.

    `open_attempts` holds (has_batch, remote_status) for attempts not yet collected.
    Only meaningful once a job has pieces (SUBMITTING, TRACKING, COLLECTING).
    """
    if current not in (JobState.SUBMITTING, JobState.TRACKING):
        return current
    if cancel_requested:
        # Wait for every open attempt: batches being cancelled, and creates whose answer
        # is still on its way (the cancel handler gives up the others).
        return JobState.TRACKING if open_attempts else JobState.COLLECTING
    if pieces_done and all(pieces_done):
        return JobState.COLLECTING
    if any(not has_batch for has_batch, _ in open_attempts):
        return JobState.SUBMITTING
    return JobState.TRACKING
