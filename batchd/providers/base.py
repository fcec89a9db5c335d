"""The provider interface: what the stages ask of any batch API, in batchd's words.

A provider module implements `Provider` for one API (OpenAI, Azure OpenAI, Anthropic,
Gemini, Mistral, and the OpenAI-compatible presets); the stages call only this
interface, so adding a provider is one module plus its emulator:

- stage the input (`stage`: upload a file, or nothing when requests go inline),
- `create` a batch for one attempt, tagged with the attempt id where the API can carry
  a tag; `find` it again after an ambiguous create (no API here has an idempotent
  create: batchd reconciles by listing),
- a `Snapshot` of a batch (`get`, `list_raw`/`parse_page`) with batchd's status (one of
  OpenAI's eight, the stages' vocabulary) beside the raw one,
- `cancel`, the `result_files` of an ended batch and their native lines classified per
  request (succeeded / failed, retryable or not / expired / canceled), and
- the provider's copies to `delete_remote` once the results are safe on disk.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar

import orjson

from batchd import formats, jsonl
from batchd.metrics import Metrics
from batchd.provider_config import ProviderConfig
from batchd.providers.http import HttpClient, Lines, Tap
from batchd.usage import AttemptTally, Usage, usage_of_body

Owned = Callable[[str], Awaitable[bool]]
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
ATTEMPT_KEY = "batchd_attempt"  # metadata key carrying batchd's attempt id on every batch
JOB_KEY = "batchd_job"


class Verdict(StrEnum):
    """What one result line says about its request."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"  # failed for good (e.g. HTTP 400: the request must change)
    RETRYABLE = "retryable"  # failed, but another attempt may work (429, 5xx)
    EXPIRED = "expired"  # not run before the batch's window ended
    CANCELED = "canceled"  # not run because the batch was cancelled

    @property
    def again(self) -> bool:
        """Worth sending in another attempt."""
        return self is not Verdict.SUCCEEDED and self is not Verdict.FAILED


@dataclass(frozen=True)
class Snapshot:
    """One batch as batchd sees it: status in batchd's vocabulary, the raw one kept."""

    id: str
    status: str  # validating | in_progress | finalizing | completed | failed | expired |
    #              cancelling | cancelled
    raw_status: str
    completed: int
    failed: int
    total: int
    created_at: float  # unix seconds
    raw: dict[str, Any]  # the provider's object, as stored in attempts.batch
    errors: tuple[dict[str, Any], ...] = ()  # batch-level errors: {code, message, line}
    usage: dict[str, Any] | None = None  # OpenAI-shaped usage, where the batch reports it
    times: dict[str, float | None] = field(default_factory=dict)  # ended_at, completed_at, …

    @property
    def counts(self) -> tuple[int, int, int]:
        """(completed, failed, total) requests as last reported."""
        return self.completed, self.failed, self.total

    @property
    def ended(self) -> bool:
        """The batch reached a terminal status."""
        return self.status in TERMINAL


@dataclass(frozen=True)
class Page:
    """One page of a provider's batch list, newest first."""

    batches: list[Snapshot]
    cursor: str | None  # the next page's cursor; None: this was the last page


@dataclass(frozen=True)
class ResultFile:
    """One file of an ended batch's results to fetch.

    `key` is where its lines go: "output" (successes), "errors" (failures), or
    "results" (one stream of both, split locally by verdict)."""

    key: str
    ref: str  # a file id, a URL, … (the provider's business)
    min_lines: int = 0  # the batch's counts say the file has at least this many lines


def file_results(snap: Snapshot, output: str, errors: str) -> list[ResultFile]:
    """The result files of a batch that names an output and an error file in the fields
    `output` and `errors` of its object (OpenAI's shape, Mistral's)."""
    out = []
    for key, field_, n in (("output", output, snap.completed), ("errors", errors, snap.failed)):
        ref = snap.raw.get(field_)
        if ref:
            out.append(ResultFile(key, str(ref), n))
    return out


def file_results_pending(snap: Snapshot, output: str, errors: str) -> bool:
    """Counts say there are results but the batch does not name their file yet (just
    after it ended a batch can be seen without them): read the batch again."""
    return bool(
        (snap.completed and not snap.raw.get(output)) or (snap.failed and not snap.raw.get(errors))
    )


@dataclass(frozen=True)
class Create:
    """What a create needs: the attempt (its id is the tag), its input, the job's."""

    attempt_id: str
    job_id: str
    input_path: Path
    file_id: str | None  # set when the provider stages files
    requests: int
    endpoint: str | None
    model: str | None
    metadata: Mapping[str, str] = field(default_factory=dict)


def unix(value: Any) -> float | None:
    """A timestamp as unix seconds: ints/floats as they are, RFC 3339 / ISO strings
    (Anthropic, Gemini, Together, Azure before 2024-10-21) parsed; else None."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str) and value:
        text = value.strip()
        if text.endswith("Z"):
            text = text[:-1] + "+00:00"
        if "." in text:  # Python 3.11 takes at most 6 fractional digits (Gemini sends 9)
            head, _, tail = text.partition(".")
            digits = "".join(c for c in tail if c.isdigit())
            text = f"{head}.{digits[:6]}{tail[len(digits) :]}"
        try:
            return datetime.fromisoformat(text).timestamp()
        except ValueError:
            return None
    return None


def obj(d: Any, key: str) -> dict[str, Any]:
    """`d[key]` when both are JSON objects, else an empty dict."""
    v = d.get(key) if isinstance(d, dict | Mapping) else None
    return v if isinstance(v, dict) else {}


def usage_dict(u: Usage) -> dict[str, Any]:
    """A Usage in the OpenAI batch object's shape (what job.json shows)."""
    return {
        "input_tokens": u.input_tokens,
        "input_tokens_details": {"cached_tokens": u.cached_tokens},
        "output_tokens": u.output_tokens,
        "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
        "total_tokens": u.input_tokens + u.output_tokens,
    }


class Provider(ABC):
    """One configured provider (a `[providers.NAME]` table, or `[api]`)."""

    kind: ClassVar[str]
    # How a batch carries batchd's attempt id, for finding it after an ambiguous create:
    # "metadata" (a key/value on the batch), "display_name", "input_file" (the input
    # file uploaded for this attempt alone), or "none" (matched by time and size).
    tag: ClassVar[str] = "metadata"
    stages_files: ClassVar[bool] = True  # False: requests travel inline with the create
    id_key: ClassVar[str] = "custom_id"  # the per-request id field of input/result lines
    has_batch_usage: ClassVar[bool] = False  # the batch object reports usage itself

    def __init__(self, cfg: ProviderConfig, api_key: str | None, metrics: Metrics) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.metrics = metrics

    @property
    @abstractmethod
    def http(self) -> HttpClient:
        """The HTTP client (session, retries, metrics)."""

    async def __aenter__(self) -> Provider:
        await self.http.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.close()

    def set_key(self, api_key: str | None) -> None:
        """Use another key from now on."""
        self.http.set_key(api_key)

    @property
    def proxy(self) -> str | None:
        """The proxy calls go through (no credentials), or None."""
        return self.http.proxy

    # --- input ------------------------------------------------------------------------

    def validator(self, limits: Any, on_request: formats.OnRequest | None = None) -> Any:
        """The line rules of this provider (a `jsonl.Validator` enforcing `limits`;
        `on_request` sees each parsed line, e.g. the cost estimator)."""
        c = self.cfg
        return formats.validator(
            c.kind,
            limits,
            model=c.model,
            endpoint=c.endpoint,
            deployments=c.deployments,
            on_request=on_request,
        )

    @property
    def piece_limits(self) -> Any:
        """What one batch may hold (`jsonl.Limits`): bigger jobs are split."""
        lim = self.cfg.limits
        return jsonl.Limits(
            lim.max_requests_per_batch, lim.max_bytes_per_batch, lim.max_embedding_inputs_per_batch
        )

    def stages_input(self, size: int) -> bool:
        """Whether an input of `size` bytes is uploaded before its create (False: its
        requests travel inline with the create)."""
        return self.stages_files

    async def stage(self, path: Path, filename: str, tap: Tap | None = None) -> str | None:
        """Upload the input for one attempt; returns its file id (None: nothing staged,
        the requests go inline with the create). Every byte passes through `tap`."""
        return None

    async def find_staged(self, filename: str, not_before: float, size: int) -> str | None:
        """A file uploaded under `filename` whose id was never recorded (a crash during
        the upload), if it is complete; an incomplete one is deleted."""
        return None

    async def delete_file(self, file_id: str) -> None:
        """Delete a staged input file (best effort callers ignore NotFound)."""
        raise NotImplementedError(f"{self.kind} stages no files ({file_id})")

    # --- batches ----------------------------------------------------------------------

    @abstractmethod
    async def create(self, req: Create) -> Snapshot:
        """Create the batch of one attempt. Raises Transient when the outcome is unknown
        (the caller calls `find` before trying again), QuotaRefused for an admission
        refusal, InvalidRequest for a request the API will never take."""

    @abstractmethod
    async def find(self, req: Create, sent_at: float, owned: Owned) -> Snapshot | None:
        """The batch an earlier create of this attempt (sent at `sent_at`, unix seconds)
        made, if any; `owned(batch_id)`: another attempt has that batch."""

    async def newest_first(self, since: float, max_pages: int = 20) -> AsyncIterator[Snapshot]:
        """The listed batches, newest first, up to and including the first one created
        before `since` (unix seconds), over at most `max_pages` pages: where `find`
        looks for a batch whose create answer was lost."""
        cursor: str | None = None
        for _ in range(max_pages):
            page = self.parse_page(await self.list_raw(cursor), cursor)
            for s in page.batches:
                yield s
                if s.created_at < since:
                    return
            if page.cursor is None:
                return
            cursor = page.cursor

    @abstractmethod
    async def get(self, batch_id: str) -> Snapshot:
        """The batch now."""

    @abstractmethod
    async def list_raw(self, cursor: str | None) -> bytes:
        """One page of the batch list as sent (newest first; about 100 per page)."""

    @abstractmethod
    def parse_page(self, raw: bytes, cursor: str | None = None) -> Page:
        """The batches on a page `list_raw(cursor)` returned."""

    @abstractmethod
    def snapshot(self, raw: Mapping[str, Any]) -> Snapshot:
        """A stored provider object (attempts.batch) read again."""

    @abstractmethod
    async def cancel(self, batch_id: str) -> None:
        """Ask the provider to cancel the batch (it ends as cancelled later)."""

    def serial(self) -> AbstractAsyncContextManager[Any]:
        """Held around a create and its reconcile: a provider whose batches carry no tag
        serialises them, so that two of batchd's own creates never match each other."""
        return nullcontext()

    async def probe(self) -> int:
        """One cheap authenticated call (health, `batchd check`); returns batches seen."""
        return len(self.parse_page(await self.list_raw(None), None).batches)

    # --- results ----------------------------------------------------------------------

    @abstractmethod
    def result_files(self, snap: Snapshot) -> list[ResultFile]:
        """What to fetch of an ended batch (empty: nothing came back)."""

    def results_pending(self, snap: Snapshot) -> bool:
        """The batch ended but does not name its results yet: read it again."""
        return False

    @abstractmethod
    async def download(self, rf: ResultFile, dest: Path, lines: Lines) -> int:
        """Fetch one result file to `dest` (temp name, fsync, rename), feeding `lines`."""

    def result_id(self, line: bytes) -> str:
        """The request id of a result line."""
        return str(orjson.loads(line).get(self.id_key))

    def tally_line(self, tally: AttemptTally, request_id: str, line: bytes) -> None:
        """Count what one result line billed in `tally` (each request id once)."""
        tally.add_line(request_id, line)  # OpenAI's shape: response.body.usage

    @abstractmethod
    def classify(self, line: bytes) -> tuple[str, Verdict]:
        """(request id, verdict) of one result line."""

    def line_usage(self, line: bytes) -> Usage | None:
        """The billed usage of one successful result line, if it carries any."""
        rec = orjson.loads(line)
        resp = rec.get("response") if isinstance(rec, dict) else None
        return usage_of_body(resp.get("body")) if isinstance(resp, dict) else None

    def request_error(self, rec: Mapping[str, Any]) -> dict[str, Any]:
        """What went wrong with one request, from its line in errors.jsonl:
        {custom_id, status_code, code, message}."""
        resp = rec.get("response") if isinstance(rec.get("response"), dict) else None
        err = rec.get("error") if isinstance(rec.get("error"), dict) else None
        if err is None and resp is not None:
            body = resp.get("body")
            err = body.get("error") if isinstance(body, dict) else None
        err = err or {}
        return {
            "custom_id": rec.get(self.id_key),
            "status_code": resp.get("status_code") if resp else None,
            "code": err.get("code") or err.get("type"),
            "message": err.get("message"),
        }

    def missing_line(self, request_id: str, message: str) -> dict[str, Any]:
        """An error line for a request that got no result (every request is accounted
        for in the provider's own line shape)."""
        return {
            "id": None,
            self.id_key: request_id,
            "response": None,
            "error": {"code": "batchd_no_result", "message": message},
        }

    # --- the provider's copies --------------------------------------------------------

    def remote_copies(self, snap: Snapshot, file_id: str | None) -> list[tuple[str, str]]:
        """(ref, kind) of the provider's copies of an ended batch: kind "input",
        "output", "error" (files) or "batch" (the batch itself, where it can go)."""
        return [(file_id, "input")] if file_id else []

    async def delete_remote(self, ref: str, kind: str) -> None:
        """Delete one of the provider's copies (NotFound: already gone)."""
        await self.delete_file(ref)
