"""A real PostgreSQL server for the tests: one per session, a database per test.

Debian's `postgresql` package (.ci/run installs it) is started on a temporary data
directory, a free loopback port and a socket directory of its own, with fsync off.
initdb refuses to run as root, so as root the server runs as `nobody`. Each test gets
a fresh database cloned from a template that is already migrated.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg

USER = "batchd"


def pg_bin(tool: str) -> str | None:
    """The path of a PostgreSQL server tool: on PATH, else the newest under
    /usr/lib/postgresql/*/bin (where Debian puts them)."""
    found = shutil.which(tool)
    if found:
        return found
    versions = sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"),
        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0,
    )
    return versions[-1] if versions else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_server_user() -> Sequence[str]:
    if os.geteuid() != 0:
        return ()
    return ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")


@dataclass
class PgServer:
    """A running server: its directory, port and the `pg_ctl` that stops it."""

    root: Path
    port: int
    pg_ctl: str
    created: int = 0

    def url(self, db: str = "postgres") -> str:
        """The URL of database `db` (trust authentication on loopback)."""
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{db}"

    def stop(self) -> None:
        """Stop the server at once and remove its files."""
        subprocess.run(
            [
                *_as_server_user(),
                self.pg_ctl,
                "-D",
                str(self.root / "data"),
                "-m",
                "immediate",
                "stop",
            ],
            capture_output=True,
            check=False,
        )
        shutil.rmtree(self.root, ignore_errors=True)

    async def new_database(self, template: str | None = "batchd_template") -> str:
        """A fresh database (a clone of the migrated template); returns its URL."""
        self.created += 1
        name = f"t{os.getpid()}_{self.created}"
        conn = await asyncpg.connect(self.url())
        try:
            clause = f" TEMPLATE {template}" if template else ""
            await conn.execute(f"CREATE DATABASE {name}{clause}")
        finally:
            await conn.close()
        return self.url(name)


def start(initdb: str, pg_ctl: str) -> PgServer:
    """initdb into a temporary directory and start the server (fsync off)."""
    # As root the server runs as nobody, who must reach its directory: /tmp, not $TMPDIR.
    root = Path(tempfile.mkdtemp(prefix="batchd-pg-", dir="/tmp" if os.geteuid() == 0 else None))
    os.chmod(root, 0o755)
    if os.geteuid() == 0:
        shutil.chown(root, "nobody")
    data = root / "data"
    prefix = _as_server_user()
    subprocess.run(
        [
            *prefix,
            initdb,
            "-D",
            str(data),
            "-U",
            USER,
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        ],
        capture_output=True,
        check=True,
    )
    port = _free_port()
    opts = (
        f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off "
        "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300"
    )
    proc = subprocess.run(
        [
            *prefix,
            pg_ctl,
            "-D",
            str(data),
            "-o",
            opts,
            "-l",
            str(root / "server.log"),
            "-w",
            "-t",
            "60",
            "start",
        ],
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        log = (
            (root / "server.log").read_text(errors="replace")
            if (root / "server.log").exists()
            else ""
        )
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"postgres did not start: {proc.stderr.decode()} {log}")
    server = PgServer(root, port, pg_ctl)
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), 1):
                break
        except OSError:
            if time.monotonic() > deadline:
                server.stop()
                raise
            time.sleep(0.05)
    return server
