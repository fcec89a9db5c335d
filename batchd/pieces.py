"""File work on pieces: split a job into batch-sized pieces, write the remainder of a
piece for another attempt, read what a batch's result files say, merge results.

All streaming (1 MiB reads, one line at a time through orjson), temp name + fsync +
rename for every file written, so a crash leaves either the old file or the new one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from batchd.jsonl import Limits, count_embedding_inputs

_CHUNK = 1 << 20
# A request that failed for a reason another attempt may not share.
RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
RETRYABLE_CODES = frozenset({"batch_expired", "server_error", "rate_limit_exceeded", "timeout"})


@dataclass(frozen=True)
class PieceFile:
    """One piece written by `split` (or `write_subset`)."""

    path: Path
    requests: int
    bytes: int
    est_tokens: int


def iter_lines(path: Path) -> Iterator[bytes]:
    """Yield every non-empty line of a file (without its newline), streaming."""
    with path.open("rb") as f:
        rest = b""
        while chunk := f.read(_CHUNK):
            buf = rest + chunk
            lines = buf.split(b"\n")
            rest = lines.pop()
            for line in lines:
                if line.strip():
                    yield line.rstrip(b"\r")
        if rest.strip():
            yield rest.rstrip(b"\r")


@contextmanager
def _atomic(dest: Path) -> Iterator[IO[bytes]]:
    tmp = dest.with_name(f".{dest.name}.tmp")
    with tmp.open("wb") as out:
        yield out
        out.flush()
        os.fsync(out.fileno())
    tmp.replace(dest)


def decompress(src: Path, dest: Path) -> int:
    """Stream a .gz or .zst file into `dest` (temp name, fsync, rename); returns its size.

    Raises ValueError naming the problem when the data is not valid for its format.
    """
    import gzip
    import zlib

    import zstandard

    n = 0
    try:
        with src.open("rb") as raw, _atomic(dest) as out:
            if src.name.endswith(".gz"):
                reader: IO[bytes] = gzip.GzipFile(fileobj=raw)  # type: ignore[assignment]
            else:
                reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
            with reader:
                while chunk := reader.read(_CHUNK):
                    out.write(chunk)
                    n += len(chunk)
    except (OSError, EOFError, zlib.error, zstandard.ZstdError) as e:
        if isinstance(e, OSError) and e.errno is not None:
            raise  # a real I/O error, not corrupt data
        dest.with_name(f".{dest.name}.tmp").unlink(missing_ok=True)
        kind = "gzip" if src.name.endswith(".gz") else "zstd"
        raise ValueError(f"not valid {kind} data: {e}") from None
    return n


def est_tokens(line: bytes) -> int:
    """Prompt-token estimate of one input line (the same measure for every piece)."""
    return len(line) // 4


class _Packer:
    """Where pieces are cut: a line starts a new piece when it would not fit the limits."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.n = self.size = self.inputs = self.tokens = 0

    def full(self, size: int, inputs: int) -> bool:
        lim = self.limits
        return self.n > 0 and (
            self.n + 1 > lim.max_requests
            or self.size + size > lim.max_bytes
            or self.inputs + inputs > lim.max_embedding_inputs
        )

    def add(self, size: int, inputs: int, tokens: int) -> None:
        self.n += 1
        self.size += size
        self.inputs += inputs
        self.tokens += tokens

    def reset(self) -> None:
        self.n = self.size = self.inputs = self.tokens = 0


def _lines(src: Path, embeddings: bool) -> Iterator[tuple[bytes, int]]:
    for line in iter_lines(src):
        yield line, count_embedding_inputs(orjson.loads(line)) if embeddings else 0


def plan(src: Path, limits: Limits, embeddings: bool) -> list[int]:
    """Requests per piece that `split` would write (nothing written)."""
    packer, out = _Packer(limits), []
    for line, n_inputs in _lines(src, embeddings):
        if packer.full(len(line) + 1, n_inputs):
            out.append(packer.n)
            packer.reset()
        packer.add(len(line) + 1, n_inputs, 0)
    if packer.n:
        out.append(packer.n)
    return out


def split(src: Path, out_dir: Path, limits: Limits, embeddings: bool) -> list[PieceFile]:
    """Cut `src` into pieces that each fit `limits`; deterministic, so a redo is identical."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pieces: list[PieceFile] = []
    packer = _Packer(limits)
    out: IO[bytes] | None = None
    tmp = dest = out_dir

    def close() -> None:
        assert out is not None
        out.flush()
        os.fsync(out.fileno())
        out.close()
        tmp.replace(dest)
        pieces.append(PieceFile(dest, packer.n, packer.size, packer.tokens))

    for line, n_inputs in _lines(src, embeddings):
        data = line + b"\n"
        if out is not None and packer.full(len(data), n_inputs):
            close()
            out = None
        if out is None:
            dest = out_dir / f"piece-{len(pieces):04d}.jsonl"
            tmp = dest.with_name(f".{dest.name}.tmp")
            out = tmp.open("wb")
            packer.reset()
        out.write(data)
        packer.add(len(data), n_inputs, est_tokens(line))
    if out is not None:
        close()
    return pieces


def write_subset(src: Path, custom_ids: set[str], dest: Path, key: str = "custom_id") -> PieceFile:
    """Write the lines of `src` whose `key` (custom_id) is in `custom_ids` to `dest`."""
    n = size = tokens = 0
    with _atomic(dest) as out:
        for line in iter_lines(src):
            if orjson.loads(line).get(key) in custom_ids:
                out.write(line + b"\n")
                n += 1
                size += len(line) + 1
                tokens += est_tokens(line)
    return PieceFile(dest, n, size, tokens)


def custom_ids(path: Path, key: str = "custom_id") -> list[str]:
    """Request ids (`key`: custom_id, Gemini's key) of an input file, in order."""
    return [str(orjson.loads(line).get(key)) for line in iter_lines(path)]


@dataclass
class Outcome:
    """What one attempt's result files say about its requests."""

    succeeded: set[str] = field(default_factory=set)
    retryable: set[str] = field(default_factory=set)  # failed, but another attempt may work
    failed: set[str] = field(default_factory=set)  # failed for good (e.g. HTTP 400)
    expired: set[str] = field(default_factory=set)  # not run before the window ended
    canceled: set[str] = field(default_factory=set)  # not run: the batch was cancelled

    def seen(self) -> set[str]:
        """Every request id a result line named."""
        return self.succeeded | self.retryable | self.failed | self.expired | self.canceled

    def again(self) -> set[str]:
        """Requests worth another attempt (failed for a passing reason, or not run)."""
        return self.retryable | self.expired | self.canceled


def _is_retryable(rec: dict[str, Any]) -> bool:
    err = rec.get("error")
    if isinstance(err, dict) and err.get("code") in RETRYABLE_CODES:
        return True
    resp = rec.get("response")
    if isinstance(resp, dict):
        status = resp.get("status_code")
        return isinstance(status, int) and (status in RETRYABLE_STATUS or status >= 500)
    return resp is None and err is None


def classify_error(line: bytes) -> tuple[str, bool]:
    """(custom_id, retryable) of one line of an error file."""
    rec = orjson.loads(line)
    return str(rec.get("custom_id")), _is_retryable(rec)


def read_outcome(output: Path | None, errors: Path | None, key: str = "custom_id") -> Outcome:
    """Classify every request id seen in an attempt's output and error files (OpenAI's
    error lines; other providers' output lines are read by `key` alone)."""
    out = Outcome()
    if output is not None and output.exists():
        for line in iter_lines(output):
            out.succeeded.add(str(orjson.loads(line).get(key)))
    if errors is not None and errors.exists():
        for line in iter_lines(errors):
            rec = orjson.loads(line)
            cid = str(rec.get("custom_id"))
            if cid in out.succeeded:
                continue
            (out.retryable if _is_retryable(rec) else out.failed).add(cid)
    return out


def first_record(path: Path) -> dict[str, Any] | None:
    """The first line of a JSONL file, parsed (None when absent or empty)."""
    if not path.exists():
        return None
    for line in iter_lines(path):
        rec = orjson.loads(line)
        return rec if isinstance(rec, dict) else None
    return None


def filter_lines(src: Path, dest: Path, drop: set[str], key: str = "custom_id") -> None:
    """Copy result lines whose `key` (custom_id) is not in `drop` (e.g. ones retried later)."""
    with _atomic(dest) as out:
        for line in iter_lines(src):
            if orjson.loads(line).get(key) not in drop:
                out.write(line + b"\n")


def concat(parts: Iterable[Path], dest: Path) -> int:
    """Concatenate files into `dest`; returns the number of bytes written."""
    n = 0
    with _atomic(dest) as out:
        for p in parts:
            with p.open("rb") as f:
                while chunk := f.read(_CHUNK):
                    out.write(chunk)
                    n += len(chunk)
    return n


def reorder(src: Path, order: list[str], dest: Path, key: str = "custom_id") -> None:
    """Write `src`'s lines into `dest` in the order of `order` (request ids by `key`).

    Holds only (position, offset, length) per line in memory, not the lines.
    """
    pos = {cid: i for i, cid in enumerate(order)}
    index: list[tuple[int, int, int]] = []
    offset = 0
    with src.open("rb") as f:
        for raw in f:
            if raw.strip():
                cid = orjson.loads(raw).get(key)
                index.append((pos.get(str(cid), len(pos)), offset, len(raw)))
            offset += len(raw)
        index.sort()
        with _atomic(dest) as out:
            for _, off, length in index:
                f.seek(off)
                line = f.read(length)
                out.write(line if line.endswith(b"\n") else line + b"\n")


def split_lines(src: Path, ok: list[bool], output: Path, errors: Path) -> None:
    """Split one stream of results into `output` (line i where ok[i]) and `errors` (the
    rest): both written (possibly empty), each atomically."""
    with _atomic(output) as good, _atomic(errors) as bad:
        for i, line in enumerate(iter_lines(src)):
            (good if i < len(ok) and ok[i] else bad).write(line + b"\n")


def missing_lines(ids: Iterable[str], message: str) -> bytes:
    """Error lines for requests that never got a result (so every request is accounted for)."""
    return b"".join(
        orjson.dumps(
            {
                "id": None,
                "custom_id": cid,
                "response": None,
                "error": {"code": "batchd_no_result", "message": message},
            }
        )
        + b"\n"
        for cid in ids
    )
