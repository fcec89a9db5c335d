"""Issue 13, "works where companies run it": uploads with a Content-Length, a real forward
proxy, a private CA, an mTLS gateway, and `batchd check` naming each TLS failure.

Real parts only: proxy.py (a forward proxy from PyPI) runs as a subprocess on loopback;
the emulator is served over TLS with a CA made here (trustme); batchd runs as a real
subprocess (`batchd check`, `batchd run --once`) with the environment a user would set.

How "the only way out is the proxy" is made honest: the proxy connects upstream from
127.0.0.3 (as tinyproxy's `Bind` / squid's `tcp_outgoing_address` would), and the
emulator answers any connection from another address with a 403 "direct connection
refused". The API's host is `localhost`, so a direct connection comes from 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import random
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import trustme
from aiohttp import web
from aiohttp.typedefs import Handler

from batchd import pieces
from batchd.api import BatchApi, Lines, Tap
from batchd.config import ApiConfig, ConfigError
from batchd.emulator import EmulatorConfig, EmulatorState, create_app
from batchd.metrics import Metrics
from batchd.stages.collect import custom_id_of
from batchd.transport import describe_proxy, probe_tls, proxy_for
from tests.conftest import API_KEY, KEY_ENV, chat_lines, make_config, run_once

ROOT = Path(__file__).resolve().parent.parent
PROXY_SOURCE = "127.0.0.3"
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


@dataclass
class Served:
    """An emulator on loopback that records every request (peer, method, path, headers)."""

    state: EmulatorState
    runner: web.AppRunner
    url: str
    seen: list[tuple[str, str, str, dict[str, str]]] = field(default_factory=list)

    def uploads(self) -> list[dict[str, str]]:
        """Headers of every request that carried a file (or a part of one)."""
        return [
            h
            for _p, m, path, h in self.seen
            if m == "POST" and (path == "/v1/files" or path.endswith("/parts"))
        ]

    def refused(self) -> int:
        """Requests that did not come through the proxy."""
        return sum(1 for p, *_ in self.seen if p != PROXY_SOURCE)


async def serve(
    ssl_ctx: ssl.SSLContext | None = None, only_from: str | None = None, **kw: Any
) -> Served:
    """The emulator on 127.0.0.1 (named `localhost` in URLs), optionally over TLS and
    refusing connections that do not come from `only_from`."""
    state = EmulatorState(EmulatorConfig(time_scale=0.01, api_key=API_KEY, **kw))
    app = create_app(state)
    seen: list[tuple[str, str, str, dict[str, str]]] = []

    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername")[0] if request.transport else "?"
        seen.append((peer, request.method, request.path, dict(request.headers)))
        if only_from is not None and peer != only_from:
            msg = f"direct connection refused ({peer}): only the proxy may connect"
            return web.json_response({"error": {"message": msg}}, status=403)
        return await handler(request)

    app.middlewares.insert(0, record)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_ctx).start()
    port = runner.addresses[0][1]
    scheme = "https" if ssl_ctx else "http"
    return Served(state, runner, f"{scheme}://localhost:{port}/v1", seen)


@pytest.fixture
async def served() -> AsyncIterator[list[Served]]:
    """Emulators started by a test, stopped after it."""
    started: list[Served] = []
    yield started
    for s in started:
        await s.runner.cleanup()
        s.state.close()


def _start_proxy(tmp: Path, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    port_file = tmp / f"proxy-{len(list(tmp.iterdir()))}.port"
    env = {**os.environ, "BATCHD_TEST_PROXY_SOURCE": PROXY_SOURCE, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "proxy", "--hostname", "127.0.0.1", "--port", "0"),
            *("--port-file", str(port_file), "--num-acceptors", "1", "--num-workers", "1"),
            *("--plugins", "tests.proxy_source.OutgoingFrom", "--log-level", "WARNING"),
            *extra,
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while not (port_file.exists() and port_file.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("proxy.py did not start")
        time.sleep(0.05)
    return proc, f"http://127.0.0.1:{port_file.read_text().strip()}"


@pytest.fixture(scope="module")
def proxies(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """Two real proxy.py processes: an open one, and one that wants user:pass."""
    tmp = tmp_path_factory.mktemp("proxy")
    open_proxy, url = _start_proxy(tmp)
    auth_proxy, auth_url = _start_proxy(tmp, "--basic-auth", "batchd:s3cret-proxy-pw")
    yield url, auth_url.replace("http://", "http://batchd:s3cret-proxy-pw@")
    for p in (open_proxy, auth_proxy):
        p.terminate()
        p.wait(10)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def server_ctx(ca: trustme.CA, *names: str, mtls: bool = False, **kw: Any) -> ssl.SSLContext:
    """A server TLS context with a certificate for `names` signed by `ca`."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*(names or ("localhost",)), **kw).configure_cert(ctx)
    if mtls:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ca.configure_trust(ctx)
    return ctx


def base_env(**extra: str) -> dict[str, str]:
    """The test's environment without any proxy or CA variables, plus `extra`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k.lower() not in PROXY_VARS and k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")
    }
    return {**env, KEY_ENV: API_KEY, **extra}


def write_config(tmp_path: Path, url: str, api: str = "", extra: str = "") -> Path:
    p = tmp_path / "batchd.toml"
    p.write_text(
        f'[api]\nbase_url = "{url}"\napi_key_env = "{KEY_ENV}"\nmax_retries = 2\n{api}\n'
        '[spool]\ndir = "spool"\n[state]\ndatabase = "batchd.db"\n'
        '[batch]\npoll_interval_seconds = 0.1\n[http]\nlisten = "127.0.0.1:0"\n' + extra
    )
    return p


async def cli(*args: str, env: dict[str, str]) -> tuple[int, str]:
    """`python -m batchd ARGS` without blocking the loop the emulator runs on."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "batchd", *args,
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def line(out: str, what: str) -> str:
    """The `batchd check` line of one check."""
    [found] = [x for x in out.splitlines() if x[6:15].rstrip() == what]
    return found


# --- Content-Length on every upload -----------------------------------------------------


async def test_uploads_carry_a_content_length_never_chunked(
    tmp_path: Path, served: list[Served]
) -> None:
    emu = await serve()
    served.append(emu)
    data = chat_lines(3000)
    src = tmp_path / "in.jsonl"
    src.write_bytes(data)
    seen: list[bytes] = []
    async with BatchApi(ApiConfig(base_url=emu.url), API_KEY, Metrics()) as api:
        one = await api.upload(src, "in.jsonl", 1 << 30, 1 << 20, Tap(seen.append))
        assert b"".join(seen) == data  # every byte through the tap once, in order
        parts = await api.upload(src, "in.jsonl", 1, 100_000, None)  # Uploads API, 3 parts
        for f in (one, parts):
            await api.download(f["id"], tmp_path / "back.jsonl")
            assert (tmp_path / "back.jsonl").read_bytes() == data
    uploads = emu.uploads()
    assert len(uploads) == 1 + -(-len(data) // 100_000)
    for headers in uploads:
        assert "Transfer-Encoding" not in headers, headers
        assert int(headers["Content-Length"]) > 0
    sizes = [int(h["Content-Length"]) for h in uploads]
    assert sizes[0] > len(data) and all(s > 0 for s in sizes[1:])

    # And so through the daemon, one request or the Uploads API.
    up = {"uploads_api_threshold_bytes": 50_000, "part_bytes": 100_000}
    cfg = make_config(tmp_path, emu.url, upload=up)
    (cfg.spool.dir / "inbox").mkdir(parents=True)
    (cfg.spool.dir / "inbox" / "small.jsonl").write_bytes(chat_lines(5))
    (cfg.spool.dir / "inbox" / "big.jsonl").write_bytes(data)
    await run_once(cfg)
    assert sorted(p.name for p in (cfg.spool.dir / "done").iterdir()) == ["big", "small"]
    assert len(emu.uploads()) == len(uploads) * 2  # small: one request; big: as many parts
    assert not [h for h in emu.uploads() if "Transfer-Encoding" in h]


# --- proxy ------------------------------------------------------------------------------


def test_proxy_resolution_follows_the_standard_variables() -> None:
    cfg = ApiConfig(base_url="https://api.example.com/v1")
    assert proxy_for(cfg, {}) is None
    assert proxy_for(cfg, {"HTTPS_PROXY": "http://p:3128"}) == "http://p:3128"
    assert proxy_for(cfg, {"https_proxy": "p:3128", "HTTPS_PROXY": "x"}) == "http://p:3128"
    assert proxy_for(cfg, {"HTTP_PROXY": "http://p:1"}) is None  # wrong scheme
    assert proxy_for(cfg, {"ALL_PROXY": "http://p:2"}) == "http://p:2"
    for no in ("example.com", ".example.com", "*", "other, api.example.com:443", "*.example.com"):
        assert proxy_for(cfg, {"HTTPS_PROXY": "http://p:1", "NO_PROXY": no}) is None, no
    for no in ("example.org", "api.example.com:80", "ample.com"):
        assert proxy_for(cfg, {"HTTPS_PROXY": "http://p:1", "NO_PROXY": no}), no
    pinned = ApiConfig(base_url=cfg.base_url, proxy="http://u:pw@q:8080")
    assert proxy_for(pinned, {"HTTPS_PROXY": "http://p:1"}) == "http://u:pw@q:8080"
    assert describe_proxy(pinned, {}) == "http://u:***@q:8080 ([api] proxy)"
    direct = ApiConfig(base_url=cfg.base_url, proxy="")
    assert proxy_for(direct, {"HTTPS_PROXY": "http://p:1"}) is None


def test_proxy_and_tls_keys_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[api\] proxy: .*'socks5://u:\*\*\*@h:1'"):
        make_config(tmp_path, "http://x/v1", api={"proxy": "socks5://u:secret@h:1"})
    with pytest.raises(ConfigError, match=r"\[api\] ca_file: cannot read"):
        make_config(tmp_path, "http://x/v1", api={"ca_file": "missing.pem"})
    (tmp_path / "key.pem").write_text("x")
    with pytest.raises(ConfigError, match=r"\[api\] client_key_file: needs"):
        make_config(tmp_path, "http://x/v1", api={"client_key_file": "key.pem"})
    with pytest.raises(ConfigError, match=r"\[api\] ca_file: .* is not a PEM CA bundle"):
        make_config(tmp_path, "http://x/v1", api={"ca_file": "key.pem"})
    ca = trustme.CA()
    leaf = ca.issue_cert("client")
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    other = ca.issue_cert("other")
    other.private_key_pem.write_to_path(str(tmp_path / "other.pem"))
    with pytest.raises(ConfigError, match=r"\[api\] client_cert_file: cannot load .*KEY_VALUES"):
        make_config(
            tmp_path,
            "http://x/v1",
            api={"client_cert_file": "cert.pem", "client_key_file": "other.pem"},
        )


async def test_check_and_run_through_a_real_proxy(
    tmp_path: Path, served: list[Served], proxies: tuple[str, str]
) -> None:
    proxy, _ = proxies
    emu = await serve(only_from=PROXY_SOURCE)
    served.append(emu)
    cfg = write_config(tmp_path, emu.url)

    # Direct: refused by the emulator, and `check` says no proxy was used.
    code, out = await cli("check", "-c", str(cfg), env=base_env())
    assert code == 1, out
    assert "direct (no proxy configured)" in line(out, "proxy")
    assert "HTTP 403: direct connection refused" in line(out, "api")
    # NO_PROXY naming the host: direct again, and check says why.
    code, out = await cli(
        "check", "-c", str(cfg), env=base_env(HTTP_PROXY=proxy, NO_PROXY="localhost")
    )
    assert code == 1 and "NO_PROXY" in line(out, "proxy"), out
    refused = emu.refused()

    # Through the proxy named by the environment, as curl and the SDK would go.
    code, out = await cli("check", "-c", str(cfg), env=base_env(HTTP_PROXY=proxy))
    assert code == 0, out
    assert line(out, "proxy").endswith(f"{proxy} (from the environment)")
    inbox = tmp_path / "spool" / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    (inbox / "viaproxy.jsonl").write_bytes(chat_lines(4, fail=[2]))
    code, out = await cli("run", "-c", str(cfg), "--once", env=base_env(http_proxy=proxy))
    assert code == 0, out
    done = tmp_path / "spool" / "done" / "viaproxy"
    assert len((done / "output.jsonl").read_bytes().splitlines()) == 3
    assert len((done / "errors.jsonl").read_bytes().splitlines()) == 1
    assert emu.refused() == refused  # nothing went direct
    assert emu.uploads() and not [h for h in emu.uploads() if "Transfer-Encoding" in h]


async def test_config_proxy_wins_and_credentials_stay_hidden(
    tmp_path: Path, served: list[Served], proxies: tuple[str, str]
) -> None:
    proxy, auth_proxy = proxies
    emu = await serve(only_from=PROXY_SOURCE)
    served.append(emu)
    dead = base_env(HTTP_PROXY="http://127.0.0.1:9")  # nothing listens there
    cfg = write_config(tmp_path, emu.url, f'proxy = "{proxy}"')
    code, out = await cli("check", "-c", str(cfg), env=dead)
    assert code == 0 and line(out, "proxy").endswith("([api] proxy)"), out

    # A proxy that wants credentials, given in its URL; the password is never shown.
    cfg = write_config(tmp_path, emu.url, f'proxy = "{auth_proxy}"')
    code, out = await cli("check", "-c", str(cfg), env=base_env())
    assert code == 0, out
    assert "batchd:***@" in line(out, "proxy") and "s3cret-proxy-pw" not in out
    wrong = auth_proxy.replace("s3cret-proxy-pw", "wrong-pw")
    cfg = write_config(tmp_path, emu.url, f'proxy = "{wrong}"')
    code, out = await cli("check", "-c", str(cfg), env=base_env())
    assert code == 1 and "wrong-pw" not in out, out

    cfg = write_config(tmp_path, emu.url, 'proxy = ""')  # direct, whatever the environment
    code, out = await cli("check", "-c", str(cfg), env=base_env(HTTP_PROXY=proxy))
    assert code == 1 and 'direct ([api] proxy = "")' in line(out, "proxy"), out


# --- TLS: private CA, SSL_CERT_FILE, mTLS, and each failure in one line -------------------


async def test_private_ca_by_config_or_ssl_cert_file(
    tmp_path: Path, served: list[Served], ca: trustme.CA
) -> None:
    emu = await serve(server_ctx(ca))
    served.append(emu)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    code, out = await cli("check", "-c", str(write_config(tmp_path, emu.url)), env=base_env())
    assert code == 1
    assert line(out, "api").endswith(
        "TLS: unknown CA: the server's certificate is not signed by a trusted CA "
        "(unable to get local issuer certificate); set [api] ca_file (or SSL_CERT_FILE) "
        "to the CA bundle"
    ), out
    cfg = write_config(tmp_path, emu.url, f'ca_file = "{ca_file}"')
    code, out = await cli("check", "-c", str(cfg), env=base_env())
    assert code == 0, out
    cfg = write_config(tmp_path, emu.url)
    code, out = await cli("check", "-c", str(cfg), env=base_env(SSL_CERT_FILE=str(ca_file)))
    assert code == 0, out


@pytest.mark.parametrize(
    ("names", "kw", "cause"),
    [
        (("other.example",), {}, "TLS: name mismatch: Hostname mismatch"),
        (
            ("localhost",),
            {
                "not_before": dt.datetime(2020, 1, 1, tzinfo=dt.UTC),
                "not_after": dt.datetime(2021, 1, 1, tzinfo=dt.UTC),
            },
            "TLS: certificate expired: the server's certificate has expired",
        ),
    ],
    ids=["name-mismatch", "expired"],
)
async def test_tls_failures_are_named(
    tmp_path: Path,
    served: list[Served],
    ca: trustme.CA,
    names: tuple[str, ...],
    kw: dict[str, Any],
    cause: str,
) -> None:
    emu = await serve(server_ctx(ca, *names, **kw))
    served.append(emu)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cfg = write_config(tmp_path, emu.url, f'ca_file = "{ca_file}"')
    code, out = await cli("check", "-c", str(cfg), env=base_env())
    assert code == 1
    assert f"{emu.url}: {cause}" in line(out, "api"), out


async def test_mtls_gateway_through_the_proxy(
    tmp_path: Path, served: list[Served], ca: trustme.CA, proxies: tuple[str, str]
) -> None:
    """The whole company case: HTTPS_PROXY, a private CA, a gateway that wants a client
    certificate; the API key and the client key never appear in any output."""
    proxy, _ = proxies
    emu = await serve(server_ctx(ca, mtls=True), only_from=PROXY_SOURCE)
    served.append(emu)
    ca_file, cert_file, key_file = (tmp_path / n for n in ("ca.pem", "cert.pem", "key.pem"))
    ca.cert_pem.write_to_path(str(ca_file))
    client = ca.issue_cert("batchd@example.com")
    client.cert_chain_pems[0].write_to_path(str(cert_file))
    client.private_key_pem.write_to_path(str(key_file))
    env = base_env(HTTPS_PROXY=proxy)

    cfg = write_config(tmp_path, emu.url, f'ca_file = "{ca_file}"')
    code, out = await cli("check", "-c", str(cfg), env=env)
    assert code == 1
    assert (
        ": TLS: client certificate required: the server asks for one;"
        " set [api] client_cert_file and client_key_file"
    ) in line(out, "api"), out

    api = f'ca_file = "{ca_file}"\nclient_cert_file = "{cert_file}"\nclient_key_file = "{key_file}"'
    cfg = write_config(tmp_path, emu.url, api, '[log]\nlevel = "debug"\nformat = "json"\n')
    code, out = await cli("check", "-c", str(cfg), env=env)
    assert code == 0, out
    assert line(out, "proxy").endswith(f"{proxy} (from the environment)")
    inbox = tmp_path / "spool" / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    (inbox / "gateway.jsonl").write_bytes(chat_lines(3))
    code, log = await cli("run", "-c", str(cfg), "--once", env=env)
    assert code == 0, log
    assert (tmp_path / "spool" / "done" / "gateway" / "output.jsonl").is_file()
    assert emu.refused() == 0
    key_body = client.private_key_pem.bytes().decode().splitlines()[1]
    for secret in (API_KEY, key_body):
        assert secret not in out and secret not in log

    # The combined PEM (key and chain in one file) works too.
    both = tmp_path / "both.pem"
    client.private_key_and_cert_chain_pem.write_to_path(str(both))
    cfg = write_config(tmp_path, emu.url, f'ca_file = "{ca_file}"\nclient_cert_file = "{both}"')
    async with BatchApi(
        make_config(
            tmp_path, emu.url, api={"ca_file": str(ca_file), "client_cert_file": str(both)}
        ).api,
        API_KEY,
        Metrics(),
    ) as direct_api:
        with pytest.raises(Exception, match=r"direct connection refused"):
            await direct_api.list_batches(1)  # right certificate, but not via the proxy
    code, out = await cli("check", "-c", str(cfg), env=env)
    assert code == 0, out


async def test_a_netrc_entry_does_not_clash_with_the_key(
    tmp_path: Path, served: list[Served], monkeypatch: pytest.MonkeyPatch
) -> None:
    # aiohttp's trust_env would read ~/.netrc for the API host and then refuse to send
    # its credentials beside our bearer header; batchd reads only the proxy variables.
    emu = await serve()
    served.append(emu)
    (tmp_path / "netrc").write_text("machine localhost login u password p\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    async with BatchApi(ApiConfig(base_url=emu.url), API_KEY, Metrics()) as api:
        assert (await api.list_batches(1))["object"] == "list"


def test_a_gateway_that_sends_the_alert_is_named_too(tmp_path: Path, ca: trustme.CA) -> None:
    # A TLS terminator on real sockets (as nginx or envoy) answers a missing client
    # certificate with an alert rather than a bare close: `check` names it the same way.
    ctx = server_ctx(ca, mtls=True)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve_one() -> None:
        conn, _ = listener.accept()
        with contextlib.suppress(OSError):
            ctx.wrap_socket(conn, server_side=True).recv(1)
        conn.close()

    t = threading.Thread(target=serve_one, daemon=True)
    t.start()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cfg = ApiConfig(base_url=f"https://localhost:{port}/v1", ca_file=ca_file)
    cause = probe_tls(cfg, None)
    t.join(10)
    listener.close()
    assert cause is not None and cause.startswith("TLS: client certificate required"), cause
    assert "closed the connection" not in cause  # from the alert itself


# --- downloads: counted and indexed as the bytes arrive ---------------------------------


def test_lines_as_they_arrive_match_a_second_pass(tmp_path: Path) -> None:
    rng = random.Random(7)
    body = (
        b'{"id":"r1","custom_id":"a","response":{"custom_id":"nested"}}\r\n'
        b"\n   \n"
        b'{"response": {"custom_id": "nested"}, "custom_id": "b"}\n'
        b'{"id": "r3", "custom_id" : "c\\"q"}\n'
        b'{"custom_id":"d\xc3\xa9"}\n' + b'{"custom_id":"long","x":"' + b"y" * 300_000 + b'"}\n'
        b'{"custom_id":"last"}'
    )
    path = tmp_path / "f.jsonl"
    path.write_bytes(body)
    expected = [orjson.loads(x).get("custom_id") for x in pieces.iter_lines(path)]
    for _ in range(50):
        ids: list[str] = []
        lines = Lines(lambda line, ids=ids: ids.append(custom_id_of(line)))
        lines.feed(b"stale bytes of an attempt that was cut off")
        lines.reset()
        pos = 0
        while pos < len(body):
            n = rng.choice([1, 2, 7, 64, 4096, 1 << 20])
            lines.feed(body[pos : pos + n])
            pos += n
        lines.end()
        assert ids == expected and lines.count == len(expected) == 6
