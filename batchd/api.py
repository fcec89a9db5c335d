"""The Batch API client (aiohttp): files, batches, downloads; typed errors; one retry policy.

Retry policy: 429 (honouring Retry-After / retry-after-ms), 5xx and connection errors
are retried with jittered exponential backoff; every other 4xx is raised at once.
`create_batch` never retries an error whose outcome is unknown (5xx, dropped
connection): the caller reconciles by metadata before creating again.
"""

from __future__ import annotations

import asyncio
import os
import random
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import orjson
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
)

from batchd import transport
from batchd.config import ApiConfig
from batchd.logs import redact_text
from batchd.metrics import Metrics

T = TypeVar("T")

_SYNC_EVERY = 8 << 20  # bytes of a download written between background fdatasyncs
ATTEMPT_KEY = "batchd_attempt"  # metadata key carrying batchd's attempt id on every batch


class ApiError(Exception):
    """An error from the Batch API (or from reaching it)."""

    def __init__(
        self,
        message: str,
        status: int = 0,
        code: str | None = None,
        type: str | None = None,
        param: str | None = None,
    ) -> None:
        self.message = redact_text(message)
        super().__init__(self.message)
        self.status, self.code, self.type, self.param = status, code, type, param

    def to_dict(self) -> dict[str, Any]:
        """The API's error envelope fields."""
        return {
            "status": self.status,
            "message": self.message,
            "code": self.code,
            "type": self.type,
            "param": self.param,
        }


class Transient(ApiError):
    """5xx, timeout or dropped connection: worth retrying; outcome of a write unknown."""


class RateLimited(Transient):
    """429: retry after `retry_after` seconds; the request was not acted on."""

    def __init__(self, message: str, retry_after: float | None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class TlsError(Transient):
    """The TLS handshake failed (unknown CA, name mismatch, expired, client certificate
    required): not retried within a call; the stage tries again later."""

    def __init__(self, op: str, cause: str) -> None:
        super().__init__(f"{op}: {cause}")
        self.cause = cause


class InvalidRequest(ApiError):
    """400 and other 4xx not listed below: retrying would not help."""


class AccessDenied(InvalidRequest):
    """The operator's problem, not a job's: no job can get through until it is fixed
    (a missing, wrong or revoked key; an API root that is not one). Jobs wait."""


class AuthError(AccessDenied):
    """401/403: the key is missing, wrong, or lacks permission."""


class WrongEndpoint(AccessDenied):
    """404 from a route that always exists: `[api] base_url` does not point at the API
    (typically a missing `/v1`)."""


class NotFound(InvalidRequest):
    """404: unknown id."""


# Operations on routes without an id: a 404 there means the base URL is wrong.
_FIXED_ROUTES = frozenset(
    {"upload_file", "create_upload", "create_batch", "list_batches", "list_files"}
)


def _retry_after(headers: Mapping[str, str]) -> float | None:
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return float(ms) / 1000
        except ValueError:
            pass
    s = headers.get("retry-after")
    if s:
        try:
            return float(s)
        except ValueError:
            return None
    return None


def _error_from(
    status: int, body: bytes, headers: Mapping[str, str], op: str = "", url: str = ""
) -> ApiError:
    err: dict[str, Any] = {}
    try:
        parsed = orjson.loads(body)
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
            err = parsed["error"]
    except orjson.JSONDecodeError:
        pass
    msg = str(err.get("message") or body[:200].decode("utf-8", "replace") or f"HTTP {status}")
    kw: dict[str, Any] = {
        "status": status,
        "code": err.get("code"),
        "type": err.get("type"),
        "param": err.get("param"),
    }
    if status == 429:
        return RateLimited(msg, _retry_after(headers), **kw)
    if status >= 500:
        return Transient(msg, **kw)
    if status in (401, 403):
        return AuthError(msg, **kw)
    if status == 404 and op in _FIXED_ROUTES:
        hint = f"{url} answered 404 ({msg}); does [api] base_url end in /v1?"
        return WrongEndpoint(hint, **kw)
    if status == 404:
        return NotFound(msg, **kw)
    return InvalidRequest(msg, **kw)


class BatchApi:
    """A client for /v1/files, /v1/batches; one aiohttp session, typed errors, retries."""

    def __init__(
        self,
        cfg: ApiConfig,
        api_key: str | None,
        metrics: Metrics,
        max_backoff_seconds: float = 30.0,
    ) -> None:
        self._cfg = cfg
        self._base = cfg.base_url.rstrip("/")
        headers = {"User-Agent": "batchd"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        if cfg.organization:
            headers["OpenAI-Organization"] = cfg.organization
        if cfg.project:
            headers["OpenAI-Project"] = cfg.project
        self._headers = headers
        self._metrics = metrics
        self._max_backoff = max_backoff_seconds
        self._session: aiohttp.ClientSession | None = None
        # Read once, as the SDK does: the environment's proxy variables or [api] proxy.
        self._proxy, self._proxy_auth = transport.split_proxy(transport.proxy_for(cfg))

    def set_key(self, api_key: str | None) -> None:
        """Use another API key from now on (re-read after a rotation or an outage)."""
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        else:
            self._headers.pop("Authorization", None)
        if self._session is not None:
            self._session.headers.clear()
            self._session.headers.update(self._headers)

    async def __aenter__(self) -> BatchApi:
        t = self._cfg.request_timeout_seconds
        # trust_env stays off: the proxy is resolved above (once, not per request in a
        # thread), and aiohttp's ~/.netrc lookup would clash with our Authorization header.
        self._session = aiohttp.ClientSession(
            headers=self._headers,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=t, sock_read=t),
            connector=aiohttp.TCPConnector(ssl=self._ssl()),
        )
        return self

    def _ssl(self) -> ssl.SSLContext | bool:
        cfg = self._cfg
        if cfg.ca_file is None and cfg.client_cert_file is None:
            return True  # aiohttp's default context: the system's CAs and $SSL_CERT_FILE
        return transport.ssl_context(cfg)

    @property
    def proxy(self) -> str | None:
        """The proxy every call goes through (credentials removed), or None."""
        return self._proxy

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        """The live session (enter the client first)."""
        if self._session is None:
            raise RuntimeError("BatchApi used outside `async with`")
        return self._session

    # --- plumbing ---------------------------------------------------------------------

    def _delay(self, exc: BaseException | None, attempt: int) -> float:
        """Seconds before retrying after failed try number `attempt`: jittered
        exponential (as tenacity's wait_random_exponential), at least Retry-After."""
        base = random.uniform(0, min(self._max_backoff, 0.5 * 2 ** (attempt - 1)))
        if isinstance(exc, RateLimited) and exc.retry_after is not None:
            return max(exc.retry_after, min(base, 1.0))
        return base

    def _count_retry(self, exc: BaseException | None) -> None:
        reason = "rate_limited" if isinstance(exc, RateLimited) else "transient"
        self._metrics.retries.labels(reason).inc()

    async def _retrying(
        self, fn: Callable[[], Awaitable[T]], retry_on: tuple[type[BaseException], ...]
    ) -> T:
        """Call `fn`, retrying `retry_on` errors up to `[api] max_retries` tries in all.

        The first try runs without tenacity's machinery (most calls succeed at once:
        the tracker makes hundreds a second); tenacity takes over from the second."""

        def retryable(e: BaseException) -> bool:
            return isinstance(e, retry_on) and not isinstance(e, TlsError)

        try:
            return await fn()
        except Exception as e:
            if not retryable(e) or self._cfg.max_retries <= 1:
                raise
            self._count_retry(e)
            await asyncio.sleep(self._delay(e, 1))

        def wait(state: RetryCallState) -> float:  # tries counted from the second
            exc = state.outcome.exception() if state.outcome else None
            return self._delay(exc, state.attempt_number + 1)

        def before_sleep(state: RetryCallState) -> None:
            self._count_retry(state.outcome.exception() if state.outcome else None)

        async for attempt in AsyncRetrying(
            retry=retry_if_exception(retryable),
            stop=stop_after_attempt(self._cfg.max_retries - 1),
            wait=wait,
            before_sleep=before_sleep,
            reraise=True,
        ):
            with attempt:
                return await fn()
        raise AssertionError("unreachable")  # pragma: no cover

    @asynccontextmanager
    async def _request(
        self, op: str, method: str, path: str, **kw: Any
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """One HTTP call with metrics; raises a typed error for any non-2xx."""
        start = time.monotonic()
        code = "0"
        if self._proxy is not None:
            kw.update(proxy=self._proxy, proxy_auth=self._proxy_auth)
        try:
            async with self.session.request(method, self._base + path, **kw) as resp:
                code = str(resp.status)
                if resp.status >= 400:
                    body = await resp.read()
                    raise _error_from(resp.status, body, resp.headers, op, f"{method} {resp.url}")
                yield resp
        except (aiohttp.ClientError, TimeoutError, ConnectionError, ssl.SSLError) as e:
            cause = transport.tls_cause(e)
            if cause is not None:
                raise TlsError(op, cause) from None
            raise Transient(f"{op}: {type(e).__name__}: {e}") from None
        finally:
            self._metrics.api_requests.labels(op, code).inc()
            self._metrics.api_duration.labels(op).observe(time.monotonic() - start)

    async def _json(self, op: str, method: str, path: str, **kw: Any) -> dict[str, Any]:
        async with self._request(op, method, path, **kw) as resp:
            data = orjson.loads(await resp.read())
        if not isinstance(data, dict):
            raise Transient(f"{op}: unexpected response body")
        return data

    # --- files ------------------------------------------------------------------------

    async def upload_file(
        self, path: Path, filename: str, tap: Tap | None = None
    ) -> dict[str, Any]:
        """Upload a JSONL file with purpose=batch, streamed from disk (through `tap`)."""
        size = path.stat().st_size

        async def once() -> dict[str, Any]:
            form = _form("file", path, 0, size, tap, filename, "application/jsonl", purpose="batch")
            data = await self._json("upload_file", "POST", "/files", data=form)
            self._metrics.uploaded_bytes.inc(size)
            return data

        return await self._retrying(once, (Transient,))

    async def upload(
        self, path: Path, filename: str, threshold: int, part_bytes: int, tap: Tap | None = None
    ) -> dict[str, Any]:
        """Upload with one multipart request, or with the Uploads API at/above `threshold`.

        Every byte read for the upload passes through `tap` once, in order (e.g. to
        validate while uploading), even when a request is retried.
        """
        size = path.stat().st_size
        if size < threshold:
            return await self.upload_file(path, filename, tap)
        return await self.upload_parts(path, filename, size, part_bytes, tap)

    async def upload_parts(
        self, path: Path, filename: str, size: int, part_bytes: int, tap: Tap | None = None
    ) -> dict[str, Any]:
        """Uploads API: create, send parts (each retried on its own), complete."""
        body = {
            "filename": filename,
            "purpose": "batch",
            "bytes": size,
            "mime_type": "application/jsonl",
        }
        up = await self._retrying(
            lambda: self._json("create_upload", "POST", "/uploads", json=body), (Transient,)
        )
        part_ids: list[str] = []
        for offset in range(0, size, part_bytes):
            length = min(part_bytes, size - offset)

            async def send(offset: int = offset, length: int = length) -> dict[str, Any]:
                form = _form("data", path, offset, length, tap, "part", "application/octet-stream")
                return await self._json(
                    "upload_part", "POST", f"/uploads/{up['id']}/parts", data=form
                )

            part = await self._retrying(send, (Transient,))
            self._metrics.uploaded_bytes.inc(length)
            part_ids.append(part["id"])
        done = await self._retrying(
            lambda: self._json(
                "complete_upload",
                "POST",
                f"/uploads/{up['id']}/complete",
                json={"part_ids": part_ids},
            ),
            (Transient,),
        )
        file = done.get("file")
        if not isinstance(file, dict) or "id" not in file:
            raise Transient("complete_upload: no file in the completed upload")
        return file

    async def find_file(
        self, filename: str, not_before: float, max_pages: int = 5
    ) -> dict[str, Any] | None:
        """Look for an uploaded batch file by name (newest first), e.g. one whose upload
        finished but whose id was never recorded; stops at files older than `not_before`."""
        after: str | None = None
        for _ in range(max_pages):
            params = {"purpose": "batch", "limit": "100", "order": "desc"}
            if after:
                params["after"] = after
            page = await self._retrying(
                lambda p=params: self._json("list_files", "GET", "/files", params=p),  # type: ignore[misc]
                (Transient,),
            )
            data = page.get("data") or []
            for f in data:
                if f.get("filename") == filename:
                    return dict(f)
                if (f.get("created_at") or 0) < not_before:
                    return None
            if not page.get("has_more") or not data:
                return None
            after = data[-1]["id"]
        return None

    async def delete_file(self, file_id: str) -> None:
        """Delete a file (best effort callers ignore NotFound)."""
        await self._retrying(
            lambda: self._json("delete_file", "DELETE", f"/files/{file_id}"), (Transient,)
        )

    async def download(self, file_id: str, dest: Path, lines: Lines | None = None) -> int:
        """Stream a file's content to `dest` (temp name, length check, fsync, rename).

        `lines`, when given, is fed the bytes as they arrive (reset on a retry), so
        its count and index are ready when the file is: no second pass over it.
        """

        async def once() -> int:
            tmp = dest.with_name(f".{dest.name}.part")
            n = 0
            if lines is not None:
                lines.reset()
            async with self._request(
                "download_file", "GET", f"/files/{file_id}/content", read_bufsize=1 << 22
            ) as resp:
                expected = resp.content_length
                with tmp.open("wb") as out:
                    # Written back to disk in a thread while the rest arrives, so the
                    # final fsync has little left to do; a 4 MiB read buffer spares the
                    # transport a pause/resume every 128 KiB. (200 MB: ~650 -> ~950 MB/s.)
                    syncing: asyncio.Future[None] | None = None
                    unsynced = 0
                    try:
                        async for chunk in resp.content.iter_any():
                            out.write(chunk)
                            if lines is not None:
                                lines.feed(chunk)
                            n += len(chunk)
                            unsynced += len(chunk)
                            if unsynced >= _SYNC_EVERY and (syncing is None or syncing.done()):
                                out.flush()
                                syncing = asyncio.ensure_future(
                                    asyncio.to_thread(os.fdatasync, out.fileno())
                                )
                                unsynced = 0
                    except (aiohttp.ClientError, TimeoutError) as e:
                        raise Transient(f"download_file: {type(e).__name__}: {e}") from None
                    finally:
                        if syncing is not None:  # never leave it running on a closed fd
                            await asyncio.shield(syncing)
                    if expected is not None and n != expected:
                        raise Transient(f"download_file: got {n} of {expected} bytes")
                    if lines is not None:
                        lines.end()
                    out.flush()
                    await asyncio.to_thread(os.fsync, out.fileno())
            tmp.replace(dest)
            self._metrics.downloaded_bytes.inc(n)
            return n

        return await self._retrying(once, (Transient,))

    # --- batches ----------------------------------------------------------------------

    async def create_batch(
        self,
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        metadata: Mapping[str, str],
        output_expires_after_seconds: int | None = None,
    ) -> dict[str, Any]:
        """POST /v1/batches. Retries only 429; an unknown outcome is raised as Transient."""
        body: dict[str, Any] = {
            "input_file_id": input_file_id,
            "endpoint": endpoint,
            "completion_window": completion_window,
            "metadata": dict(metadata),
        }
        if output_expires_after_seconds is not None:
            body["output_expires_after"] = {
                "anchor": "created_at",
                "seconds": output_expires_after_seconds,
            }
        return await self._retrying(
            lambda: self._json("create_batch", "POST", "/batches", json=body), (RateLimited,)
        )

    async def get_batch(self, batch_id: str, caller: str | None = None) -> dict[str, Any]:
        """GET /v1/batches/{id}; `caller` names the part of batchd asking in the
        User-Agent (`batchd (tracker)`), for whoever reads the provider's logs."""
        kw = _agent(caller)
        return await self._retrying(
            lambda: self._json("get_batch", "GET", f"/batches/{batch_id}", **kw), (Transient,)
        )

    async def list_batches(self, limit: int = 100, after: str | None = None) -> dict[str, Any]:
        """One page of GET /v1/batches, newest first."""
        data = orjson.loads(await self.list_batches_raw(limit, after))
        if not isinstance(data, dict):
            raise Transient("list_batches: unexpected response body")
        return data

    async def list_batches_raw(
        self, limit: int = 100, after: str | None = None, caller: str | None = None
    ) -> bytes:
        """One page of GET /v1/batches as the API sent it (the tracker skips parsing a
        page whose bytes it has seen before); `caller`: see get_batch."""
        params: dict[str, str] = {"limit": str(limit)}
        if after:
            params["after"] = after
        kw = _agent(caller)

        async def once() -> bytes:
            async with self._request(
                "list_batches", "GET", "/batches", params=params, **kw
            ) as resp:
                return await resp.read()

        return await self._retrying(once, (Transient,))

    async def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        """POST /v1/batches/{id}/cancel."""
        return await self._retrying(
            lambda: self._json("cancel_batch", "POST", f"/batches/{batch_id}/cancel"),
            (Transient,),
        )

    async def find_batch(
        self, attempt_id: str, not_before: float, max_pages: int = 20
    ) -> dict[str, Any] | None:
        """Look for a batch carrying this attempt id in its metadata (newest first).

        Stops once past batches created before `not_before` (unix seconds) or after
        `max_pages` pages.
        """
        after: str | None = None
        for _ in range(max_pages):
            page = await self.list_batches(100, after)
            for b in page.get("data", []):
                if (b.get("metadata") or {}).get(ATTEMPT_KEY) == attempt_id:
                    return dict(b)
                if (b.get("created_at") or 0) < not_before:
                    return None
            if not page.get("has_more") or not page.get("data"):
                return None
            after = page["data"][-1]["id"]
        return None


def _agent(caller: str | None) -> dict[str, Any]:
    return {"headers": {"User-Agent": f"batchd ({caller})"}} if caller else {}


class Tap:
    """Sees each byte of an upload once, in order (e.g. a validator).

    It runs on the event loop, synchronously, as each chunk is read for sending
    (see `transport.FileSlice`): the kernel and the server move chunk N while chunk N+1 is
    consumed. In a worker thread it gained nothing and cost much: a validator holds
    the GIL, and the loop, waiting up to a switch interval for it at every socket
    write, starved the upload (190 MB over loopback: ~0.9 s instead of ~0.5 s).
    A chunk is consumed before it is offered to the connection, so a request that
    is cancelled or retried never loses or repeats a byte.
    """

    def __init__(self, consume: Callable[[bytes], None]) -> None:
        self._consume = consume
        self.fed = 0

    def feed(self, offset: int, chunk: bytes) -> None:
        """Pass on the part of `chunk` (read at `offset`) not seen before."""
        if offset > self.fed:
            raise RuntimeError("Tap fed out of order")
        new = chunk[self.fed - offset :] if offset < self.fed else chunk
        if new:
            self._consume(new)
            self.fed += len(new)


class Lines:
    """Counts the non-empty lines of a download as its bytes arrive (the rule of
    `pieces.iter_lines`); `on_line` sees each one, without its newline."""

    def __init__(self, on_line: Callable[[bytes], None] | None = None) -> None:
        self._on_line = on_line
        self.count = 0
        self._rest: list[bytes] = []

    def reset(self) -> None:
        """Start over (a retried download sends every byte again)."""
        self.count = 0
        self._rest = []

    def feed(self, chunk: bytes) -> None:
        """Take the next bytes of the file."""
        if b"\n" not in chunk:
            self._rest.append(chunk)  # one long line: join once, at its end
            return
        parts = chunk.split(b"\n")
        if self._rest:  # the line begun in earlier chunks (joining only it, not the chunk)
            parts[0] = b"".join([*self._rest, parts[0]])
        last = parts.pop()
        self._rest = [last] if last else []
        on_line = self._on_line
        for line in parts:
            # A line's ends are only looked at when they could be blank (cheap on 100 KB).
            if line and (line[0] > 32 or line[-1] > 32 or line.strip()):
                self.count += 1
                if on_line is not None:
                    on_line(line.rstrip(b"\r") if line[-1] == 13 else line)

    def end(self) -> None:
        """The file is complete: a last line without a newline counts too."""
        if self._rest:
            line = b"".join(self._rest)
            self._rest = []
            if line.strip():
                self.count += 1
                if self._on_line is not None:
                    self._on_line(line.rstrip(b"\r"))


def _form(
    name: str,
    path: Path,
    offset: int,
    length: int,
    tap: Tap | None,
    filename: str,
    content_type: str,
    **fields: str,
) -> aiohttp.MultipartWriter:
    """A multipart/form-data body: text `fields`, then `length` bytes of `path` from
    `offset` as the part `name`. Every part has a known size, so the request carries a
    Content-Length (never `Transfer-Encoding: chunked`), and the file is still streamed."""
    form = aiohttp.MultipartWriter("form-data")
    for key, value in fields.items():
        form.append(value).set_content_disposition("form-data", name=key)
    part = transport.FileSlice(
        path, offset, length, tap.feed if tap else None, content_type=content_type
    )
    part.set_content_disposition("form-data", name=name, filename=filename)
    form.append_payload(part)
    for p, _enc, _te in form:  # as FormData does: no per-part Content-Length
        p.headers.popall("Content-Length", None)
    return form
