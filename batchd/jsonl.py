"""Streaming validation of Batch API input files (JSONL) against OpenAI's rules.

The hot path is one ``orjson.loads`` per line on the raw bytes: orjson validates
UTF-8 and rejects NUL bytes, BOMs and blank input itself, so the (rare) failing
lines are diagnosed afterwards and valid lines pay for nothing else.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

__all__ = [
    "ENDPOINTS",
    "UNBOUNDED",
    "Limits",
    "Problem",
    "Summary",
    "Validator",
    "count_embedding_inputs",
    "format_problem",
    "validate_path",
]

ENDPOINTS: Final[frozenset[str]] = frozenset(
    {
        "/v1/responses",
        "/v1/chat/completions",
        "/v1/embeddings",
        "/v1/completions",
        "/v1/moderations",
        "/v1/images/generations",
        "/v1/images/edits",
        "/v1/videos",
    }
)

_EMBEDDINGS: Final = "/v1/embeddings"
_BOM: Final = b"\xef\xbb\xbf"
_CHUNK: Final = 1024 * 1024
_SHOW: Final = 60  # max characters of user data quoted in one message


@dataclass(frozen=True)
class Limits:
    """Per-file limits of the Batch API."""

    max_requests: int = 50_000
    max_bytes: int = 200 * 1024 * 1024
    max_embedding_inputs: int = 50_000


# No per-file limit: for a file that is split into pieces, each within the limits.
UNBOUNDED: Final = Limits(1 << 62, 1 << 62, 1 << 62)


@dataclass(frozen=True)
class Problem:
    """One validation problem; ``line`` is 1-based, 0 for whole-file problems."""

    line: int
    code: str
    message: str


@dataclass
class Summary:
    """Result of validating one input file."""

    requests: int = 0
    bytes: int = 0
    endpoint: str | None = None
    model: str | None = None
    embedding_inputs: int = 0
    est_tokens: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems


def _show(value: object) -> str:
    """Render user data for a message, truncated to a few dozen characters."""
    if isinstance(value, str):
        text = orjson.dumps(value[: _SHOW + 1]).decode()
    elif value is None or isinstance(value, bool):
        return "null" if value is None else str(value).lower()
    elif isinstance(value, int | float):
        text = repr(value)
    else:
        return f"a JSON {_json_type(value)}"
    return text if len(text) <= _SHOW else text[: _SHOW - 3] + "..."


def count_embedding_inputs(request: dict[str, Any]) -> int:
    """Embedding inputs of one request line (a string is 1, a list of strings its length)."""
    body = request.get("body")
    return _count_inputs(body.get("input")) if isinstance(body, dict) else 0


def _count_inputs(value: object) -> int:
    """Number of embedding inputs in a ``body.input`` value."""
    if isinstance(value, list):
        if value and isinstance(value[0], int):
            return 1  # one input given as token ids
        return len(value)
    return 1 if value is not None else 0


class Validator:
    """Incremental: feed raw bytes chunks in order (e.g. while uploading), then finish()."""

    def __init__(
        self,
        limits: Limits = Limits(),
        max_problems: int = 100,
        on_request: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        """Create a validator enforcing ``limits``, keeping at most ``max_problems`` problems;
        ``on_request`` sees every line parsed as a JSON object (e.g. a cost estimator: the
        line is parsed once, here)."""
        self.limits = limits
        self.max_problems = max_problems
        self._on_request = on_request
        self._summary = Summary()
        self._pending: list[bytes] = []  # parts of the current, unterminated line
        self._lines = 0
        self._seen: dict[str, int] = {}
        self._line_problems = 0
        self._reported_count = False
        self._reported_inputs = False
        self._finished = False

    # -- problems ---------------------------------------------------------------

    def _add(self, line: int, code: str, message: str) -> None:
        if self._line_problems < self.max_problems:
            self._line_problems += 1
            self._summary.problems.append(Problem(line, code, message))

    def _limit(self, line: int, code: str, message: str) -> None:
        """Record a limit problem; these are kept even past ``max_problems``."""
        self._summary.problems.append(Problem(line, code, message))

    # -- feeding ----------------------------------------------------------------

    def feed(self, chunk: bytes) -> None:
        """Consume the next chunk of the file; chunks may split lines anywhere."""
        if self._finished:
            raise RuntimeError("feed() after finish()")
        if not chunk:
            return
        self._summary.bytes += len(chunk)
        find = chunk.find
        end = find(b"\n")
        if end < 0:
            self._pending.append(chunk)
            return
        # Slices of a memoryview are zero-copy; orjson parses them directly.
        view = memoryview(chunk)
        if self._pending:
            self._pending.append(chunk[:end])
            self._line(b"".join(self._pending))
            self._pending = []
        else:
            self._line(view[:end])
        check = self._line
        pos = end + 1
        while (end := find(b"\n", pos)) >= 0:
            check(view[pos:end])
            pos = end + 1
        if pos < len(chunk):
            self._pending.append(chunk[pos:])

    def finish(self) -> Summary:
        """Validate the last (unterminated) line and the whole-file rules; return the Summary."""
        if self._finished:
            return self._summary
        self._finished = True
        if self._pending:
            self._line(b"".join(self._pending))
            self._pending = []
        s, lim = self._summary, self.limits
        if s.bytes == 0:
            self._limit(0, "empty_file", "the file is empty")
        if s.bytes > lim.max_bytes:
            msg = f"the file is {s.bytes} bytes, over the limit of {lim.max_bytes} bytes"
            self._limit(0, "file_too_large", msg)
        s.requests = self._lines
        s.problems.sort(key=lambda p: p.line)  # stable: whole-file problems first
        self._seen = {}
        return s

    # -- one line ---------------------------------------------------------------

    def _line(self, line: bytes | memoryview) -> None:
        n = self._lines = self._lines + 1
        size = len(line)
        if size and line[-1] == 13:  # b"\r": CRLF line ending
            size -= 1
        self._summary.est_tokens += size // 4
        if n > self.limits.max_requests and not self._reported_count:
            self._reported_count = True
            msg = f"more than {self.limits.max_requests} requests in one file"
            self._limit(n, "too_many_requests", msg)
        if n == 1 and line[:3] == _BOM:
            self._add(1, "bom", "the file starts with a UTF-8 byte order mark (BOM)")
            line = line[3:]
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            self._diagnose(n, line, exc)
            return
        if type(obj) is not dict:
            self._add(n, "not_object", f"the line is a JSON {_json_type(obj)}, not an object")
            return
        self._request(n, obj)
        if self._on_request is not None:
            self._on_request(obj)

    def _diagnose(self, n: int, view: bytes | memoryview, exc: orjson.JSONDecodeError) -> None:
        """Classify a line orjson rejected."""
        line = bytes(view)
        if not line.strip():
            self._add(n, "blank_line", "blank line")
        elif b"\x00" in line:
            self._add(n, "nul_byte", f"NUL byte at byte {line.index(0) + 1} of the line")
        else:
            try:
                line.decode()
            except UnicodeDecodeError as err:
                self._add(n, "invalid_utf8", f"invalid UTF-8 at byte {err.start + 1} of the line")
                return
            self._add(n, "invalid_json", f"invalid JSON at column {exc.colno}: {exc.msg[:100]}")

    def _request(self, n: int, obj: dict[str, Any]) -> None:
        """Check the fields of one parsed request line."""
        cid = obj.get("custom_id")
        if cid is None and "custom_id" not in obj:
            self._add(n, "missing_custom_id", "no custom_id")
        elif not isinstance(cid, str) or not cid:
            self._add(
                n, "invalid_custom_id", f"custom_id must be a non-empty string, not {_show(cid)}"
            )
        elif (first := self._seen.setdefault(cid, n)) != n:
            msg = f"custom_id {_show(cid)} already used on line {first}"
            self._add(n, "duplicate_custom_id", msg)
        if obj.get("method") != "POST":
            method = _show(obj["method"]) if "method" in obj else "missing"
            self._add(n, "invalid_method", f'method must be "POST", got {method}')
        url = obj.get("url")
        s = self._summary
        if not isinstance(url, str) or url not in ENDPOINTS:
            got = _show(url) if "url" in obj else "missing"
            self._add(n, "invalid_url", f"url must be a batch endpoint, got {got}")
            url = None
        elif s.endpoint is None:
            s.endpoint = url
        elif url != s.endpoint:
            msg = f"url {_show(url)} differs from the first line's {_show(s.endpoint)}"
            self._add(n, "url_mismatch", msg)
        if "body" not in obj:
            self._add(n, "missing_body", "no body")
            return
        body = obj["body"]
        if type(body) is not dict:
            self._add(n, "invalid_body", f"body must be an object, got a JSON {_json_type(body)}")
            return
        self._body(n, body, url)

    def _body(self, n: int, body: dict[str, Any], url: str | None) -> None:
        s = self._summary
        model = body.get("model")
        if not isinstance(model, str) or not model:
            self._add(n, "missing_model", "body has no string model")
        elif s.model is None:
            s.model = model
        elif model != s.model:
            msg = f"model {_show(model)} differs from the first line's {_show(s.model)}"
            self._add(n, "model_mismatch", msg)
        if url == _EMBEDDINGS:
            s.embedding_inputs += _count_inputs(body.get("input"))
            limit = self.limits.max_embedding_inputs
            if s.embedding_inputs > limit and not self._reported_inputs:
                self._reported_inputs = True
                msg = f"more than {limit} embedding inputs in one batch"
                self._limit(n, "too_many_embedding_inputs", msg)


def _json_type(value: object) -> str:
    """JSON name of a parsed value's type."""
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return "null" if value is None else "object"


def _open_nofollow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW)


def validate_path(
    path: str | os.PathLike[str],
    limits: Limits = Limits(),
    max_problems: int = 100,
    *,
    nofollow: bool = False,
    on_request: Callable[[dict[str, Any]], None] | None = None,
) -> Summary:
    """Stream the file through a Validator (1 MiB chunks).

    With ``nofollow`` a symbolic link is never followed: opening one raises OSError
    (ELOOP). ``on_request``: see Validator.
    """
    validator = Validator(limits, max_problems, on_request)
    opener = _open_nofollow if nofollow else None
    with open(path, "rb", buffering=0, opener=opener) as f:
        while chunk := f.read(_CHUNK):
            validator.feed(chunk)
    return validator.finish()


def format_problem(filename: str, p: Problem) -> str:
    """Render a problem as ``file:line: code: message`` (compiler style)."""
    return f"{filename}:{p.line}: {p.code}: {p.message}"
