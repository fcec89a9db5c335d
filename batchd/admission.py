"""Token admission: which waiting pieces may be submitted now under per-model budgets.

Pure decisions, no I/O. The API has no endpoint for enqueued-token headroom and
refuses too much only after accepting the batch (`token_limit_exceeded`), so batchd
keeps its own count of estimated prompt tokens in flight per model and submits a
piece only when it fits: largest first, so big pieces are not passed over forever by
small ones, and a piece that has waited longer than `starve_after` reserves the
budget (nothing else of that model is admitted until it fits).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

_LIMIT = re.compile(r"Limit:\s*([\d,]+)\s*enqueued tokens", re.IGNORECASE)


@dataclass(frozen=True)
class Candidate:
    """A piece attempt waiting to be created."""

    id: str
    model: str
    tokens: int
    waiting_since: float
    not_before: float = 0.0


def limit_from_message(message: str) -> int | None:
    """The limit stated in a token_limit_exceeded message ("… Limit: 90,000 enqueued tokens")."""
    m = _LIMIT.search(message or "")
    return int(m.group(1).replace(",", "")) if m else None


def admit(
    candidates: Iterable[Candidate],
    in_flight: Mapping[str, int],
    budgets: Mapping[str, int],
    now: float,
    starve_after: float = 600.0,
) -> list[str]:
    """Ids of the candidates to submit now, in submission order."""
    by_model: dict[str, list[Candidate]] = defaultdict(list)
    for c in candidates:
        if c.not_before <= now:
            by_model[c.model].append(c)
    chosen: list[str] = []
    for model, cands in by_model.items():
        budget = budgets.get(model)
        if budget is None:
            chosen += [c.id for c in sorted(cands, key=lambda c: c.waiting_since)]
            continue
        used = in_flight.get(model, 0)
        oldest = min(cands, key=lambda c: c.waiting_since)
        starving = now - oldest.waiting_since >= starve_after
        order = [oldest] if starving else sorted(cands, key=lambda c: (-c.tokens, c.waiting_since))
        for c in order:
            # A piece bigger than the whole budget may only go alone (the API decides).
            fits = used + c.tokens <= budget or (used == 0 and c.tokens > budget)
            if fits:
                chosen.append(c.id)
                used += c.tokens
    return chosen
