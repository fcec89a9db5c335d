"""Shared plumbing of the benchmarks: the emulator and the daemon as real subprocesses,
process-tree RSS/CPU sampling, test data, and the result table.

Every benchmark measures batchd and its baseline against the same local emulator in
one run, alternating the two sides, and reports medians.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import resource
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


def print_table(title: str, rows: Sequence[Row], notes: Sequence[str] = ()) -> None:
    """Print a Markdown table of the rows (the format every benchmark shares)."""
    print(f"\n### {title}\n")
    print(TABLE_HEADER)
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


def write_config(work: Path, base_url: str, http_port: int, **sections: dict[str, Any]) -> Path:
    """A batchd config (defaults, except the given sections) with spool and db under `work`."""
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
    path.write_text("\n".join(lines) + "\n")
    return path


class Daemon:
    """`python -m batchd run --config …` as a subprocess with a fresh spool and database."""

    def __init__(self, work: Path, base_url: str, **sections: dict[str, Any]) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.work = work
        self.port = free_port()
        self.config = write_config(work, base_url, self.port, **sections)
        self.spool = work / "spool"
        self.inbox = self.spool / "inbox"
        self._log = (work / "batchd.log").open("wb")
        self.proc = subprocess.Popen(
            [PY, "-m", "batchd", "run", "--config", str(self.config)],
            cwd=ROOT,
            env=_env(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            _wait_http(self.port, "/readyz", self.proc)
        except BaseException:
            self.stop()
            raise

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
