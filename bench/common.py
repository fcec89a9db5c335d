"""Shared plumbing of the benchmarks: the emulator and the daemon as real subprocesses,
process-tree RSS/CPU sampling, test data, and the result table.

Every benchmark measures batchd and its baseline against the same local emulator in
one run, alternating the two sides, and reports medians.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import random
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psutil
from aiohttp import web
from aiohttp.typedefs import Handler

from batchd.emulator import EmulatorConfig, EmulatorState, create_app

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
API_KEY = "sk-bench-0123456789abcdef"
HEADER = ("figure", "batchd", "baseline", "ratio", "target", "met?")
TABLE_HEADER = "| " + " | ".join(HEADER) + " |"


# --- results ----------------------------------------------------------------------------


@dataclass
class Row:
    """One line of a result table; `met` is None when there is no target."""

    figure: str
    batchd: str
    baseline: str
    ratio: str
    target: str
    met: bool | None


def fmt_ratio(a: float, b: float) -> str:
    """a/b as '0.42x' ('-' when b is 0)."""
    return f"{a / b:.2f}x" if b else "-"


def print_table(
    title: str,
    rows: Sequence[Row],
    notes: Sequence[str] = (),
    columns: tuple[str, str] = ("batchd", "baseline"),
) -> None:
    """Print a Markdown table of the rows (the format every benchmark shares); `columns`
    names the two value columns (e.g. "empty DB", "1M DB" when both sides are batchd)."""
    print(f"\n### {title}\n")
    print("| " + " | ".join((HEADER[0], *columns, *HEADER[3:])) + " |")
    print("|" + "---|" * len(HEADER))
    for r in rows:
        met = "-" if r.met is None else ("yes" if r.met else "NO")
        print(f"| {r.figure} | {r.batchd} | {r.baseline} | {r.ratio} | {r.target} | {met} |")
    for n in notes:
        print(f"\n{n}")
    sys.stdout.flush()


def median(xs: Sequence[float]) -> float:
    """Median (0 for an empty sequence)."""
    return statistics.median(xs) if xs else 0.0


def percentile(xs: Sequence[float], p: float) -> float:
    """Nearest-rank percentile, p in 0..100."""
    if not xs:
        return 0.0
    s = sorted(xs)
    k = max(0, min(len(s) - 1, round(p / 100 * len(s) + 0.5) - 1))
    return s[k]


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser with --smoke (tiny, a few seconds; timings not meaningful)."""
    p = argparse.ArgumentParser(description=(doc or "").split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the bench runs")
    return p


# --- processes ----------------------------------------------------------------------------


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["BENCH_API_KEY"] = API_KEY
    env.pop("OPENAI_BASE_URL", None)
    # Measure batchd as installed: with its bytecode cached (pip compiles it at install).
    # A PYTHONDONTWRITEBYTECODE in the caller's environment would make every start of the
    # CLI compile batchd from source again (~0.1-0.15 s of each `batchd show`).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def _wait_http(port: int, path: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {path} answered")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            c.request("GET", path)
            if c.getresponse().status == 200:
                c.close()
                return
            c.close()
        except OSError:
            pass
        time.sleep(0.02)
    raise TimeoutError(f"127.0.0.1:{port}{path} did not answer in {timeout}s")


def _stop(proc: subprocess.Popen[bytes], sig: int, timeout: float = 15) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Http:
    """A keep-alive JSON client for the emulator (the bench's own observation channel)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def get(self, path: str) -> Any:
        """GET a JSON document (Bearer auth; reconnects once on a dropped connection)."""
        for attempt in (0, 1):
            try:
                self._c.request("GET", path, headers={"Authorization": f"Bearer {API_KEY}"})
                r = self._c.getresponse()
                body = r.read()
                if r.status != 200:
                    raise RuntimeError(f"GET {path}: HTTP {r.status}: {body[:200]!r}")
                return orjson.loads(body)
            except (http.client.HTTPException, ConnectionError):
                self._c.close()
                self._c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Close the connection."""
        self._c.close()


class Emulator:
    """`python -m batchd emulator` as a subprocess on a free port."""

    def __init__(self, *args: str, time_scale: float = 1.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        cmd = [PY, "-m", "batchd", "emulator", "--port", str(self.port)]
        cmd += ["--time-scale", str(time_scale), "--api-key", API_KEY, *args]
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            _wait_http(self.port, "/_emulator/stats", self.proc)
        except BaseException:
            _stop(self.proc, signal.SIGKILL)
            raise
        self.http = Http(self.port)

    def stats(self) -> dict[str, Any]:
        """GET /_emulator/stats."""
        return dict(self.http.get("/_emulator/stats"))

    def newest_batch(self) -> str | None:
        """Id of the newest batch (one cheap list call), or None."""
        page = self.http.get("/v1/batches?limit=1")
        return page["data"][0]["id"] if page["data"] else None

    def stop(self) -> None:
        """SIGINT (the emulator deletes its data dir), then wait."""
        self.http.close()
        _stop(self.proc, signal.SIGINT)

    def __enter__(self) -> Emulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


STATUS_ROUTES = frozenset({"GET /v1/batches", "GET /v1/batches/{id}"})
CREATE_ROUTE = "POST /v1/batches"


@dataclass(frozen=True)
class Call:
    """One /v1 request the emulator answered: when (perf_counter, at the answer), route
    ("GET /v1/batches/{id}"), HTTP status, whether it carried a list cursor (`after`),
    and the batch ids a status call reported (with record_ids only)."""

    t: float
    route: str
    status: int
    after: bool
    ids: tuple[str, ...]


class InProcessEmulator:
    """The emulator on its own event loop in a thread of the bench process.

    Unlike `Emulator` (a subprocess) every call is observed as it is answered, at no
    cost to either side: `calls` (timestamps, routes, reported batch ids) and
    `wait_created`. Its CPU is the bench's, never the daemon's. Durations come from
    `EmulatorConfig` fields (e.g. validating_seconds=1e9 keeps batches validating).
    """

    def __init__(self, record_ids: bool = False, **config: Any) -> None:
        self.record_ids = record_ids
        self.calls: list[Call] = []  # appended on the emulator's thread only
        self.created_at: list[float] = []  # perf_counter of each batch created
        self._cond = threading.Condition()
        self._runner: web.AppRunner | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="emu", daemon=True)
        self._thread.start()
        try:
            self.state, self.port = self.run(self._start(EmulatorConfig(api_key=API_KEY, **config)))
        except BaseException:
            self._halt()
            raise
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def run(self, coro: Any, timeout: float | None = 600) -> Any:
        """Run a coroutine on the emulator's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _start(self, cfg: EmulatorConfig) -> tuple[EmulatorState, int]:
        state = EmulatorState(cfg)
        app = create_app(state)
        app.middlewares.insert(0, self._observe)  # outermost: sees every final answer
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        return state, int(self._runner.addresses[0][1])

    @web.middleware
    async def _observe(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        resp = await handler(request)
        if not request.path.startswith("/v1/"):
            return resp
        res = request.match_info.route.resource
        route = f"{request.method} {res.canonical if res else request.path}"
        ids: tuple[str, ...] = ()
        if self.record_ids and resp.status == 200 and route in STATUS_ROUTES:
            if "id" in request.match_info:
                ids = (request.match_info["id"],)
            elif isinstance(resp, web.Response) and isinstance(resp.body, bytes):
                ids = tuple(b["id"] for b in orjson.loads(resp.body)["data"])
        now = time.perf_counter()
        self.calls.append(Call(now, route, resp.status, "after" in request.query, ids))
        if route == CREATE_ROUTE and resp.status == 200:
            with self._cond:
                self.created_at.append(now)
                self._cond.notify_all()
        return resp

    @property
    def created(self) -> int:
        """Batches created so far (answered with 200)."""
        return len(self.created_at)

    def wait_created(self, n: int, timeout: float) -> float:
        """Block until n batches exist; perf_counter() of the n-th creation."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.created_at) >= n, timeout):
                raise TimeoutError(f"{len(self.created_at)} of {n} batches in {timeout}s")
            return self.created_at[n - 1]

    def add_batches(self, n: int) -> list[str]:
        """Create n batches straight in the emulator's state (not over HTTP, not counted):
        one tiny uploaded file, n batches on it. Returns their ids, oldest first."""

        async def go() -> list[str]:
            fid = f"file-bench{secrets.token_hex(8)}"
            data = small_chat(1)
            (self.state.data_dir / fid).write_bytes(data)
            self.state.add_file(fid, "in.jsonl", "batch", len(data), None)
            body = {"input_file_id": fid, "endpoint": "/v1/chat/completions"}
            body["completion_window"] = "24h"
            return [self.state.create_batch(body).id for _ in range(n)]

        return list(self.run(go()))

    def _halt(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop.close()

    def stop(self) -> None:
        """Stop serving, remove the emulator's files."""
        if self._runner is not None:
            self.run(self._runner.cleanup(), 30)
        self._halt()
        self.state.close()

    def __enter__(self) -> InProcessEmulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def write_config(
    work: Path, base_url: str, http_port: int, toml_tail: str = "", **sections: dict[str, Any]
) -> Path:
    """A batchd config (defaults, except the given sections) with spool and db under `work`;
    `toml_tail` is appended as is (tables of tables, e.g. [sources.NAME])."""
    data: dict[str, dict[str, Any]] = {
        "api": {"base_url": base_url, "api_key_env": "BENCH_API_KEY"},
        "spool": {"dir": str(work / "spool")},
        "state": {"database": str(work / "batchd.db")},
        "http": {"listen": f"127.0.0.1:{http_port}"},
        "log": {"level": "info", "format": "json"},
        # The benches drop hard links of one file many times: identical content that the
        # duplicate check would hold in failed/ (its cost, an indexed lookup, stays in).
        "intake": {"duplicate_window": "0"},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    lines: list[str] = []
    for name, values in data.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path = work / "batchd.toml"
    path.write_text("\n".join(lines) + "\n" + toml_tail)
    return path


class Daemon:
    """`python -m batchd run --config …` as a subprocess with a fresh spool and database
    (or a copy of `database`: a prepared one, e.g. from bench.finished_db)."""

    def __init__(
        self,
        work: Path,
        base_url: str,
        database: Path | None = None,
        ready_timeout: float = 30,
        toml_tail: str = "",
        **sections: dict[str, Any],
    ) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.work = work
        self.port = free_port()
        self.config = write_config(work, base_url, self.port, toml_tail, **sections)
        self.spool = work / "spool"
        self.inbox = self.spool / "inbox"
        if database is not None:
            shutil.copyfile(database, work / "batchd.db")
        self._log = (work / "batchd.log").open("wb")
        t = time.perf_counter()
        self.proc = subprocess.Popen(
            [PY, "-m", "batchd", "run", "--config", str(self.config)],
            cwd=ROOT,
            env=_env(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            _wait_http(self.port, "/readyz", self.proc, ready_timeout)
        except BaseException:
            self.stop()
            raise
        self.ready_s = time.perf_counter() - t  # process start -> /readyz answers

    def cli(self, *args: str, timeout: float = 600) -> tuple[float, int, int]:
        """Run `python -m batchd ARGS --config …` to completion: (wall seconds, peak RSS of
        the command, lines it printed). Raises on a non-zero exit."""
        cmd = [PY, "-m", "batchd", *args, "--config", str(self.config)]
        t = time.perf_counter()
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        with PeakRss(proc.pid, every=0.02) as rss:
            out, err = proc.communicate(timeout=timeout)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            raise RuntimeError(f"{args} exited {proc.returncode}: {err.decode()[-2000:]}")
        return wall, rss.peak, out.count(b"\n")

    def drop(self, src: Path, name: str) -> float:
        """Hard-link `src` beside the inbox, rename it in; returns the time of the rename."""
        part = self.spool / f".{name}.part"
        os.link(src, part)
        t = time.perf_counter()
        os.rename(part, self.inbox / name)
        return t

    def stop(self) -> None:
        """SIGTERM, then wait."""
        _stop(self.proc, signal.SIGTERM)
        self._log.close()

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _tree(pid: int) -> list[psutil.Process]:
    try:
        p = psutil.Process(pid)
        return [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants."""
    total = 0
    for p in _tree(pid):
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by a process and its live descendants."""
    total = 0.0
    for p in _tree(pid):
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def watch(pids: Sequence[int], seconds: float, every: float = 1.0) -> list[tuple[float, int]]:
    """For each process tree, over the next `seconds`: CPU used as % of one core, and the
    largest RSS seen (sampled every `every` s; each sample lists the tree: ~1 ms)."""
    c0 = [tree_cpu(p) for p in pids]
    t0 = time.monotonic()
    rss = [0] * len(pids)
    while True:
        rss = [max(r, tree_rss(p)) for r, p in zip(rss, pids, strict=True)]
        left = t0 + seconds - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(every, left))
    wall = time.monotonic() - t0
    return [((tree_cpu(p) - c) / wall * 100, r) for p, c, r in zip(pids, c0, rss, strict=True)]


class PeakRss:
    """Samples a process tree's RSS every few milliseconds in a thread; `peak` in bytes.

    The tree is re-listed every 0.2 s only (listing walks all of /proc: ~1 ms, which
    at every sample would take a quarter of a core from the processes measured).
    """

    def __init__(self, pid: int, every: float = 0.01) -> None:
        self.pid, self.every, self.peak = pid, every, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _sample(self, procs: list[psutil.Process]) -> None:
        total = 0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        self.peak = max(self.peak, total)

    def _run(self) -> None:
        procs: list[psutil.Process] = []
        rescan = 0.0
        while not self._stop.is_set():
            if time.monotonic() >= rescan:
                procs, rescan = _tree(self.pid), time.monotonic() + 0.2
            self._sample(procs)
            self._stop.wait(self.every)

    def __enter__(self) -> PeakRss:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, tree_rss(self.pid))


@dataclass
class Script:
    """A baseline script run as a subprocess; its last stdout line is JSON."""

    args: list[str]
    result: dict[str, Any] = field(default_factory=dict)
    peak_rss: int = 0
    cpu: float = 0.0  # CPU seconds of the whole process (children included)
    _children_cpu: float = 0.0

    def run(self, timeout: float = 600) -> Script:
        """Run to completion, sampling the RSS of its tree."""
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        self._children_cpu = ru.ru_utime + ru.ru_stime
        proc = subprocess.Popen(
            self.args, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        with PeakRss(proc.pid) as rss:
            out, err = proc.communicate(timeout=timeout)
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.cpu = ru.ru_utime + ru.ru_stime - self._children_cpu
        if proc.returncode != 0:
            raise RuntimeError(f"{self.args[:4]} exited {proc.returncode}: {err.decode()[-2000:]}")
        self.result = json.loads(out.decode().strip().splitlines()[-1])
        self.peak_rss = rss.peak
        return self


def wait_until(pred: Any, timeout: float, every: float = 0.002) -> float:
    """Poll `pred()` until true; returns perf_counter() at that moment."""
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return time.perf_counter()
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(every)


@contextlib.contextmanager
def workdir(prefix: str) -> Iterator[Path]:
    """A temporary directory (removed afterwards; test data never lands in the repo)."""
    d = Path(tempfile.mkdtemp(prefix=f"batchd-bench-{prefix}-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# --- data ---------------------------------------------------------------------------------

_WORDS = (
    "the batch api lets you send many requests at once and get results within a day at half "
    "price summarise translate classify extract answer explain rewrite compare describe list "
    "invoice customer ticket review contract paragraph section table figure value country"
).split()


def chat_file(path: Path, lines: int, total_bytes: int, model: str = "gpt-4o-mini") -> int:
    """Write a valid chat-completions JSONL file of about `total_bytes`; returns its size."""
    rng = random.Random(42)
    per_line = max(200, total_bytes // lines)
    pool = " ".join(rng.choice(_WORDS) for _ in range(20_000))
    with path.open("wb") as f:
        for i in range(lines):
            head = {
                "custom_id": f"req-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": model,
                    "max_tokens": 64,
                    "messages": [
                        {"role": "system", "content": "You are a careful assistant."},
                        {"role": "user", "content": ""},
                    ],
                },
            }
            room = per_line - len(orjson.dumps(head)) - 1
            start = rng.randrange(0, len(pool) - room) if room < len(pool) else 0
            text = (pool * (1 + room // len(pool)))[start : start + max(1, room)]
            head["body"]["messages"][1]["content"] = text  # type: ignore[index]
            f.write(orjson.dumps(head) + b"\n")
    return path.stat().st_size


def small_chat(n: int = 3, tag: str = "") -> bytes:
    """A tiny valid chat file (n lines)."""
    out = []
    for i in range(n):
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"q{tag}{i}"}]}
        line = {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions"}
        out.append(orjson.dumps(line | {"body": body}))
    return b"\n".join(out) + b"\n"


def mb(n: float) -> str:
    """Bytes as MB (10^6)."""
    return f"{n / 1e6:.1f} MB"
