"""In-memory model and lifecycle of the OpenAI Batch API emulator.

The lifecycle is computed lazily: every read first calls :meth:`EmulatorState.advance`, which
applies all transitions due by now in time order (a heap of events), so the outcome does not
depend on how often clients poll. Durations are ``config.<phase>_seconds * config.time_scale``
on a monotonic clock; reported timestamps are unix seconds. Input files are parsed in a worker
thread as soon as the batch is created; a batch leaves ``validating`` once both the validating
duration has elapsed and parsing has finished.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import heapq
import itertools
import os
import random
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from batchd.emulator.dialect import Dialect, outcome_of
from batchd.emulator.faults import FaultConfig
from batchd.emulator.ids import new_id
from batchd.emulator.lines import Json, Parsed, Req

ENDPOINTS = tuple(
    "/v1/responses /v1/chat/completions /v1/embeddings /v1/completions /v1/moderations "
    "/v1/images/generations /v1/images/edits /v1/videos".split()
)
PURPOSES = ("batch", "assistants", "vision", "fine-tune", "user_data", "evals")
CANCELLABLE = ("validating", "in_progress", "finalizing")
HOLDS_TOKENS = ("in_progress", "finalizing", "cancelling")
TERMINAL = ("completed", "failed", "expired", "cancelled")
TIMESTAMPS = tuple(
    f"{s}_at"
    for s in "in_progress finalizing completed failed expired cancelling cancelled".split()
)
BATCH_FIELDS = tuple(
    "id endpoint model errors input_file_id status output_file_id error_file_id created_at "
    "metadata".split()
)
DAY = 86_400
OPENAI = Dialect()


class ApiError(Exception):
    """An API failure rendered as the OpenAI error envelope."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind  # the provider's error type, where it is not implied by the status

    def body(self) -> Json:
        """The ``{"error": {...}}`` envelope."""
        kind = self.kind or "invalid_request_error"
        err = {"message": self.message, "type": kind, "param": self.param}
        return {"error": err | {"code": self.code}}


@dataclass
class EmulatorConfig:
    """Emulator behaviour; durations are multiplied by ``time_scale``."""

    api_key: str | None = None
    time_scale: float = 1.0
    validating_seconds: float = 1.0
    in_progress_seconds: float = 3.0
    finalizing_seconds: float = 1.0
    cancelling_seconds: float = 1.0
    seed: int = 0
    token_limits: dict[str, int] = field(default_factory=dict)
    request_limits: dict[str, int] = field(default_factory=dict)  # enqueued requests per model
    output_pad_bytes: int = 0
    bandwidth_bytes_per_s: float | None = None
    data_dir: str | None = None
    expire_after_seconds: float | None = None  # in_progress longer than this -> expired
    max_file_bytes: int = 200 * 1024 * 1024  # POST /v1/files and uploads with purpose batch
    max_part_bytes: int = 64 * 1024 * 1024  # POST /v1/uploads/{id}/parts
    faults: FaultConfig = field(default_factory=FaultConfig)  # see batchd.emulator.faults
    providers: frozenset[str] | None = None  # APIs to serve (batchd.emulator.providers); None=all
    azure_deployments: frozenset[str] | None = None  # Azure batch deployments; None = any name
    anthropic_max_requests: int = 100_000  # requests per Message Batch
    anthropic_max_bytes: int = 256 * 1024 * 1024  # body bytes per Message Batch
    webhook_url: str | None = None  # POST batch.<status> events here (batchd.emulator.webhooks)
    webhook_secret: str | None = None  # "whsec_<base64>"; None = unsigned events
    webhook_max_attempts: int = 5  # deliveries of one event before giving up
    webhook_backoff_seconds: float = 0.05  # first retry delay, doubled on each retry


@dataclass(eq=False)
class StoredFile:
    """A file object whose bytes live at ``path``."""

    id: str
    filename: str
    purpose: str
    bytes: int
    created_at: int
    expires_at: int | None
    path: Path
    provider: str = "openai"
    kind: str = "input"  # input, output or error (results written by the emulator)
    lines: int | None = None  # result lines, for result files
    extra: Json = field(default_factory=dict)  # provider-specific fields (mime type, name, ...)

    def to_dict(self) -> Json:
        """The OpenAI file object."""
        keys = ("id", "bytes", "created_at", "filename", "purpose", "expires_at")
        return {"object": "file", "status": "processed"} | {k: getattr(self, k) for k in keys}


@dataclass(eq=False)
class Upload:
    """A multi-part upload in progress."""

    id: str
    filename: str
    purpose: str
    bytes: int
    mime_type: str
    created_at: int
    status: str = "pending"
    parts: dict[str, tuple[Path, int]] = field(default_factory=dict)
    file: StoredFile | None = None

    def to_dict(self) -> Json:
        """The OpenAI upload object."""
        keys = ("id", "bytes", "created_at", "filename", "purpose", "status")
        d: Json = {"object": "upload"} | {k: getattr(self, k) for k in keys}
        return d | {"expires_at": self.created_at + 3600, "file": self.file and self.file.to_dict()}


@dataclass(eq=False)
class Batch:
    """Internal batch record; :meth:`EmulatorState.batch_dict` renders the API object."""

    id: str
    seq: int
    endpoint: str
    input_file_id: str
    metadata: dict[str, str] | None
    output_ttl: int
    created_mono: float = 0.0
    created_at: int = 0
    status: str = "validating"
    ts: dict[str, int] = field(default_factory=dict)
    model: str | None = None
    errors: Json | None = None
    parsed: Parsed | None = None
    parsed_mono: float = 0.0
    reqs: list[Req] = field(default_factory=list)
    fail_prefix: list[int] = field(default_factory=lambda: [0])
    tokens: int = 0
    phase_mono: float = 0.0
    done: int = 0
    counts: tuple[int, int] = (0, 0)
    usage: tuple[int, int] = (0, 0)
    output_file_id: str | None = None
    error_file_id: str | None = None
    version: int = 0
    provider: str = "openai"
    dialect: Dialect = OPENAI
    pseq: int = 0  # position in its provider's list
    total: int = 0  # requests known at create time (inline input), before validation
    model_hint: str | None = None  # job-level model (Mistral, Gemini, Together model_id)
    outcomes: Counter[str] = field(default_factory=Counter)  # succeeded/errored/expired/canceled
    extra: Json = field(default_factory=dict)  # provider-specific fields kept for rendering
    deleted: bool = False
    window: int = DAY  # completion window in seconds (reported in expires_at, not enforced)


def _openai_window(window: str) -> int | None:
    return DAY if window == "24h" else None


@dataclass(frozen=True)
class Flavor:
    """The create-batch rules of an OpenAI-compatible API (OpenAI itself, Azure, Groq)."""

    provider: str = "openai"
    dialect: Dialect = OPENAI
    endpoints: tuple[str, ...] = ENDPOINTS
    window_seconds: Callable[[str], int | None] = _openai_window  # None: not allowed
    windows_hint: str = "'24h'"
    file_bytes: int | None = None  # max input file size; None: config.max_file_bytes

    def max_file_bytes(self, config: EmulatorConfig) -> int:
        """The largest input file this API accepts."""
        return self.file_bytes if self.file_bytes is not None else config.max_file_bytes


OPENAI_FLAVOR = Flavor()


def require_str(body: Json, key: str) -> str:
    """``body[key]`` if it is a string, else a 400 in OpenAI's words."""
    value = body.get(key)
    if value is None:
        raise ApiError(
            400, f"Missing required parameter: '{key}'.", key, "missing_required_parameter"
        )
    if not isinstance(value, str):
        raise ApiError(400, f"Invalid type for '{key}': expected a string.", key, "invalid_type")
    return value


def check_metadata(meta: Any) -> None:
    """Raise a 400 unless ``meta`` is OpenAI-style metadata (<= 16 string pairs) or None."""
    if meta is None:
        return
    if not isinstance(meta, dict) or len(meta) > 16:
        msg = "Invalid 'metadata': expected an object with at most 16 properties."
        raise ApiError(400, msg, "metadata", "invalid_value")
    for k, v in meta.items():
        if len(k) > 64 or not isinstance(v, str) or len(v) > 512:
            msg = f"Invalid 'metadata.{k}': keys must be <= 64 chars, values strings <= 512 chars."
            raise ApiError(400, msg, "metadata", "invalid_value")


def output_ttl(spec: Any) -> int:
    """Seconds result files live, from ``output_expires_after`` (default 30 days)."""
    if spec is None:
        return 30 * DAY
    secs = spec.get("seconds") if isinstance(spec, dict) else None
    if not isinstance(spec, dict) or spec.get("anchor") != "created_at":
        msg = "Invalid 'output_expires_after.anchor': expected 'created_at'."
        raise ApiError(400, msg, "output_expires_after.anchor", "invalid_value")
    if isinstance(secs, bool) or not isinstance(secs, int) or not 3600 <= secs <= 30 * DAY:
        msg = "Invalid 'output_expires_after.seconds': expected an integer in 3600..2592000."
        raise ApiError(400, msg, "output_expires_after.seconds", "invalid_value")
    return secs


def _copy(src: BinaryIO, out: BinaryIO) -> None:
    """Append all of `src` to `out`, in the kernel where it can (no copies through Python)."""
    try:
        out.flush()
        while os.copy_file_range(src.fileno(), out.fileno(), 1 << 30):
            pass
    except (AttributeError, OSError):  # not Linux, or not between these two files
        shutil.copyfileobj(src, out, 8 << 20)


def concat_parts(paths: Sequence[Path], dest: Path, md5: bool = True) -> str | None:
    """Concatenate ``paths`` into ``dest`` (blocking); return the md5 hex digest, if asked.

    Hashing 200 MB costs ~0.4 s of CPU on the path of the upload's completion: only a
    client that sent an md5 to check is made to wait for it.
    """
    h = hashlib.md5(usedforsecurity=False) if md5 else None
    with dest.open("wb") as out:
        for p in paths:
            with p.open("rb") as src:
                if h is None:
                    _copy(src, out)
                    continue
                while chunk := src.read(1 << 20):
                    h.update(chunk)
                    out.write(chunk)
    return h.hexdigest() if h else None


class EmulatorState:
    """All emulator state: files, uploads, batches, call counters."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.calls: Counter[str] = Counter()
        self.polls: list[tuple[float, str]] = []  # (monotonic time, User-Agent) of GET batches
        self.fault_counts: Counter[str] = Counter()  # injected faults by knob name
        self.webhook_counts: Counter[str] = Counter()  # attempts / delivered / failed
        self.finished: list[Batch] = []  # newly terminal batches awaiting a webhook
        self.batches_created = 0
        self._tmp = (
            tempfile.TemporaryDirectory(prefix="batchd-emu-") if not config.data_dir else None
        )
        self.data_dir = Path(self._tmp.name if self._tmp else config.data_dir or ".")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.files: dict[str, StoredFile] = {}
        self.uploads: dict[str, Upload] = {}
        self._batches: dict[str, Batch] = {}
        self._by_seq: list[Batch] = []
        self._lists: dict[str, list[Batch]] = {}  # per provider, oldest first
        self._heap: list[tuple[float, int, int]] = []
        self._mono0, self._wall0 = time.monotonic(), time.time()

    def now(self) -> float:
        """Monotonic clock used for all durations."""
        return time.monotonic()

    def unix(self, mono: float | None = None) -> int:
        """Unix seconds corresponding to a monotonic instant (default: now)."""
        return int(self._wall0 + ((self.now() if mono is None else mono) - self._mono0))

    def _dur(self, seconds: float) -> float:
        return seconds * self.config.time_scale

    def close(self) -> None:
        """Remove the temporary data directory (a configured ``data_dir`` is kept)."""
        if self._tmp is not None:
            self._tmp.cleanup()

    # -- files -----------------------------------------------------------------------------
    def add_file(
        self,
        fid: str,
        filename: str,
        purpose: str,
        size: int,
        ttl: int | None,
        provider: str = "openai",
    ) -> StoredFile:
        """Register bytes already written at ``self.data_dir / fid`` as a file object."""
        now = self.unix()
        if ttl is None and purpose == "batch":
            ttl = 30 * DAY
        f = StoredFile(fid, filename, purpose, size, now, ttl and now + ttl, self.data_dir / fid)
        f.provider = provider
        self.files[fid] = f
        return f

    def get_file(self, fid: str, provider: str = "openai") -> StoredFile:
        """Look one of ``provider``'s files up or raise 404."""
        f = self.files.get(fid)
        if f is None or f.provider != provider:
            raise ApiError(404, f"No such File object: {fid}", "id")
        return f

    def list_files(
        self, purpose: str | None, limit: int, after: str | None, provider: str = "openai"
    ) -> Json:
        """``GET /v1/files``: newest first, optional purpose filter, cursor ``after``."""
        files = [
            f
            for f in reversed(self.files.values())
            if purpose in (None, f.purpose) and f.provider == provider
        ]
        if after is not None:
            ids = [f.id for f in files]
            if after not in ids:
                raise ApiError(400, f"Invalid 'after': no file with id '{after}'.", "after")
            files = files[ids.index(after) + 1 :]
        page = [f.to_dict() for f in files[:limit]]
        return {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(files) > limit,
        }

    def delete_file(self, fid: str, provider: str = "openai") -> Json:
        """Delete a file and its bytes."""
        f = self.get_file(fid, provider)
        del self.files[fid]
        f.path.unlink(missing_ok=True)
        return {"id": fid, "object": "file", "deleted": True}

    # -- uploads ---------------------------------------------------------------------------
    def create_upload(self, body: Json) -> Upload:
        """``POST /v1/uploads``."""
        filename, purpose = require_str(body, "filename"), require_str(body, "purpose")
        mime = require_str(body, "mime_type")
        size = body.get("bytes")
        if purpose not in PURPOSES:
            raise ApiError(400, f"Invalid value for 'purpose': '{purpose}'.", "purpose")
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ApiError(400, "Invalid 'bytes': expected a positive integer.", "bytes")
        if purpose == "batch" and size > self.config.max_file_bytes:
            msg = f"File too large: {size} bytes; the maximum is {self.config.max_file_bytes}."
            raise ApiError(400, msg, "bytes")
        u = Upload(new_id("upload_"), filename, purpose, size, mime, self.unix())
        self.uploads[u.id] = u
        return u

    def pending_upload(self, uid: str) -> Upload:
        """Look up an upload that still accepts parts, or raise 404/400."""
        if uid not in self.uploads:
            raise ApiError(404, f"No such Upload object: {uid}", "upload_id")
        u = self.uploads[uid]
        if u.status != "pending":
            raise ApiError(400, f"Upload {uid} is already {u.status}.", "upload_id")
        return u

    def add_part(self, u: Upload, pid: str, size: int) -> Json:
        """Record a part already written at ``self.data_dir / pid``."""
        u.parts[pid] = (self.data_dir / pid, size)
        return {"id": pid, "object": "upload.part", "created_at": self.unix(), "upload_id": u.id}

    async def complete_upload(self, uid: str, body: Json) -> Upload:
        """``POST /v1/uploads/{id}/complete``: concatenate parts in the given order."""
        u = self.pending_upload(uid)
        ids, md5 = body.get("part_ids"), body.get("md5")
        if not isinstance(ids, list) or not ids or len(set(map(str, ids))) != len(ids):
            raise ApiError(400, "Invalid 'part_ids': expected a list of distinct ids.", "part_ids")
        unknown = [p for p in ids if p not in u.parts]
        if unknown:
            raise ApiError(400, f"Invalid 'part_ids': unknown part {unknown[0]}.", "part_ids")
        total = sum(u.parts[p][1] for p in ids)
        if total != u.bytes:
            msg = f"The parts total {total} bytes, but the upload was created with {u.bytes} bytes."
            raise ApiError(400, msg, "bytes")
        fid = new_id("file-")
        digest = await asyncio.to_thread(
            concat_parts, [u.parts[p][0] for p in ids], self.data_dir / fid, md5 is not None
        )
        if u.status != "pending" or (md5 is not None and md5 != digest):
            (self.data_dir / fid).unlink(missing_ok=True)
            raise ApiError(400, "md5 mismatch or upload no longer pending.", "md5")
        self._drop_parts(u)
        u.file = self.add_file(fid, u.filename, u.purpose, total, None)
        u.status = "completed"
        return u

    def cancel_upload(self, uid: str) -> Upload:
        """``POST /v1/uploads/{id}/cancel``."""
        u = self.pending_upload(uid)
        self._drop_parts(u)
        u.status = "cancelled"
        return u

    @staticmethod
    def _drop_parts(u: Upload) -> None:
        for path, _ in u.parts.values():
            path.unlink(missing_ok=True)
        u.parts.clear()

    # -- batches: API ----------------------------------------------------------------------
    def create_batch(
        self, body: Json, flavor: Flavor = OPENAI_FLAVOR, parsed: Parsed | None = None
    ) -> Batch:
        """``POST /v1/batches`` (or an OpenAI-compatible provider's, per ``flavor``): synchronous
        checks, then start parsing in a worker thread."""
        fid = require_str(body, "input_file_id")
        endpoint = require_str(body, "endpoint")
        window = require_str(body, "completion_window")
        if endpoint not in flavor.endpoints:
            supported = ", ".join(flavor.endpoints)
            msg = f"Invalid value: '{endpoint}'. Supported values are: {supported}."
            raise ApiError(400, msg, "endpoint", "invalid_value")
        window_s = flavor.window_seconds(window)
        if window_s is None:
            msg = f"Invalid value: '{window}'. Supported values are: {flavor.windows_hint}."
            raise ApiError(400, msg, "completion_window", "invalid_value")
        check_metadata(body.get("metadata"))
        ttl = output_ttl(body.get("output_expires_after"))
        f = self.files.get(fid)
        if f is None or f.provider != flavor.provider or f.purpose != "batch":
            why = "not found" if f is None else "must have purpose 'batch'"
            msg = f"Invalid 'input_file_id': '{fid}'. File {why}."
            raise ApiError(400, msg, "input_file_id", "invalid_value")
        if f.bytes > flavor.max_file_bytes(self.config):
            raise ApiError(400, "The input file exceeds the maximum size.", "input_file_id")
        b = self.start_batch(
            flavor.provider,
            flavor.dialect,
            f.path,
            endpoint,
            input_file_id=fid,
            metadata=body.get("metadata"),
            output_ttl=ttl,
            parsed=parsed,
        )
        b.window, b.extra["completion_window"] = window_s, window
        return b

    def start_batch(
        self,
        provider: str,
        dialect: Dialect,
        source: Path,
        endpoint: str,
        *,
        input_file_id: str = "",
        metadata: dict[str, str] | None = None,
        output_ttl: int = 30 * DAY,
        bid: str | None = None,
        total: int = 0,
        model: str | None = None,
        parsed: Parsed | None = None,
    ) -> Batch:
        """Create a batch of ``provider`` over the input at ``source`` (any provider's line
        format, read by ``dialect``); parse it in a worker thread unless ``parsed`` is given."""
        now = self.now()
        seq = len(self._by_seq)
        b = Batch(bid or new_id("batch_"), seq, endpoint, input_file_id, metadata, output_ttl)
        b.provider, b.dialect = provider, dialect
        b.total, b.model_hint = total, model
        b.created_mono, b.created_at = now, self.unix(now)
        self._batches[b.id] = b
        self._by_seq.append(b)
        siblings = self._lists.setdefault(provider, [])
        b.pseq = len(siblings)
        siblings.append(b)
        self.batches_created += 1
        if parsed is not None:
            b.parsed, b.parsed_mono = parsed, now
            self._schedule(b)
            return b
        parse = functools.partial(dialect.parse, source, endpoint, model)
        fut = asyncio.get_running_loop().run_in_executor(None, parse)
        fut.add_done_callback(functools.partial(self._on_parsed, b))
        return b

    def get_batch(self, bid: str, provider: str = "openai") -> Batch:
        """Look one of ``provider``'s batches up (after advancing the clock) or raise 404."""
        self.advance()
        b = self._batches.get(bid)
        if b is None or b.provider != provider:
            raise ApiError(404, f"No batch found with id '{bid}'.", "batch_id")
        return b

    def delete_batch(self, b: Batch) -> None:
        """Forget a batch (providers with a delete call); its result files stay."""
        del self._batches[b.id]
        b.deleted = True
        b.version += 1  # drop any scheduled transition

    def provider_batches(self, provider: str) -> list[Batch]:
        """``provider``'s live batches, newest first (after advancing the clock)."""
        self.advance()
        return [b for b in reversed(self._lists.get(provider, [])) if not b.deleted]

    def tokens_held(self, provider: str, model: str | None) -> int:
        """Enqueued tokens of ``provider``'s unfinished batches for ``model``."""
        return sum(
            o.tokens
            for o in self._lists.get(provider, [])
            if o.model == model and o.status in HOLDS_TOKENS and not o.deleted
        )

    def requests_held(self, provider: str, model: str | None) -> int:
        """Enqueued requests of ``provider``'s unfinished batches for ``model``."""
        return sum(
            len(o.reqs)
            for o in self._lists.get(provider, [])
            if o.model == model and o.status in HOLDS_TOKENS and not o.deleted
        )

    def cancel_batch(self, bid: str, provider: str = "openai") -> Batch:
        """``POST /v1/batches/{id}/cancel``; the first half of the requests count as done."""
        b = self.get_batch(bid, provider)
        if b.status not in CANCELLABLE:
            raise ApiError(400, f"Cannot cancel a batch with status '{b.status}'.")
        now = self.now()
        if b.status == "validating" and b.dialect.cancel_keeps_requests:
            if b.parsed is not None and not b.parsed.errors:
                b.reqs = b.parsed.reqs  # nothing ran: every request ends "canceled"
        n = len(b.reqs)
        if b.status == "validating":
            b.done = 0
        else:
            b.done = n if b.status == "finalizing" else max(n // 2, self._progress(b, now))
        b.parsed, b.status, b.phase_mono = None, "cancelling", now
        b.ts["cancelling_at"] = self.unix(now)
        self._schedule(b)
        return b

    def list_batches(
        self,
        limit: int,
        after: str | None,
        provider: str = "openai",
        render: Callable[[Batch], Json] | None = None,
    ) -> Json:
        """``GET /v1/batches``: newest first, cursor ``after`` (OpenAI-compatible providers)."""
        self.advance()
        render = render or self.batch_dict
        mine = self._lists.get(provider, [])
        start = len(mine)
        if after is not None:
            if after not in self._batches or self._batches[after].provider != provider:
                raise ApiError(400, f"Invalid 'after': no batch with id '{after}'.", "after")
            start = self._batches[after].pseq
        page = [render(b) for b in reversed(mine[max(0, start - limit) : start])]
        return {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": start - limit > 0,
        }

    def batches(self) -> list[Json]:
        """Snapshot of all batch objects, oldest first, with current status."""
        self.advance()
        return [self.batch_dict(b) for b in self._by_seq]

    def stats(self) -> Json:
        """Counters served at ``GET /_emulator/stats``.

        ``fault_counts`` (injected faults by knob) is present when a fault knob is on,
        ``webhooks`` (attempts/delivered/failed) when ``webhook_url`` is set.
        """
        by_status = dict(Counter(b["status"] for b in self.batches()))
        d = {"calls": dict(self.calls), "batches_created": self.batches_created}
        if self.config.faults.enabled():
            d["fault_counts"] = dict(self.fault_counts)
        if self.config.webhook_url:
            d["webhooks"] = dict(self.webhook_counts)
        return d | {"batches_by_status": by_status}

    def live_counts(self, b: Batch) -> tuple[int, int]:
        """(succeeded, failed) requests so far: live while running, final once terminal."""
        if b.status in HOLDS_TOKENS:  # live progress: a prefix of the requests is done
            k = b.done if b.status == "cancelling" else self._progress(b, self.now())
            return k - b.fail_prefix[k], b.fail_prefix[k]
        return b.counts

    def batch_dict(self, b: Batch) -> Json:
        """Render the OpenAI batch object."""
        (completed, failed), (n_in, n_out) = self.live_counts(b), b.usage
        usage = {"input_tokens": n_in, "input_tokens_details": {"cached_tokens": 0}}
        usage |= {"output_tokens": n_out, "output_tokens_details": {"reasoning_tokens": 0}}
        window = b.extra.get("completion_window", "24h")
        d = {"object": "batch", "completion_window": window, "expires_at": b.created_at + b.window}
        d |= {k: getattr(b, k) for k in BATCH_FIELDS} | {k: b.ts.get(k) for k in TIMESTAMPS}
        if d["model"] is None:  # not known before validation: absent (a string in the spec)
            del d["model"]
        counts = {"total": len(b.reqs), "completed": completed, "failed": failed}
        return d | {"request_counts": counts, "usage": usage | {"total_tokens": n_in + n_out}}

    # -- batches: lifecycle ----------------------------------------------------------------
    def _progress(self, b: Batch, t: float) -> int:
        span = self._dur(self.config.in_progress_seconds)
        if b.status != "in_progress" or span <= 0:
            return len(b.reqs)
        return int(len(b.reqs) * min(1.0, max(0.0, t - b.phase_mono) / span))

    def _expiry(self) -> float | None:
        after = self.config.expire_after_seconds
        if after is None or after >= self.config.in_progress_seconds:
            return None
        return self._dur(after)

    def _next_event(self, b: Batch) -> float | None:
        c = self.config
        if b.status == "validating":
            if b.parsed is None:
                return None
            return max(b.created_mono + self._dur(c.validating_seconds), b.parsed_mono)
        expiry = self._expiry()
        span = {
            "in_progress": self._dur(c.in_progress_seconds) if expiry is None else expiry,
            "finalizing": self._dur(c.finalizing_seconds),
            "cancelling": self._dur(c.cancelling_seconds),
        }.get(b.status)
        return None if span is None else b.phase_mono + span

    def _schedule(self, b: Batch) -> None:
        b.version += 1
        t = self._next_event(b)
        if t is not None:
            heapq.heappush(self._heap, (t, b.seq, b.version))

    def _on_parsed(self, b: Batch, fut: asyncio.Future[Parsed]) -> None:
        exc = None if fut.cancelled() else fut.exception()
        if fut.cancelled() or b.status != "validating":
            return
        if exc is not None:
            err = {"code": "invalid_file", "message": f"Could not read the input file: {exc}"}
            b.parsed = Parsed([], [err | {"param": None, "line": None}], None, 0)
        else:
            b.parsed = fut.result()
        b.parsed_mono = self.now()
        self._schedule(b)

    def advance(self) -> None:
        """Apply every lifecycle transition due by now, earliest first."""
        now = self.now()
        while self._heap and self._heap[0][0] <= now:
            t, seq, version = heapq.heappop(self._heap)
            b = self._by_seq[seq]
            if version == b.version:
                self._step(b, t)
                self._schedule(b)
                if b.status in TERMINAL and self.config.webhook_url and b.dialect.webhooks:
                    self.finished.append(b)

    def _step(self, b: Batch, t: float) -> None:
        if b.status == "validating":
            self._validate(b, t)
        elif b.status == "in_progress" and self._expiry() is not None:
            if any(r.expire for r in b.reqs):
                run = [r for r in b.reqs if not r.expire]
                lost = [r for r in b.reqs if r.expire]
            else:
                k = self._progress(b, t)
                run, lost = b.reqs[:k], b.reqs[k:]
            self._finish(b, t, "expired", run, lost, "expired")
        elif b.status == "in_progress":
            b.status, b.phase_mono, b.ts["finalizing_at"] = "finalizing", t, self.unix(t)
        elif b.status == "finalizing":
            self._finish(b, t, "completed", b.reqs, [], "canceled")
        elif b.status == "cancelling":
            self._finish(b, t, "cancelled", b.reqs[: b.done], b.reqs[b.done :], "canceled")

    def _validate(self, b: Batch, t: float) -> None:
        p, b.parsed = b.parsed, None
        assert p is not None
        b.model = p.model
        limit = self.config.token_limits.get(p.model or "")
        if not p.errors and limit is not None and b.dialect.token_limit_at_validation:
            held = self.tokens_held(b.provider, p.model)
            if held + p.tokens > limit:
                msg = (
                    f"Enqueued token limit reached for {p.model} in organization org-emulator. "
                    f"Limit: {limit} enqueued tokens. Please try again once some in_progress "
                    "batches have been completed."
                )
                err = {"code": "token_limit_exceeded", "message": msg, "param": None, "line": None}
                p.errors.append(err)
        req_limit = self.config.request_limits.get(p.model or "")
        if not p.errors and req_limit is not None and b.dialect.token_limit_at_validation:
            held = self.requests_held(b.provider, p.model)
            if held + len(p.reqs) > req_limit:
                # OpenAI's wording as users reported it; its error code was not reported.
                msg = (
                    f"Enqueued request limit reached for {p.model} in organization "
                    f"org-emulator. Limit: {req_limit:,} enqueued requests. Please try again "
                    "once some in_progress batches have been completed."
                )
                err = {"code": "request_limit_exceeded", "message": msg, "param": None}
                p.errors.append(err | {"line": None})
        if p.errors:
            b.status, b.ts["failed_at"] = "failed", self.unix(t)
            b.errors = {"object": "list", "data": p.errors}
            return
        b.reqs, b.tokens, b.status, b.phase_mono = p.reqs, p.tokens, "in_progress", t
        b.fail_prefix = list(itertools.accumulate((r.status >= 400 for r in p.reqs), initial=0))
        b.ts["in_progress_at"] = self.unix(t)

    def _finish(
        self, b: Batch, t: float, status: str, run: list[Req], lost: list[Req], why: str
    ) -> None:
        """Enter a terminal state, writing the result files (shuffled order, unless the dialect
        keeps input order); ``lost`` requests did not run, because of ``why``."""
        d = b.dialect
        items = [(r, None) for r in run] + [(r, why) for r in lost]
        if not d.ordered:
            shuffled = items[:]
            random.Random(f"{self.config.seed}:{b.seq}").shuffle(shuffled)
            if len(items) > 1 and shuffled == items:
                shuffled = shuffled[1:] + shuffled[:1]
            items = shuffled
        else:
            pos = {id(r): i for i, r in enumerate(b.reqs)}
            items.sort(key=lambda item: pos[id(item[0])])
        created, ids = self.unix(t), (new_id("file-"), new_id("file-"))
        n, n_in, n_out = [0, 0], 0, 0  # n[failed]: lines written to the output/error file
        with (self.data_dir / ids[0]).open("wb") as ok, (self.data_dir / ids[1]).open("wb") as err:
            for r, lost_why in items:
                outcome = outcome_of(r, lost_why)
                b.outcomes[outcome] += 1
                line, tokens = d.result_line(b, r, outcome, created)
                if line is None:
                    continue
                if outcome == "succeeded" and self.config.output_pad_bytes:
                    line = d.pad(line, "x" * self.config.output_pad_bytes)
                failed = outcome != "succeeded" and d.split_errors
                (err if failed else ok).write(orjson.dumps(line) + b"\n")
                n[failed] += 1
                n_in += r.tokens if outcome == "succeeded" else 0
                n_out += tokens
        b.output_file_id = self._result_file(b, ids[0], "output", n[0])
        keep = d.keep_empty_error_file and d.split_errors
        b.error_file_id = self._result_file(b, ids[1], "error", n[1], keep)
        b.counts, b.usage = (n[0], n[1]), (n_in, n_out)
        b.status, b.ts[f"{status}_at"] = status, created

    def _result_file(
        self, b: Batch, fid: str, kind: str, lines: int, keep: bool = False
    ) -> str | None:
        path = self.data_dir / fid
        if not lines and not keep:
            path.unlink()
            return None
        size, purpose = path.stat().st_size, b.dialect.output_purpose
        f = self.add_file(fid, f"{b.id}_{kind}.jsonl", purpose, size, b.output_ttl, b.provider)
        f.kind, f.lines = kind, lines
        return f.id
