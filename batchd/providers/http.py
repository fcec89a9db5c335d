"""The HTTP plumbing every provider client shares: one aiohttp session through the
configured proxy and TLS context, typed errors from any provider's error envelope, one
retry policy (tenacity), metrics per call, streamed downloads, uploads of a known size.

Retry policy: 429 (honouring Retry-After / retry-after-ms), 5xx and connection errors
are retried with jittered exponential backoff; every other 4xx is raised at once. A
create is never retried on an error whose outcome is unknown (5xx, dropped connection):
the caller reconciles (finds the batch by its tag) before creating again.
"""

from __future__ import annotations

import asyncio
import contextvars
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
from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import Payload
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from batchd import transport
from batchd.config import ApiConfig
from batchd.metrics import Metrics
from batchd.providers.errors import (
    ApiError,
    AuthError,
    InvalidRequest,
    NotFound,
    RateLimited,
    TlsError,
    Transient,
    WrongEndpoint,
)

T = TypeVar("T")
Auth = Callable[[str | None], dict[str, str]]

_SYNC_EVERY = 8 << 20  # bytes of a download written between background fdatasyncs
# The part of batchd making the calls of this task (`tracker`): its User-Agent says so
# (`batchd (tracker)`), for whoever reads the provider's logs.
CALLER: contextvars.ContextVar[str | None] = contextvars.ContextVar("batchd_caller", default=None)


def bearer(key: str | None) -> dict[str, str]:
    """`Authorization: Bearer KEY` (most providers)."""
    return {"Authorization": f"Bearer {key}"} if key else {}


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds a 429 asks to wait (retry-after-ms, then retry-after), if it says."""
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


def envelope(body: bytes) -> dict[str, Any]:
    """The error object of any provider's envelope: OpenAI's, Azure's, Groq's and
    Together's `{"error": {message, type, code, param}}`, Together's batches'
    `{"error": "<message>"}`, Anthropic's `{"type": "error", "error": {type, message}}`,
    Gemini's `{"error": {code, message, status}}`, Mistral's top-level `{"object":
    "error", message, type, code}`."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}
    if not isinstance(parsed, dict):
        return {}
    err = parsed.get("error")
    if isinstance(err, dict):
        return err
    if isinstance(err, str):
        return {"message": err}
    if isinstance(parsed.get("message"), str):
        return parsed
    return {}


def error_from(
    status: int,
    body: bytes,
    headers: Mapping[str, str],
    op: str = "",
    url: str = "",
    fixed_routes: frozenset[str] = frozenset(),
    hint: str = "is [api] base_url the API's root?",
) -> ApiError:
    """A typed error for a non-2xx answer."""
    err = envelope(body)
    msg = str(err.get("message") or body[:200].decode("utf-8", "replace") or f"HTTP {status}")
    code = err.get("code")
    if not isinstance(code, str):  # Gemini: code is the HTTP status, `status` the name
        code = err.get("status") if isinstance(err.get("status"), str) else None
    kw: dict[str, Any] = {
        "status": status,
        "code": code,
        "type": err.get("type") if isinstance(err.get("type"), str) else None,
        "param": err.get("param") if isinstance(err.get("param"), str) else None,
    }
    if status == 429:
        return RateLimited(msg, retry_after(headers), **kw)
    if status >= 500:
        return Transient(msg, **kw)
    if status in (401, 403):
        return AuthError(msg, **kw)
    if status == 404 and op in fixed_routes:
        return WrongEndpoint(f"{url} answered 404 ({msg}); {hint}", **kw)
    if status == 404:
        return NotFound(msg, **kw)
    return InvalidRequest(msg, **kw)


class HttpClient:
    """One provider's HTTP session: base URL, auth headers, retries, metrics.

    `auth` turns the key into the provider's auth headers; `section` names the config
    table for messages; `provider` labels the metrics and the errors raised.
    """

    # Operations on routes without an id: a 404 there means the base URL is wrong.
    fixed_routes: frozenset[str] = frozenset()
    root_hint = "is {section} base_url the API's root (as the provider's SDK takes it)?"

    def __init__(
        self,
        cfg: ApiConfig,
        api_key: str | None,
        metrics: Metrics,
        max_backoff_seconds: float = 30.0,
        *,
        auth: Auth = bearer,
        provider: str = "openai",
        section: str = "[api]",
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> None:
        self._cfg = cfg
        self._base = cfg.base_url.rstrip("/")
        self._auth = auth
        self._fixed = dict(headers or {})
        self._headers = {"User-Agent": "batchd", **self._fixed, **auth(api_key)}
        self._params = dict(params or {})  # sent with every call (Azure's api-version)
        self._metrics = metrics
        self._max_backoff = max_backoff_seconds
        self._session: aiohttp.ClientSession | None = None
        self.provider = provider
        self.section = section
        # Read once, as the SDKs do: the environment's proxy variables or the proxy key.
        self._proxy, self._proxy_auth = transport.split_proxy(transport.proxy_for(cfg))

    @property
    def base_url(self) -> str:
        """The API root every path is relative to."""
        return self._base

    def set_key(self, api_key: str | None) -> None:
        """Use another API key from now on (re-read after a rotation or an outage)."""
        self._headers = {"User-Agent": "batchd", **self._fixed, **self._auth(api_key)}
        if self._session is not None:
            self._session.headers.clear()
            self._session.headers.update(self._headers)

    async def __aenter__(self) -> HttpClient:
        await self.open()
        return self

    async def open(self) -> None:
        """Open the HTTP session (idempotent)."""
        if self._session is not None:
            return
        t = self._cfg.request_timeout_seconds
        # trust_env stays off: the proxy is resolved above (once, not per request in a
        # thread), and aiohttp's ~/.netrc lookup would clash with our auth header.
        self._session = aiohttp.ClientSession(
            headers=self._headers,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=t, sock_read=t),
            connector=aiohttp.TCPConnector(ssl=self._ssl()),
        )

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
            raise RuntimeError(f"{type(self).__name__} used outside `async with`")
        return self._session

    # --- retries ----------------------------------------------------------------------

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

    async def retrying(
        self,
        fn: Callable[[], Awaitable[T]],
        retry_on: tuple[type[BaseException], ...] = (Transient,),
    ) -> T:
        """Call `fn`, retrying `retry_on` errors up to `max_retries` tries in all.

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

    # --- one call ---------------------------------------------------------------------

    def url(self, path: str) -> str:
        """An absolute URL for `path` (already absolute URLs are kept)."""
        return path if path.startswith(("http://", "https://")) else self._base + path

    @asynccontextmanager
    async def request(
        self, op: str, method: str, path: str, **kw: Any
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """One HTTP call with metrics; raises a typed error for any non-2xx."""
        start = time.monotonic()
        code = "0"
        if self._proxy is not None:
            kw.update(proxy=self._proxy, proxy_auth=self._proxy_auth)
        if self._params:
            kw["params"] = {**self._params, **(kw.get("params") or {})}
        caller = CALLER.get()
        if caller is not None:
            kw["headers"] = {**(kw.get("headers") or {}), "User-Agent": f"batchd ({caller})"}
        try:
            try:
                async with self.session.request(method, self.url(path), **kw) as resp:
                    code = str(resp.status)
                    if resp.status >= 400:
                        body = await resp.read()
                        raise self.error(resp.status, body, resp.headers, op, resp.url)
                    yield resp
            except (aiohttp.ClientError, TimeoutError, ConnectionError, ssl.SSLError) as e:
                cause = transport.tls_cause(e)
                if cause is not None:
                    raise TlsError(op, cause) from None
                raise Transient(f"{op}: {type(e).__name__}: {e}") from None
        except ApiError as e:
            e.provider = self.provider
            raise
        finally:
            self._metrics.api_requests.labels(op, code, self.provider).inc()
            self._metrics.api_duration.labels(op).observe(time.monotonic() - start)

    def error(
        self, status: int, body: bytes, headers: Mapping[str, str], op: str, url: Any
    ) -> ApiError:
        """The typed error of a non-2xx answer (providers refine it)."""
        return error_from(
            status,
            body,
            headers,
            op,
            f"{op} {url}",
            self.fixed_routes,
            self.root_hint.format(section=self.section),
        )

    async def json(self, op: str, method: str, path: str, **kw: Any) -> dict[str, Any]:
        """One call whose answer is a JSON object (no retries)."""
        async with self.request(op, method, path, **kw) as resp:
            raw = await resp.read()
        try:
            data = orjson.loads(raw) if raw.strip() else {}
        except orjson.JSONDecodeError:
            raise Transient(f"{op}: the answer is not JSON") from None
        if not isinstance(data, dict):
            raise Transient(f"{op}: unexpected response body")
        return data

    async def call(
        self,
        op: str,
        method: str,
        path: str,
        retry_on: tuple[type[BaseException], ...] = (Transient,),
        **kw: Any,
    ) -> dict[str, Any]:
        """`json` with the retry policy (a create passes retry_on=(RateLimited,))."""
        return await self.retrying(lambda: self.json(op, method, path, **kw), retry_on)

    async def raw(self, op: str, method: str, path: str, **kw: Any) -> bytes:
        """The answer's bytes as sent, with the retry policy."""

        async def once() -> bytes:
            async with self.request(op, method, path, **kw) as resp:
                return await resp.read()

        return await self.retrying(once)

    # --- downloads --------------------------------------------------------------------

    async def download(
        self, op: str, path: str, dest: Path, lines: Lines | None = None, **kw: Any
    ) -> int:
        """Stream a GET's body to `dest` (temp name, length check, fsync, rename).

        `lines`, when given, is fed the bytes as they arrive (reset on a retry), so
        its count and index are ready when the file is: no second pass over it.
        """

        async def once() -> int:
            tmp = dest.with_name(f".{dest.name}.part")
            n = 0
            if lines is not None:
                lines.reset()
            async with self.request(op, "GET", path, read_bufsize=1 << 22, **kw) as resp:
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
                        raise Transient(f"{op}: {type(e).__name__}: {e}") from None
                    finally:
                        if syncing is not None:  # never leave it running on a closed fd
                            await asyncio.shield(syncing)
                    if expected is not None and n != expected:
                        raise Transient(f"{op}: got {n} of {expected} bytes")
                    if lines is not None:
                        lines.end()
                    out.flush()
                    await asyncio.to_thread(os.fsync, out.fileno())
            tmp.replace(dest)
            self._metrics.downloaded_bytes.inc(n)
            return n

        return await self.retrying(once)

    def counted_upload(self, n: int) -> None:
        """Count `n` bytes as uploaded."""
        self._metrics.uploaded_bytes.inc(n)


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


def form(
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
    mp = aiohttp.MultipartWriter("form-data")
    for key, value in fields.items():
        mp.append(value).set_content_disposition("form-data", name=key)
    part = transport.FileSlice(
        path, offset, length, tap.feed if tap else None, content_type=content_type
    )
    part.set_content_disposition("form-data", name=name, filename=filename)
    mp.append_payload(part)
    for p, _enc, _te in mp:  # as FormData does: no per-part Content-Length
        p.headers.popall("Content-Length", None)
    return mp


class JsonArray(Payload):
    """A JSON body `prefix [line, line, …] suffix` made of a JSONL file's lines, streamed
    from disk with a known size (so the request has a Content-Length): inline requests
    (Anthropic's Message Batches) are sent without holding the file in memory.

    Lines are taken as `pieces.iter_lines` reads them (blank lines skipped, CR dropped);
    `measure()` (a pass over the file, for a thread) must be called first."""

    def __init__(self, path: Path, prefix: bytes, suffix: bytes) -> None:
        super().__init__(path, content_type="application/json")
        self._path, self._prefix, self._suffix = path, prefix, suffix
        self._size = None

    def measure(self) -> int:
        """Compute (and remember) the body's size."""
        from batchd.pieces import iter_lines

        n = lines = 0
        for line in iter_lines(self._path):
            n += len(line)
            lines += 1
        self._size = len(self._prefix) + n + max(0, lines - 1) + len(self._suffix)
        return self._size

    async def write(self, writer: AbstractStreamWriter) -> None:
        """Send the body in ~1 MiB writes."""
        from batchd.pieces import iter_lines

        buf = [self._prefix]
        held = len(self._prefix)
        first = True
        for line in iter_lines(self._path):
            if not first:
                buf.append(b",")
                held += 1
            first = False
            buf.append(line)
            held += len(line)
            if held >= 1 << 20:
                await writer.write(b"".join(buf))
                buf, held = [], 0
        buf.append(self._suffix)
        await writer.write(b"".join(buf))

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        """Not used (the body may be large)."""
        raise TypeError("JsonArray is streamed, not decoded")
