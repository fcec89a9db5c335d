"""What every command shares: exit codes, the config, the store, finding a job."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from batchd.config import Config, load, parse_since

if TYPE_CHECKING:
    from batchd.store import Job, Store

T = TypeVar("T")

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_NOT_FOUND = 0, 1, 2, 3


class Fail(Exception):
    """A one-line message and an exit code."""

    def __init__(self, message: str, code: int = EXIT_FAIL) -> None:
        super().__init__(message)
        self.code = code


class NoDatabase(Fail):
    """batchd has not run with this config yet."""


def config(args: argparse.Namespace) -> Config:
    """The config named by --config or $BATCHD_CONFIG (loaded once per command)."""
    cfg = getattr(args, "loaded_config", None)
    if not isinstance(cfg, Config):
        cfg = args.loaded_config = load(args.config)
    return cfg


def finish(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never waits (reads of a SQLite store opened with
    `read_only`) to its end without an event loop."""
    try:
        coro.send(None)
    except StopIteration as e:
        return e.value  # type: ignore[no-any-return]
    coro.close()
    raise RuntimeError("a command run without an event loop waited for one")


def since(text: str) -> float:
    """--since as unix seconds (a usage error otherwise)."""
    try:
        return parse_since(text)
    except ValueError as e:
        raise Fail(f"--since: {e}", EXIT_USAGE) from None


@asynccontextmanager
async def store(cfg: Config, read_only: bool = False) -> AsyncIterator[Store]:
    """The database, opened (never created: NoDatabase when batchd never ran).
    `read_only`: for reads alone (a SQLite file's then never wait, see `finish`)."""
    from batchd.store.facade import Store

    if cfg.state.url is None and not cfg.state.database.exists():
        raise NoDatabase(
            f"no jobs yet: batchd has not run with this config (no database at "
            f"{cfg.state.database})",
            EXIT_OK,
        )
    try:
        s = await (Store.open_read_only if read_only else Store.open)(cfg.state.target)
    except ConnectionError as e:  # PostgreSQL unreachable (the message hides any password)
        raise Fail(f"[state] database: {e}") from None
    try:
        yield s
    finally:
        await s.close()


async def one_job(s: Store, ref: str) -> Job:
    """The one job `ref` names (exit 3 when none or several)."""
    found = await s.find_jobs(ref)
    if len(found) == 1:
        return found[0]
    if not found:
        raise Fail(f"no job matches {ref!r}", EXIT_NOT_FOUND)
    listed = "; ".join(f"{j.id} {j.name} {j.state}" for j in found[:5])
    raise Fail(f"{ref!r} matches {len(found)} jobs: {listed}", EXIT_NOT_FOUND)
