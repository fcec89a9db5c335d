"""What differs between providers inside the shared batch lifecycle: input rules and result lines.

The engine (:mod:`batchd.emulator.state`) runs every batch through the same OpenAI-shaped
lifecycle; a :class:`Dialect` tells it how to read that provider's input lines and how to write
one result line per request. Outcomes are ``succeeded``, ``errored`` (the request ran and
failed), ``expired`` (not run before the batch expired) and ``canceled`` (not run because the
batch was cancelled).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from batchd.emulator.ids import new_id
from batchd.emulator.lines import Json, Parsed, Req, Rules, error_body, parse_lines, response_body

if TYPE_CHECKING:
    from batchd.emulator.state import Batch

EXPIRED_MSG = "This request could not be executed before the completion window expired."
OUTCOMES = ("succeeded", "errored", "expired", "canceled")


def outcome_of(r: Req, lost: str | None) -> str:
    """The outcome of request ``r``; ``lost`` is why it did not run (None: it ran)."""
    if lost is not None:
        return lost
    return "errored" if r.status >= 400 else "succeeded"


class Dialect:
    """OpenAI's rules; subclasses override what their provider does differently."""

    name = "openai"
    split_errors = True  # errored/expired lines go to a separate error file
    keep_empty_error_file = False  # write an error file even with no line in it (Azure)
    ordered = False  # results in input order (Gemini) instead of a seeded shuffle
    webhooks = True  # terminal batches fire batch.* webhooks (OpenAI family only)
    output_purpose = "batch_output"
    token_limit_at_validation = True  # over the enqueued-token limit: the batch fails
    cancel_keeps_requests = False  # cancelled while validating: requests still count (Anthropic)

    def rules(self, endpoint: str, model: str | None) -> Rules:
        """The line rules of one batch (``model``: the job-level model, where there is one)."""
        return Rules(endpoint)

    def parse(self, path: Any, endpoint: str, model: str | None) -> Parsed:
        """Validate an input file (runs in a worker thread)."""
        return parse_lines(path, self.rules(endpoint, model), endpoint == "/v1/embeddings")

    def body(self, b: Batch, r: Req, created: int) -> tuple[Json, int]:
        """A success body for ``r`` and its output tokens."""
        return response_body(b.endpoint, b.model or "", r, created)

    def pad(self, line: Json, pad: str) -> Json:
        """``line`` made bigger by ``pad`` (the ``output_pad_bytes`` knob)."""
        resp = line.get("response")
        if isinstance(resp, dict) and isinstance(resp.get("body"), dict):
            resp["body"]["x_pad"] = pad
            return line
        return line | {"x_pad": pad}

    def result_line(self, b: Batch, r: Req, outcome: str, created: int) -> tuple[Json | None, int]:
        """The result line of ``r`` (None: no line) and its output tokens."""
        line: Json = {"id": new_id("batch_req_"), "custom_id": r.custom_id, "response": None}
        if outcome == "canceled":
            return None, 0
        if outcome == "expired":
            return line | {"error": {"code": "batch_expired", "message": EXPIRED_MSG}}, 0
        body, tokens = error_body(r.status), 0
        if outcome == "succeeded":
            body, tokens = self.body(b, r, created)
        resp = {"status_code": r.status, "request_id": new_id("req_"), "body": body}
        return line | {"response": resp, "error": None}, tokens
