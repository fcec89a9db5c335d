"""What a job did cost: the billed usage of result lines, tallied exactly once per execution.

A result line's `response.body.usage` is what the provider bills. Shapes:
- chat completions: prompt_tokens, completion_tokens, prompt_tokens_details.cached_tokens,
  completion_tokens_details.reasoning_tokens (reasoning is part of completion_tokens);
- responses: input_tokens, output_tokens, input_tokens_details.cached_tokens,
  output_tokens_details.reasoning_tokens;
- embeddings: prompt_tokens; completions: prompt_tokens, completion_tokens;
- Anthropic messages (for the provider to come): input_tokens (uncached),
  cache_read_input_tokens, cache_creation_input_tokens, output_tokens.
A line without usage (an HTTP error inside the batch, `batch_expired`, cancelled) was
not billed and costs nothing.

Exactly once, and what "once" means. The unit of charge is one *execution*: a custom_id
in one attempt's (batch's) output. Reading the same attempt's files again (a crash
after the download, a re-download, a retried collect) must not add anything, so an
attempt's tally is recomputed from its immutable files and stored by attempt id,
replacing any earlier tally (`INSERT OR REPLACE`), never added to it; within one
attempt a custom_id is counted once. A request that really ran twice, because it
appears *with usage* in two attempts' outputs (e.g. an attempt that expired after
answering it and a follow-up that included it again), was billed twice by the provider,
so it is charged twice: the ledger reports spend, and hiding a real second charge
would make budgets lie. Such ids are counted as `reruns` (pass the ids already charged
in the piece's earlier attempts) so that a resubmission bug shows up instead of
silently costing money.
"""

from __future__ import annotations

from collections.abc import Container, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from batchd.prices import Price, Unknown, round_amount

__all__ = [
    "AttemptTally",
    "Charge",
    "Usage",
    "usage_of_body",
    "usage_of_raw",
    "usage_of_result",
]


@dataclass(frozen=True)
class Usage:
    """Billed tokens of one request: input includes cached and cache-write tokens,
    output includes reasoning tokens (billed as output)."""

    input_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0


def _int(d: Any, *path: str) -> int:
    for key in path:
        if not isinstance(d, dict):
            return 0
        d = d.get(key)
    return d if type(d) is int and d > 0 else 0


def usage_of_body(body: Any) -> Usage | None:
    """The billed usage in a response body (any shape above), or None if it has none."""
    if not isinstance(body, dict):
        return None
    u = body.get("usage")
    if not isinstance(u, dict):
        return None
    if "prompt_tokens" in u:  # chat completions, completions, embeddings
        return Usage(
            input_tokens=_int(u, "prompt_tokens"),
            cached_tokens=_int(u, "prompt_tokens_details", "cached_tokens"),
            output_tokens=_int(u, "completion_tokens"),
            reasoning_tokens=_int(u, "completion_tokens_details", "reasoning_tokens"),
        )
    if "cache_read_input_tokens" in u or "cache_creation_input_tokens" in u:
        # Anthropic: input_tokens excludes the cache reads and writes.
        read, write = _int(u, "cache_read_input_tokens"), _int(u, "cache_creation_input_tokens")
        return Usage(
            input_tokens=_int(u, "input_tokens") + read + write,
            cached_tokens=read,
            cache_write_tokens=write,
            output_tokens=_int(u, "output_tokens"),
        )
    if "input_tokens" in u or "output_tokens" in u:  # responses
        return Usage(
            input_tokens=_int(u, "input_tokens"),
            cached_tokens=_int(u, "input_tokens_details", "cached_tokens"),
            output_tokens=_int(u, "output_tokens"),
            reasoning_tokens=_int(u, "output_tokens_details", "reasoning_tokens"),
        )
    return None


def usage_of_result(line: Mapping[str, Any]) -> tuple[str, Usage] | None:
    """(custom_id, usage) of one parsed result line, or None when nothing was billed."""
    cid = line.get("custom_id")
    if not isinstance(cid, str):
        return None
    response = line.get("response")
    if isinstance(response, dict):  # OpenAI / Azure: {"response": {"status_code", "body"}}
        usage = usage_of_body(response.get("body"))
    elif isinstance(result := line.get("result"), dict):  # Anthropic: {"result": {"message"}}
        usage = usage_of_body(result.get("message")) if result.get("type") == "succeeded" else None
    else:
        usage = None
    return (cid, usage) if usage is not None else None


_USAGE_KEY = b'"usage"'
_WS = b" \t\r\n"


def _usage_object(data: bytes) -> bytes | None:
    """The text of the last `"usage": {...}` object of a raw line, or None."""
    i = data.rfind(_USAGE_KEY)
    if i < 0:
        return None
    j = i + len(_USAGE_KEY)
    n = len(data)
    while j < n and data[j] in _WS:
        j += 1
    if j >= n or data[j] != 58:  # ":"
        return None
    j += 1
    while j < n and data[j] in _WS:
        j += 1
    if j >= n or data[j] != 123:  # "{"
        return None
    depth = 0
    for k in range(j, min(n, j + 4096)):  # a usage object is numbers and small objects
        c = data[k]
        if c == 123:
            depth += 1
        elif c == 125:
            depth -= 1
            if depth == 0:
                return data[j : k + 1]
        elif c == 34 and data[k - 1] == 58:  # a string value: not a usage object
            return None
    return None


def usage_of_raw(raw: bytes) -> tuple[Usage | None, bool]:
    """(usage, sure) of one raw result line, without parsing the (often large) answer.

    The billed usage is the last `"usage"` object of an OpenAI or Anthropic result line;
    it is cut out and parsed alone. `sure` is False when that could not be decided (no
    such object, or it does not look like usage): the caller parses the whole line.
    """
    text = _usage_object(raw)
    if text is None:
        return None, _USAGE_KEY not in raw
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None, False
    usage = usage_of_body({"usage": obj})
    return usage, usage is not None


@dataclass(frozen=True)
class Charge:
    """The tally of one attempt: billed requests, tokens, and cost (nano-dollars)."""

    requests: int
    input_tokens: int
    cached_tokens: int
    cache_write_tokens: int
    output_tokens: int
    reasoning_tokens: int
    cost: int | Unknown
    reruns: int = 0  # requests already charged in an earlier attempt of the same piece

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (cost null when unknown)."""
        return {
            "requests": self.requests,
            "input_tokens": self.input_tokens,
            "cached_tokens": self.cached_tokens,
            "cache_write_tokens": self.cache_write_tokens,
            "output_tokens": self.output_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "cost_nanousd": None if isinstance(self.cost, Unknown) else self.cost,
            "cost_unknown_reason": self.cost.reason if isinstance(self.cost, Unknown) else None,
            "reruns": self.reruns,
        }


class AttemptTally:
    """Sum the billed usage of one attempt's result lines (output and error files)."""

    def __init__(self, price: Price | Unknown, charged_before: Container[str] = ()) -> None:
        """`charged_before`: custom_ids charged in earlier attempts of the same piece."""
        self.price = price
        self._before = charged_before
        self._seen: set[str] = set()
        self._amount = 0
        self._tokens = [0, 0, 0, 0, 0]
        self.reruns = 0

    def add(self, line: Mapping[str, Any]) -> bool:
        """Count one parsed result line; False if it billed nothing or was already counted."""
        found = usage_of_result(line)
        if found is None:
            return False
        return self.add_usage(*found)

    def add_line(self, cid: str, raw: bytes) -> bool:
        """Count one raw result line whose custom_id is known (collect reads it as the
        bytes arrive): only its usage object is parsed, the whole line when in doubt."""
        usage, sure = usage_of_raw(raw)
        if not sure:
            return self.add_raw(raw)
        return usage is not None and self.add_usage(cid, usage)

    def add_usage(self, cid: str, u: Usage) -> bool:
        """Count the usage of one request; False if `cid` was already counted."""
        if cid in self._seen:
            return False
        self._seen.add(cid)
        if cid in self._before:
            self.reruns += 1
        t = self._tokens
        t[0] += u.input_tokens
        t[1] += u.cached_tokens
        t[2] += u.cache_write_tokens
        t[3] += u.output_tokens
        t[4] += u.reasoning_tokens
        if isinstance(self.price, Price):
            self._amount += self.price.amount(
                u.input_tokens, u.cached_tokens, u.cache_write_tokens, u.output_tokens
            )
        return True

    def add_raw(self, raw: bytes | memoryview) -> bool:
        """Count one raw JSONL result line (a line that is not JSON bills nothing)."""
        try:
            line = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return False
        return isinstance(line, dict) and self.add(line)

    @property
    def charged(self) -> frozenset[str]:
        """custom_ids charged by this attempt (for the next attempt's `charged_before`)."""
        return frozenset(self._seen)

    def charge(self) -> Charge:
        """The tally so far."""
        t = self._tokens
        cost: int | Unknown = round_amount(self._amount)
        if isinstance(self.price, Unknown) and self._seen:  # nothing billed is $0, known
            cost = self.price
        return Charge(len(self._seen), t[0], t[1], t[2], t[3], t[4], cost, self.reruns)
