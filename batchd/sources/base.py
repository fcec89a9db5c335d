"""The Source interface and what every source shares: a message becomes a job.

A message carries `name` and either `jsonl` (the file's content) or `path` (a file
batchd can read), and optionally `metadata` (a JSON object of strings). Taking a
read's messages (`record`):

1. each id is looked up first: a message already recorded (redelivered after a crash
   between the record and the ack) is acknowledged again, never made a second job;
2. its content is written to `processing/JOB--NAME.jsonl.part` and fsynced (a crash
   before the record leaves the .part of an unrecorded job, which intake removes);
3. the jobs are recorded with the source's name and the message ids in one
   transaction (`jobs_source_msg` is unique), made durable (a WAL fsync);
4. only then are the messages acknowledged. An invalid message is recorded as a job
   that fails at once (failed/NAME/report.json), copied to the dead-letter stream or
   exchange, and acknowledged: it is never redelivered for ever.
"""

from __future__ import annotations

import asyncio
import errno
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from ulid import ULID

from batchd import jobmeta
from batchd.spool import COMPRESSED, check_name, fsync_dir, input_suffix
from batchd.store import Duplicate, Job, NewJob

if TYPE_CHECKING:
    from batchd.config import SourceConfig
    from batchd.spool import Spool
    from batchd.stages import Context

INVALID = "invalid_message"  # the reason of a job made from an invalid message
_CHUNK = 1 << 20
# Reading `path` failed for a reason that will not go away by itself: the message is
# invalid. Any other OSError (EIO, ESTALE, a full spool) is the stage's to retry.
_PERMANENT = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.ELOOP}


class Unavailable(Exception):
    """The broker cannot be reached or refused an operation; the stage reconnects later."""


@dataclass(frozen=True)
class Message:
    """One message as read from a broker. `fields` holds `name`, `jsonl`, `path` and
    `metadata` as the producer sent them; `token` is what the broker needs to ack it."""

    id: str
    fields: Mapping[str, bytes]
    redelivered: bool = False
    token: Any = None


@dataclass(frozen=True)
class Take:
    """A valid message: what the job is made of."""

    name: str
    jsonl: bytes | None
    path: Path | None
    metadata: dict[str, str]


@dataclass(frozen=True)
class Invalid:
    """Why a message cannot become a job (`name` is the job name its report gets)."""

    name: str
    code: str
    message: str


class Broker(ABC):
    """One source's connection to its broker: read, acknowledge, dead-letter, publish."""

    @abstractmethod
    async def connect(self) -> None:
        """Connect; create the consumer group / declare the queue when missing."""

    @abstractmethod
    async def close(self) -> None:
        """Disconnect (never raises); messages read but not acked are delivered again."""

    @abstractmethod
    async def fetch(self, limit: int, wait: float) -> list[Message]:
        """Up to `limit` messages, waiting up to `wait` seconds for the first; messages
        left pending by a crash (or by a dead consumer) come first."""

    @abstractmethod
    async def pause(self) -> None:
        """Stop deliveries while the source has no room (back-pressure)."""

    @abstractmethod
    async def ack(self, msgs: list[Message]) -> None:
        """Acknowledge messages whose jobs are durably recorded."""

    @abstractmethod
    async def dead_letter(self, msg: Message, report: Mapping[str, Any]) -> None:
        """Copy an invalid message, with why, to the dead-letter stream / exchange."""

    @abstractmethod
    async def publish(self, job_id: str, state: str, body: Mapping[str, Any]) -> None:
        """Publish one job's outcome to `results` (job id as the message id)."""

    @abstractmethod
    async def probe(self) -> str:
        """For `batchd check`: reachable and in what shape, creating nothing."""


# --- a message, decided ------------------------------------------------------------------


def _text(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    return raw.decode("utf-8", "replace")


def _default_name(path: str | None, source: str) -> str:
    """A job NAME when the message gives none: the file name of `path`, else the source's."""
    if path:
        base = os.path.basename(path)
        suffix = input_suffix(base)
        stem = base[: -len(suffix)] if suffix else base
        try:
            return check_name(stem)
        except ValueError:
            pass
    return source


def _check_path(text: str, root: Path | None) -> Path:
    """The file a `path` names; relative paths resolve against `root`. Raises ValueError."""
    if "\x00" in text or not text:
        raise ValueError("path: not a file name")
    p = Path(text)
    if not p.is_absolute():
        if root is None:
            raise ValueError(f"path {text!r}: must be absolute")
        p = root / p
    if root is not None:
        real, top = os.path.realpath(p), os.path.realpath(root)
        if os.path.commonpath([real, top]) != top:
            raise ValueError(f"path {text!r}: outside [sources] path_root {root}")
    return p


def parse(msg: Message, source: str, fixed: Mapping[str, str], root: Path | None) -> Take | Invalid:
    """Decide what a message is (pure): a job to make, or invalid and why."""
    f = msg.fields
    path = _text(f.get("path"))
    raw_name = _text(f.get("name"))
    name = _default_name(path, source)
    if raw_name is not None:
        try:
            name = check_name(raw_name)
        except ValueError as e:
            return Invalid(source, "invalid_name", str(e))
    if "jsonl" in f and path is not None:
        return Invalid(name, "ambiguous_content", "a message carries jsonl or path, not both")
    if "jsonl" not in f and path is None:
        return Invalid(name, "missing_content", "a message carries jsonl (the file) or path")
    meta: dict[str, str] = {}
    if (raw_meta := f.get("metadata")) is not None:
        try:
            meta = jobmeta.check(orjson.loads(raw_meta), fixed)
        except orjson.JSONDecodeError:
            return Invalid(name, "invalid_metadata", "metadata is not valid JSON")
        except jobmeta.InvalidMetadata as e:
            return Invalid(name, "invalid_metadata", str(e))
    if path is not None:
        try:
            return Take(name, None, _check_path(path, root), meta)
        except ValueError as e:
            return Invalid(name, "invalid_path", str(e))
    return Take(name, f["jsonl"], None, meta)


def invalid_reason(inv: Invalid, source: str, msg_id: str) -> dict[str, Any]:
    """The failure report (reason) of a job made from an invalid message."""
    return {
        "reason": INVALID,
        "code": inv.code,
        "message": inv.message,
        "source": source,
        "message_id": msg_id,
    }


# --- writing the input ---------------------------------------------------------------------


def _write_bytes(dest: Path, data: bytes) -> None:
    with dest.open("xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _copy(src: Path, dest: Path) -> None:
    """Copy (decompressing .gz/.zst) `src` into a new file `dest`, fsynced. Raises OSError,
    or ValueError for corrupt compressed data."""
    import gzip
    import zlib

    import zstandard

    name = src.name.lower()
    with src.open("rb") as raw, dest.open("xb") as out:
        try:
            if name.endswith(COMPRESSED) or name.endswith((".ndjson.gz", ".ndjson.zst")):
                if name.endswith(".gz"):
                    reader: Any = gzip.GzipFile(fileobj=raw)
                else:
                    dctx = zstandard.ZstdDecompressor()
                    reader = dctx.stream_reader(raw, read_across_frames=True)
            else:
                reader = raw
            while chunk := reader.read(_CHUNK):
                out.write(chunk)
        except (EOFError, zlib.error, zstandard.ZstdError, gzip.BadGzipFile) as e:
            raise ValueError(f"{src.name}: not valid compressed data ({e})") from None
        out.flush()
        os.fsync(out.fileno())


# --- recording a read --------------------------------------------------------------------


@dataclass
class Recorded:
    """What became of one message: its job, and whether it was known already or invalid."""

    msg: Message
    job_id: str
    name: str = ""
    known: bool = False
    reason: dict[str, Any] | None = None  # set for an invalid message

    @property
    def invalid(self) -> bool:
        """True when the message was invalid (its job fails at once)."""
        return self.reason is not None and self.reason.get("reason") == INVALID


def _known(msg: Message, job: Job) -> Recorded:
    return Recorded(msg, job.id, job.name, known=True, reason=job.reason)


@dataclass
class _Plan:
    rec: Recorded
    new: NewJob
    files: list[Path] = field(default_factory=list)


def _prepare(spool: Spool, scfg: SourceConfig, fixed: Mapping[str, str], msg: Message) -> _Plan:
    """Write a new message's input (and metadata) into the spool, fsynced; decide its job.
    Blocking: the messages of a read are prepared in threads at once (their fsyncs
    overlap: ~0.5 ms a file instead of ~2.5 ms one after another)."""
    job_id = str(ULID())
    taken = parse(msg, scfg.name, fixed, scfg.path_root)
    stem = taken.name
    rel = f"processing/{job_id}--{stem}.jsonl.part"
    dest = spool.path(rel)
    files = [dest]
    if isinstance(taken, Take):
        try:
            if taken.path is not None:
                _copy(taken.path, dest)
            else:
                _write_bytes(dest, taken.jsonl or b"")
        except ValueError as e:
            dest.unlink(missing_ok=True)
            taken = Invalid(stem, "invalid_compression", str(e))
        except OSError as e:
            dest.unlink(missing_ok=True)
            if e.errno not in _PERMANENT or taken.path is None:
                raise  # the spool's problem or a passing one: the stage retries
            taken = Invalid(stem, "unreadable_path", f"{taken.path}: {e.strerror or e}")
        else:
            if taken.metadata:
                files.append(spool.processing / f"{job_id}.d")
                jobmeta.write(spool, job_id, taken.metadata)
    elif (content := msg.fields.get("jsonl")) is not None:
        _write_bytes(dest, content)  # kept as failed/NAME/input.jsonl for whoever looks
    reason = invalid_reason(taken, scfg.name, msg.id) if isinstance(taken, Invalid) else None
    rec = Recorded(msg, job_id, reason=reason)
    return _Plan(
        rec,
        NewJob(
            job_id, stem, rel, scfg.name, source_msg=msg.id, reason=reason, provider=scfg.provider
        ),
        files,
    )


def _discard(plan: _Plan) -> None:
    import shutil

    for p in plan.files:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


async def record(ctx: Context, scfg: SourceConfig, msgs: list[Message]) -> list[Recorded]:
    """Record the jobs of one read (see the module docstring); when this returns, every
    message's job is durable and the messages may be acknowledged."""
    store = ctx.store
    out: list[Recorded | Message] = []
    first: set[str] = set()
    for msg in msgs:
        if msg.id in first:  # the same message twice in one read (content-hash ids)
            out.append(Recorded(msg, "", known=True))
            continue
        job = await store.job_by_source_msg(scfg.name, msg.id)
        if job is not None:
            out.append(_known(msg, job))
            continue
        first.add(msg.id)
        out.append(msg)
    fixed = ctx.cfg.batch.metadata
    todo = [m for m in out if isinstance(m, Message)]
    done = await asyncio.gather(
        *(asyncio.to_thread(_prepare, ctx.spool, scfg, fixed, m) for m in todo),
        return_exceptions=True,
    )
    plans = [p for p in done if isinstance(p, _Plan)]
    failed = [e for e in done if isinstance(e, BaseException)]
    if failed:
        for plan in plans:
            _discard(plan)
        raise failed[0]
    by_msg = {id(p.rec.msg): p.rec for p in plans}
    recs = [by_msg[id(m)] if isinstance(m, Message) else m for m in out]
    for rec in recs:  # a duplicate within the read points at the first one's job
        if rec.known and not rec.job_id:
            twin = next(p.rec for p in plans if p.rec.msg.id == rec.msg.id)
            rec.job_id = twin.job_id
    if not plans:
        return recs
    fsync_dir(ctx.spool.processing)  # the inputs' names are durable before their records
    # Files are removed only when their job is known not to be recorded: after anything
    # else (a cancellation may land after a commit) a .part of an unrecorded job is
    # removed by intake at the next start.
    try:
        names = await store.create_jobs([p.new for p in plans], ctx.spool.dir_taken)
    except Duplicate:
        # Recorded meanwhile (two daemons on one database): one at a time, so each
        # message either gets its job or is recognised.
        names = {}
        for plan in plans:
            try:
                names |= await store.create_jobs([plan.new], ctx.spool.dir_taken)
            except Duplicate:
                _discard(plan)
                job = await store.job_by_source_msg(scfg.name, plan.rec.msg.id)
                if job is None:
                    raise
                plan.rec.job_id, plan.rec.name = job.id, job.name
                plan.rec.known, plan.rec.reason = True, job.reason
    for rec in recs:
        rec.name = names.get(rec.job_id, rec.name)
    await store.durable()
    ctx.wake_submit.set()
    return recs
