"""Real brokers for the queue-source tests: Debian's redis-server and rabbitmq-server,
each started once per session on free loopback ports with its data in a temp dir (never
the system service). `.ci/run` installs both; locally a missing one skips its tests.
bench/sources.py starts them the same way.

Tests share a server and use names of their own (a stream, a queue) per test. A test
may stop and start a server (a broker restart mid-run): its data dir stays, so what
was in it is there again (redis: append-only file, fsync always; RabbitMQ restarts its
broker application with `rabbitmqctl stop_app`/`start_app`, its node staying up).
RabbitMQ's node is booted in the background as soon as the tests are collected.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

RABBIT_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"  # the script the unit runs
RABBIT_CTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"  # the CLI itself (not Debian's sudo wrapper)
RABBIT_START_SECONDS = 180.0  # its boot takes 10-20 s on a busy 2-core machine


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _stop(p: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM, wait: float = 30) -> None:
    """Stop a server started in a session of its own (its whole process group)."""
    if p is None or p.poll() is not None:
        return
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        return
    try:
        p.wait(wait)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def unique(prefix: str) -> str:
    """A stream / queue name no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@dataclass
class RedisServer:
    """redis-server on 127.0.0.1:port, data (AOF) in `dir`."""

    exe: str
    dir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [
            self.exe,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
            "--logfile",
            str(self.dir / "redis.log"),
        ]
        self.proc = subprocess.Popen(args, start_new_session=True, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not _port_open(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = (self.dir / "redis.log").read_text(errors="replace")
                raise RuntimeError(f"redis-server did not start: {log[-2000:]}")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        _stop(self.proc, sig)
        self.proc = None


@dataclass
class RabbitServer:
    """rabbitmq-server (node, ports, cookie, mnesia and logs all under `dir`) with an
    epmd of its own on a free port."""

    dir: Path
    port: int = field(default_factory=free_port)
    dist_port: int = field(default_factory=free_port)
    epmd_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    epmd: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _env(self) -> dict[str, str]:
        d = self.dir
        return {
            **os.environ,
            "HOME": str(d),  # the Erlang cookie
            "ERL_EPMD_PORT": str(self.epmd_port),
            "RABBITMQ_NODENAME": f"batchdtest{self.port}@localhost",
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_LOGS": str(d / "log" / "rabbit.log"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq"),  # rabbitmq.conf
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(d / "rabbit.pid"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    def launch(self) -> None:
        """Start the node without waiting for it (`ready` waits)."""
        d = self.dir
        (d / "log").mkdir(parents=True, exist_ok=True)
        (d / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\nloopback_users = none\n"
        )
        (d / "enabled_plugins").write_text("[].\n")
        if self.epmd is None or self.epmd.poll() is not None:
            self.epmd = subprocess.Popen(
                ["epmd", "-port", str(self.epmd_port), "-address", "127.0.0.1"],
                start_new_session=True,
            )
        out = (d / "log" / "console.log").open("ab")
        self.proc = subprocess.Popen(
            [RABBIT_SERVER], env=self._env(), cwd=d, stdout=out, stderr=out, start_new_session=True
        )
        out.close()

    def ready(self) -> None:
        """Wait until the node accepts AMQP connections."""
        deadline = time.monotonic() + RABBIT_START_SECONDS
        while not _port_open(self.port):
            if self.proc is None or self.proc.poll() is not None or time.monotonic() > deadline:
                log = (self.dir / "log" / "console.log").read_text(errors="replace")
                self.stop()
                raise RuntimeError(f"rabbitmq-server did not start: {log[-3000:]}")
            time.sleep(0.2)

    def start(self) -> None:
        """Start the node and wait for it."""
        self.launch()
        self.ready()

    def _ctl(self, *args: str) -> None:
        subprocess.run(
            [RABBIT_CTL, "-n", self._env()["RABBITMQ_NODENAME"], *args],
            env=self._env(),
            check=True,
            capture_output=True,
            timeout=RABBIT_START_SECONDS,
        )

    def stop_app(self) -> None:
        """Stop the broker (`rabbitmqctl stop_app`): every connection is closed and the
        port refuses new ones; the Erlang node stays, so `start_app` takes seconds, not
        the ~10-20 s of a node's boot."""
        self._ctl("stop_app")

    def start_app(self) -> None:
        """Start the broker again (durable queues and messages recovered from disk)."""
        self._ctl("start_app")
        self.ready()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        _stop(self.proc, sig, wait=60)
        self.proc = None

    def shutdown(self) -> None:
        self.stop()
        _stop(self.epmd)
        self.epmd = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the session."""
    from tests.conftest import skip_without

    srv = RedisServer(skip_without("redis-server"), tmp_path_factory.mktemp("redis"))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


_early_rabbit: RabbitServer | None = None


def pytest_collection_finish(session: pytest.Session) -> None:
    """Boot rabbitmq-server now, in the background, when a collected test needs it: the
    node's boot (~10-20 s) then overlaps the tests that run before those."""
    global _early_rabbit
    if os.environ.get("PYTEST_XDIST_WORKER"):  # every worker collects every test: the
        return  # fixture boots it in the one worker that runs the file (--dist loadfile)
    wanted = any("rabbit_server" in getattr(i, "fixturenames", ()) for i in session.items)
    if not wanted or _early_rabbit is not None or not os.access(RABBIT_SERVER, os.X_OK):
        return
    import shutil
    import tempfile

    if shutil.which("epmd") is None:
        return
    _early_rabbit = RabbitServer(Path(tempfile.mkdtemp(prefix="batchd-rabbitmq-")))
    _early_rabbit.launch()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Stop a node booted early whose fixture never ran (a -x stop, a deselection)."""
    global _early_rabbit
    if _early_rabbit is not None:
        import shutil

        _early_rabbit.shutdown()
        shutil.rmtree(_early_rabbit.dir, ignore_errors=True)
        _early_rabbit = None


@pytest.fixture(scope="session")
def rabbit_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitServer]:
    """One rabbitmq-server for the session (booted early when it can be, see above)."""
    from tests.conftest import skip_without

    skip_without("rabbitmq-server")
    skip_without("epmd")
    if not os.access(RABBIT_SERVER, os.X_OK):
        pytest.skip(f"tool missing: {RABBIT_SERVER}")
    if _early_rabbit is not None:
        srv = _early_rabbit
        srv.ready()
    else:
        srv = RabbitServer(tmp_path_factory.mktemp("rabbitmq"))
        srv.start()
    try:
        yield srv
    finally:
        srv.shutdown()
