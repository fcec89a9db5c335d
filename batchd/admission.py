"""Token admission: which waiting pieces may be submitted now under per-model budgets.

Pure decisions, no I/O. The API has no endpoint for enqueued-token headroom and
refuses too much only after accepting the batch (`token_limit_exceeded`), so batchd
keeps its own count of estimated prompt tokens in flight per model and submits a
piece only when it fits: largest first, so big pieces are not passed over forever by
small ones, and a piece that has waited longer than `starve_after` reserves the
budget (nothing else of that model is admitted until it fits).

OpenAI also caps *enqueued requests* per model (reported: "Enqueued request limit
reached for text-embedding-3-small in organization org-…. Limit: 1,000,000 enqueued
requests. Please try again once some in_progress batches have been completed."), so a
piece must fit both: its estimated tokens under the token budget and its request count
under the request limit of its model.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

_LIMIT = re.compile(r"Limit:\s*([\d,]+)\s*enqueued tokens", re.IGNORECASE)
# The wording is from a user's report of the refusal (OpenAI community forum, "Batch API
# request limit violates terms of service", 2024); its error code was not reported, so
# the refusal is recognised by this message, whatever the code.
_REQUEST_LIMIT = re.compile(r"Limit:\s*([\d,]+)\s*enqueued requests", re.IGNORECASE)


@dataclass(frozen=True)
class Candidate:
    """A piece attempt waiting to be created."""

    id: str
    model: str
    tokens: int
    waiting_since: float
    not_before: float = 0.0
    requests: int = 0


def limit_from_message(message: str) -> int | None:
    """The limit stated in a token_limit_exceeded message ("… Limit: 90,000 enqueued tokens")."""
    m = _LIMIT.search(message or "")
    return int(m.group(1).replace(",", "")) if m else None


def request_limit_from_message(message: str) -> int | None:
    """The limit stated in an enqueued-request refusal ("… Limit: 1,000,000 enqueued requests")."""
    m = _REQUEST_LIMIT.search(message or "")
    return int(m.group(1).replace(",", "")) if m else None


def _fits(used: int, size: int, limit: int | None) -> bool:
    # A piece bigger than the whole limit may only go alone (the API decides).
    return limit is None or used + size <= limit or (used == 0 and size > limit)


def admit(
    candidates: Iterable[Candidate],
    in_flight: Mapping[str, int],
    budgets: Mapping[str, int],
    now: float,
    starve_after: float = 600.0,
    *,
    request_limits: Mapping[str, int] | None = None,
    in_flight_requests: Mapping[str, int] | None = None,
) -> list[str]:
    """Ids of the candidates to submit now, in submission order.

    `budgets`/`in_flight`: enqueued tokens per model; `request_limits` /
    `in_flight_requests`: enqueued requests per model. A model with neither limit
    admits everything due, oldest first.
    """
    req_limits = request_limits or {}
    req_used = in_flight_requests or {}
    by_model: dict[str, list[Candidate]] = defaultdict(list)
    for c in candidates:
        if c.not_before <= now:
            by_model[c.model].append(c)
    chosen: list[str] = []
    for model, cands in by_model.items():
        budget, req_limit = budgets.get(model), req_limits.get(model)
        if budget is None and req_limit is None:
            chosen += [c.id for c in sorted(cands, key=lambda c: c.waiting_since)]
            continue
        used, reqs = in_flight.get(model, 0), req_used.get(model, 0)
        oldest = min(cands, key=lambda c: c.waiting_since)
        starving = now - oldest.waiting_since >= starve_after
        order = [oldest] if starving else sorted(cands, key=lambda c: (-c.tokens, c.waiting_since))
        for c in order:
            if _fits(used, c.tokens, budget) and _fits(reqs, c.requests, req_limit):
                chosen.append(c.id)
                used += c.tokens
                reqs += c.requests
    return chosen
