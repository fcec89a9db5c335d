"""How batchd reaches the Batch API through a company network: the proxy to use, the
TLS context (private CA, client certificate), a one-line cause for a TLS failure, and
upload bodies whose size is known (so they carry a Content-Length, never chunked).
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from aiohttp import BasicAuth
from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import Payload
from yarl import URL

from batchd.config import ApiConfig, redact_url

_READ = 1 << 20  # bytes read from disk per chunk of an upload


# --- proxy ----------------------------------------------------------------------------


def proxy_for(cfg: ApiConfig, env: Mapping[str, str] | None = None) -> str | None:
    """The proxy URL for `cfg.base_url`, or None to connect directly.

    `[api] proxy` wins ("" = direct); else the standard variables, as the SDK and curl
    read them: HTTPS_PROXY / HTTP_PROXY by scheme (lower case first), ALL_PROXY, and
    NO_PROXY (host names, domain suffixes, IPs, `*`).
    """
    if cfg.proxy is not None:
        return cfg.proxy or None
    env = os.environ if env is None else env
    url = URL(cfg.base_url)
    scheme = url.scheme

    def var(name: str) -> str:
        return (env.get(name.lower()) or env.get(name.upper()) or "").strip()

    proxy = var(f"{scheme}_proxy") or var("all_proxy")
    if not proxy or _bypassed(url, var("no_proxy")):
        return None
    return proxy if "://" in proxy else f"http://{proxy}"


def _bypassed(url: URL, no_proxy: str) -> bool:
    """Whether NO_PROXY names the URL's host (curl's rules, as urllib applies them)."""
    if not no_proxy or url.host is None:
        return False
    if no_proxy.strip() == "*":
        return True
    host = url.host.lower()
    port = url.port
    for entry in (e.strip().lower() for e in no_proxy.split(",")):
        if not entry:
            continue
        name, _, eport = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
        if eport and (not eport.isdigit() or int(eport) != port):
            continue
        name = name.lstrip("*").lstrip(".").strip("[]")
        if host == name or host.endswith("." + name):
            return True
    return False


def split_proxy(proxy: str | None) -> tuple[str | None, BasicAuth | None]:
    """The proxy URL without its credentials, and those credentials (if any)."""
    if proxy is None:
        return None, None
    url = URL(proxy)
    if url.user is None:
        return proxy, None
    auth = BasicAuth(url.user, url.password or "")
    return str(url.with_user(None).with_password(None)), auth


def describe_proxy(cfg: ApiConfig, env: Mapping[str, str] | None = None) -> str:
    """One phrase for `batchd check`: which proxy is used and why (no password shown)."""
    proxy = proxy_for(cfg, env)
    if cfg.proxy is not None:
        return f"{redact_url(proxy)} ([api] proxy)" if proxy else 'direct ([api] proxy = "")'
    if proxy:
        return f"{redact_url(proxy)} (from the environment)"
    env = os.environ if env is None else env
    if any(env.get(v) for v in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY")):
        return "direct (NO_PROXY matches the API host)"
    return "direct (no proxy configured)"


# --- TLS ------------------------------------------------------------------------------


def ssl_context(cfg: ApiConfig) -> ssl.SSLContext:
    """The system's CAs (OpenSSL's defaults, so $SSL_CERT_FILE / $SSL_CERT_DIR apply),
    plus `[api] ca_file`, plus a client certificate for mutual TLS."""
    ctx = ssl.create_default_context()
    if cfg.ca_file is not None:
        ctx.load_verify_locations(cafile=str(cfg.ca_file))
    if cfg.client_cert_file is not None:
        key = cfg.client_key_file
        ctx.load_cert_chain(str(cfg.client_cert_file), str(key) if key else None)
    return ctx


# OpenSSL's X509_V_ERR_* codes that mean "this CA is not trusted here".
_UNKNOWN_CA = {2, 18, 19, 20, 21, 27}


def tls_cause(exc: BaseException) -> str | None:
    """A one-line cause when `exc` (or what it wraps) is a TLS failure, else None."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        inner = getattr(e, "certificate_error", None)  # aiohttp's wrapper (itself an
        if isinstance(inner, BaseException):  # SSLCertVerificationError, minus the code)
            e = inner
            continue
        if isinstance(e, ssl.SSLCertVerificationError):
            return _verify_cause(e)
        if isinstance(e, ssl.SSLError):
            return _alert_cause(e)
        nxt = getattr(e, "os_error", None)
        e = nxt if isinstance(nxt, BaseException) else (e.__cause__ or e.__context__)
    return None


def _verify_cause(e: ssl.SSLCertVerificationError) -> str:
    code = getattr(e, "verify_code", None)
    msg = str(getattr(e, "verify_message", None) or e.reason or e)
    if code in _UNKNOWN_CA:
        return (
            f"TLS: unknown CA: the server's certificate is not signed by a trusted CA ({msg});"
            " set [api] ca_file (or SSL_CERT_FILE) to the CA bundle"
        )
    if code == 62 or "hostname mismatch" in msg.lower():
        return f"TLS: name mismatch: {msg}"
    if code == 10:
        return "TLS: certificate expired: the server's certificate has expired"
    if code == 9:
        return "TLS: certificate not yet valid: check the clock of this machine"
    return f"TLS: certificate rejected: {msg}"


def _alert_cause(e: ssl.SSLError) -> str:
    reason = str(e.reason or e).upper()
    if "CERTIFICATE_REQUIRED" in reason or ("HANDSHAKE_FAILURE" in reason and "ALERT" in reason):
        return (
            "TLS: client certificate required: the server asks for one;"
            " set [api] client_cert_file and client_key_file"
        )
    if "UNKNOWN_CA" in reason or "BAD_CERTIFICATE" in reason:
        return "TLS: client certificate rejected: the server does not trust it"
    if "EXPIRED" in reason:
        return "TLS: client certificate rejected: it has expired"
    return f"TLS: {e.reason or e}"


# --- upload bodies --------------------------------------------------------------------


class FileSlice(Payload):
    """`length` bytes of a file from `offset`, streamed in 1 MiB reads, with a known size.

    A known size gives the request a Content-Length: some gateways and validating
    proxies reject a chunked upload (or add a Content-Length the API then refuses).
    `feed(offset, chunk)` sees each chunk as it is read for sending.
    """

    def __init__(
        self,
        path: Path,
        offset: int,
        length: int,
        feed: Callable[[int, bytes], None] | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(path, **kw)
        self._path, self._offset, self._length = path, offset, length
        self._size = length
        self._feed = feed

    async def write(self, writer: AbstractStreamWriter) -> None:
        """Send the slice."""
        await self.write_with_length(writer, None)

    async def write_with_length(
        self, writer: AbstractStreamWriter, content_length: int | None
    ) -> None:
        """Send the slice (at most `content_length` bytes of it)."""
        left = self._length if content_length is None else min(self._length, content_length)
        pos = self._offset
        with self._path.open("rb") as f:
            f.seek(pos)
            while left > 0:
                chunk = f.read(min(_READ, left))
                if not chunk:
                    raise ShrunkFile(f"{self._path.name} shrank while uploading")
                if self._feed is not None:
                    self._feed(pos, chunk)  # while the previous chunk is still on its way
                left -= len(chunk)
                pos += len(chunk)
                await writer.write(chunk)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        """Not used for uploads (the slice may be large)."""
        raise TypeError("FileSlice is streamed, not decoded")


class ShrunkFile(OSError):
    """The file got shorter than its size while it was being uploaded."""


# --- diagnosis ------------------------------------------------------------------------


def probe_tls(cfg: ApiConfig, proxy: str | None, timeout: float = 5.0) -> str | None:
    """Open one TLS connection to the API host the way batchd does (through `proxy`),
    send nothing, and name what went wrong; None when the handshake held.

    For `batchd check`: a gateway that wants a client certificate closes the connection
    just after a TLS 1.3 handshake, and an HTTP client that has already sent its request
    sees only a reset; a connection that sends nothing reads the server's alert (or the
    close) instead.
    """
    url = URL(cfg.base_url)
    host, port = url.host or "", url.port or 443
    ctx = ssl_context(cfg)
    try:
        raw = _connect(host, port, proxy, timeout)
    except OSError as e:
        return f"cannot connect: {e}"
    try:
        with ctx.wrap_socket(raw, server_hostname=host) as tls:
            tls.settimeout(min(timeout, 1.0))
            try:
                if tls.recv(1) == b"" and cfg.client_cert_file is None:
                    return _CLIENT_CERT_REQUIRED + " (the server closed the connection)"
            except TimeoutError:
                return None  # the server waits for a request: TLS is fine
    except (ssl.SSLError, OSError) as e:
        return tls_cause(e) or f"TLS: {e}"
    finally:
        raw.close()
    return None


_CLIENT_CERT_REQUIRED = (
    "TLS: client certificate required: the server asks for one;"
    " set [api] client_cert_file and client_key_file"
)


def _connect(host: str, port: int, proxy: str | None, timeout: float) -> socket.socket:
    """A TCP connection to host:port, or a CONNECT tunnel through an http:// proxy."""
    if proxy is None:
        return socket.create_connection((host, port), timeout)
    purl = URL(proxy)
    sock = socket.create_connection((purl.host or "", purl.port or 80), timeout)
    head = f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n"
    if purl.user is not None:
        head += f"Proxy-Authorization: {BasicAuth(purl.user, purl.password or '').encode()}\r\n"
    sock.sendall((head + "\r\n").encode())
    answer = b""
    while b"\r\n\r\n" not in answer:
        got = sock.recv(4096)
        if not got:
            break
        answer += got
    status = answer.split(b"\r\n", 1)[0].decode("latin-1")
    if " 200" not in status:
        sock.close()
        raise OSError(f"the proxy refused CONNECT: {status or 'no answer'}")
    return sock
