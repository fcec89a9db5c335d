"""The drop folder as people really use it: writers that write in place, a bad key, a
wrong base URL, an input removed under the daemon, an unreadable file, other suffixes.

Each runs the real daemon (a subprocess where the behaviour is about the process) and
real writers (a shell redirection, a chunked copy) against the emulator over loopback.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import zstandard

from batchd.config import Config
from batchd.spool import Spool
from batchd.stages import submit
from batchd.store import Store
from tests.conftest import (
    API_KEY,
    KEY_ENV,
    Emulator,
    chat_lines,
    config_file,
    drop,
    make_config,
    read_jsonl,
    run_cli,
    run_once,
    start_emulator,
)
from tests.procs import daemon, wait_for


def _put(spool: Path, name: str, data: bytes) -> None:
    """Write elsewhere, then rename into inbox/ (the documented convention)."""
    (spool / "inbox").mkdir(parents=True, exist_ok=True)
    part = spool / f".{name}.part"
    part.write_bytes(data)
    os.replace(part, spool / "inbox" / name)


def _done(spool: Path, name: str) -> bool:
    return (spool / "done" / name / "job.json").exists()


def _failed(spool: Path, name: str) -> bool:
    return (spool / "failed" / name / "report.json").exists()


# --- 1. files written in place ----------------------------------------------------------


async def test_slow_shell_redirection_is_taken_whole(tmp_path: Path, emulator: Emulator) -> None:
    """`(head -1 f; sleep 3; tail -n +2 f) > inbox/slow.jsonl`: before, the daemon took
    the file after its first line and submitted 1 of 5 requests."""
    src = tmp_path / "f.jsonl"
    src.write_bytes(chat_lines(5))
    conf = config_file(tmp_path, emulator.url, extra="[intake]\nsettle_seconds = 0.5\n")
    spool = tmp_path / "spool"
    async with daemon(conf):
        cmd = f"(head -1 {src}; sleep 3; tail -n +2 {src}) > {spool}/inbox/slow.jsonl"
        await asyncio.to_thread(subprocess.run, ["bash", "-c", cmd], check=True)
        await wait_for(lambda: _done(spool, "slow"), 60, "done/slow")
    done = spool / "done" / "slow"
    assert (done / "input.jsonl").read_bytes() == src.read_bytes()
    info = orjson.loads((done / "job.json").read_bytes())
    assert info["request_counts"] == {"total": 5, "completed": 5, "failed": 0}
    assert info["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert emulator.state.batches_created == 1


_CHUNKED_COPY = """
import sys, time
src, dest = sys.argv[1], sys.argv[2]
with open(src, "rb") as fin, open(dest, "wb") as fout:
    n = 0
    while chunk := fin.read(65536):
        fout.write(chunk)
        fout.flush()
        n += 1
        time.sleep(1.5 if n == 3 else 0.01)  # a writer that pauses with the file open
"""


async def test_chunked_copy_of_20000_lines_is_taken_whole(
    tmp_path: Path, emulator: Emulator
) -> None:
    """A 20,000-line file copied in 64 KiB chunks: before, it went to failed/ as
    "line 401: invalid JSON" although the copy was valid."""
    src = tmp_path / "big.jsonl"
    src.write_bytes(chat_lines(20_000))
    conf = config_file(tmp_path, emulator.url, extra="[intake]\nsettle_seconds = 0.5\n")
    spool = tmp_path / "spool"
    async with daemon(conf):
        dest = spool / "inbox" / "big.jsonl"
        await asyncio.to_thread(
            subprocess.run, [sys.executable, "-c", _CHUNKED_COPY, str(src), str(dest)], check=True
        )
        await wait_for(lambda: _done(spool, "big"), 90, "done/big")
    assert not (spool / "failed").exists() or not list((spool / "failed").iterdir())
    out = read_jsonl(spool / "done" / "big" / "output.jsonl")
    assert len(out) == 20_000
    assert emulator.state.batches_created == 1


def _append_rest_once(cfg: Config, rest: bytes) -> Callable[[], None]:
    """A writer still at the claimed file: appends `rest` to it, once."""
    done: list[bool] = []

    def append() -> None:
        if not done:
            done.append(True)
            [inp] = list((cfg.spool.dir / "processing").glob("*--growing.jsonl"))
            with inp.open("ab") as f:
                f.write(rest)

    return append


async def test_input_changing_while_it_is_read_is_read_again(
    tmp_path: Path, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer the lease check could not see (NFS, another user's file) appends while
    the claimed file is validated and uploaded: the change is noticed at the end of the
    read, the upload is dropped, and the file is read again from the start."""
    cfg = make_config(tmp_path, emulator.url)
    lines = chat_lines(30).splitlines(keepends=True)
    append = _append_rest_once(cfg, b"".join(lines[10:]))
    feed = submit._Reader.feed

    def feeding(self: submit._Reader, chunk: bytes) -> None:
        feed(self, chunk)
        append()

    monkeypatch.setattr(submit._Reader, "feed", feeding)
    drop(cfg, "growing.jsonl", b"".join(lines[:10]))
    await run_once(cfg, timeout=60)
    info = orjson.loads((cfg.spool.dir / "done" / "growing" / "job.json").read_bytes())
    assert info["request_counts"] == {"total": 30, "completed": 30, "failed": 0}
    assert emulator.state.batches_created == 1
    assert len(emulator.state.files) <= 2  # the first upload was deleted (+ results)


async def test_input_changing_after_validation_starts_over_before_any_batch(
    tmp_path: Path, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same writer, a moment later: validated and uploaded, not yet created. The job
    goes back to validating instead of sending a batch of the first 10 lines."""
    cfg = make_config(tmp_path, emulator.url)
    lines = chat_lines(30).splitlines(keepends=True)
    append = _append_rest_once(cfg, b"".join(lines[10:]))
    check = submit._input_changed

    async def checking(ctx: Any, job: Any, att: Any) -> bool:
        append()
        return await check(ctx, job, att)

    monkeypatch.setattr(submit, "_input_changed", checking)
    drop(cfg, "growing.jsonl", b"".join(lines[:10]))
    await run_once(cfg, timeout=60)
    info = orjson.loads((cfg.spool.dir / "done" / "growing" / "job.json").read_bytes())
    assert info["request_counts"] == {"total": 30, "completed": 30, "failed": 0}
    assert emulator.state.batches_created == 1
    store = await Store.open(cfg.state.database)
    try:
        [job] = await store.list_jobs()
        kinds = [e.kind for e in await store.events(job.id)]
    finally:
        await store.close()
    assert "input_changed" in kinds


# --- 2. the API refuses access: hold, say so, carry on --------------------------------


async def _metric(proc_get: object, name: str) -> str:
    _status, text = await proc_get("/metrics")  # type: ignore[operator]
    return "\n".join(line for line in text.splitlines() if line.startswith(name))


async def test_wrong_key_holds_jobs_then_the_right_key_releases_them(
    tmp_path: Path, emulator: Emulator
) -> None:
    """Before: every dropped file went to failed/ as api_rejected within 30 ms, the
    daemon said it was ready, and nothing told the operator."""
    key = tmp_path / "key"
    key.write_text("sk-wrong-0123456789\n")
    conf = config_file(tmp_path, emulator.url)
    text = conf.read_text().replace(f'api_key_env = "{KEY_ENV}"', f'api_key_file = "{key}"')
    conf.write_text(text)
    spool = tmp_path / "spool"
    async with daemon(conf) as proc:
        _put(spool, "held.jsonl", chat_lines(3))

        async def held() -> bool:
            status, body = await proc.get("/readyz")
            return status == 503 and '"held"' in body

        await wait_for(held, 30, "/readyz 503 held")
        assert 'batchd_api_access_denied{reason="api_key"} 1.0' in await _metric(
            proc.get, "batchd_api_access_denied"
        )
        jobs = await asyncio.to_thread(run_cli, "jobs", "-c", str(conf))
        assert "(held)" in jobs.stdout and "HELD since" in jobs.stderr
        assert "Incorrect API key" in jobs.stderr
        assert "Incorrect API key" in proc.text()  # the API's message is in the log
        assert not (spool / "failed").exists() or not list((spool / "failed").iterdir())
        key.write_text(API_KEY + "\n")
        proc.popen.send_signal(signal.SIGHUP)
        await wait_for(lambda: _done(spool, "held"), 30, "done/held after SIGHUP")
        status, _ = await proc.get("/readyz")
        assert status == 200
        assert 'batchd_api_access_denied{reason="api_key"} 0.0' in await _metric(
            proc.get, "batchd_api_access_denied"
        )
    assert API_KEY not in proc.text() and "sk-wrong-0123456789" not in proc.text()


async def test_missing_key_file_appears_and_daemon_carries_on_by_itself(
    tmp_path: Path, emulator: Emulator
) -> None:
    conf = config_file(tmp_path, emulator.url)
    text = conf.read_text().replace(f'api_key_env = "{KEY_ENV}"', 'api_key_env = "NO_SUCH_VAR"')
    conf.write_text(text)
    creds = tmp_path / "creds"
    creds.mkdir()
    spool = tmp_path / "spool"
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    async with daemon(conf, env=env) as proc:
        _put(spool, "later.jsonl", chat_lines(2))

        async def held() -> bool:
            status, body = await proc.get("/readyz")
            return status == 503 and "no API key" in body

        await wait_for(held, 30, "held for no key")
        (creds / "openai_api_key").write_text(API_KEY)  # no SIGHUP: the probe re-reads it
        await wait_for(lambda: _done(spool, "later"), 40, "done/later after the key appeared")


async def test_base_url_without_v1_holds_and_says_so(tmp_path: Path, emulator: Emulator) -> None:
    """Before: every job failed as `404`."""
    root = emulator.url.removesuffix("/v1")
    conf = config_file(tmp_path, root)
    spool = tmp_path / "spool"
    async with daemon(conf) as proc:
        _put(spool, "wrong.jsonl", chat_lines(2))

        async def held() -> bool:
            status, body = await proc.get("/readyz")
            return status == 503 and "end in /v1" in body

        await wait_for(held, 30, "held for the base URL")
        show = await asyncio.to_thread(run_cli, "show", "wrong", "-c", str(conf))
        assert "(held)" in show.stdout and "base_url end in /v1" in show.stdout
    assert not (spool / "failed").exists() or not list((spool / "failed").iterdir())
    conf.write_text(conf.read_text().replace(f'"{root}"', f'"{emulator.url}"'))
    r = await asyncio.to_thread(run_cli, "run", "--once", "-c", str(conf))
    assert r.returncode == 0, r.stderr
    assert _done(spool, "wrong")


# --- 3. money spent twice -----------------------------------------------------------------


async def test_duplicate_drop_is_held_unless_allowed(tmp_path: Path, emulator: Emulator) -> None:
    """Before: a file dropped twice was submitted twice, although its sha256 was known."""
    cfg = make_config(tmp_path, emulator.url, intake={"duplicate_window": "7d"})
    conf = config_file(tmp_path, emulator.url)
    data = chat_lines(3)
    drop(cfg, "nightly.jsonl", data)
    await run_once(cfg)
    drop(cfg, "nightly.jsonl", data)
    await run_once(cfg)
    assert emulator.state.batches_created == 1
    report = orjson.loads((cfg.spool.dir / "failed" / "nightly-2" / "report.json").read_bytes())
    first = orjson.loads((cfg.spool.dir / "done" / "nightly" / "job.json").read_bytes())
    assert report["reason"] == "duplicate_of" and report["duplicate_of"] == first["job_id"]
    assert "--allow-duplicate" in report["message"]
    src = tmp_path / "nightly.jsonl"
    src.write_bytes(data)
    r = await asyncio.to_thread(run_cli, "submit", str(src), "--allow-duplicate", "-c", str(conf))
    assert r.returncode == 0, r.stderr
    await run_once(cfg)
    assert emulator.state.batches_created == 2
    assert _done(cfg.spool.dir, "nightly-3")
    assert not list((cfg.spool.dir / ".allow-duplicate").iterdir())  # used once


async def test_retry_twice_submits_once(tmp_path: Path, emulator: Emulator) -> None:
    """Before: `batchd retry JOB` twice submitted the same requests twice; a `done` job
    with failed requests could not be retried at all."""
    cfg = make_config(tmp_path, emulator.url)
    conf = config_file(tmp_path, emulator.url)
    drop(cfg, "partly.jsonl", chat_lines(5, fail=[1, 3]))
    await run_once(cfg)
    first = await asyncio.to_thread(run_cli, "retry", "partly", "-c", str(conf))
    assert first.returncode == 0, first.stderr
    assert "queued 2 request(s)" in first.stdout
    second = await asyncio.to_thread(run_cli, "retry", "partly", "-c", str(conf))
    assert second.returncode == 1
    assert "already retried as job" in second.stderr and "partly-retry" in second.stderr
    await run_once(cfg)
    assert emulator.state.batches_created == 2
    retry_out = cfg.spool.dir / "done" / "partly-retry"
    ids = [r["custom_id"] for r in read_jsonl(retry_out / "errors.jsonl")]
    assert sorted(ids) == ["req-1", "req-3"]  # the same two fail again in the emulator
    third = await asyncio.to_thread(run_cli, "retry", "partly", "-c", str(conf))
    assert third.returncode == 1


# --- 4. an input removed from processing/ -------------------------------------------------


async def test_input_removed_while_tracking_ends_the_job(tmp_path: Path) -> None:
    """Before: the job stayed `tracking` for ever and downloaded the output again and
    again."""
    emu, runner = await start_emulator(time_scale=0.2)
    try:
        cfg = make_config(tmp_path, emu.url)
        drop(cfg, "vanishing.jsonl", chat_lines(4, fail=[2]))
        task = asyncio.create_task(run_once(cfg, timeout=60))
        store = await Store.open(cfg.state.database)
        try:

            async def has_batch() -> bool:
                if task.done():  # the daemon ended early: say why
                    task.result()
                jobs = await store.list_jobs()
                return bool(jobs) and any(a.batch_id for a in await store.attempts(jobs[0].id))

            await wait_for(has_batch, 30, "a batch")
            [inp] = list((cfg.spool.dir / "processing").glob("*--vanishing.jsonl"))
            inp.unlink()
        finally:
            await store.close()
        await task
        done = cfg.spool.dir / "done" / "vanishing"
        assert not (done / "input.jsonl").exists()
        info = orjson.loads((done / "job.json").read_bytes())
        assert "input_missing" in info
        assert len(read_jsonl(done / "output.jsonl")) == 3
        downloads = emu.state.stats()["calls"].get("GET /v1/files/{id}/content", 0)
        assert downloads == 2  # output and errors, once each
    finally:
        await runner.cleanup()
        emu.state.close()


# --- 5. an unreadable file ----------------------------------------------------------------


def _setpriv() -> list[str]:
    if os.geteuid() != 0:  # not root: permissions apply to the daemon as they are
        return []
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]


async def test_unreadable_file_fails_with_the_reason(tmp_path: Path, emulator: Emulator) -> None:
    """Before: retried for ever as a network error."""
    conf = config_file(tmp_path, emulator.url)
    spool = tmp_path / "spool"
    Spool(spool).ensure()
    part = tmp_path / "secret.part"
    part.write_bytes(chat_lines(2))
    part.chmod(0)
    os.replace(part, spool / "inbox" / "secret.jsonl")
    async with daemon(conf, prefix=_setpriv()):
        await wait_for(lambda: _failed(spool, "secret"), 30, "failed/secret")
    report = orjson.loads((spool / "failed" / "secret" / "report.json").read_bytes())
    assert report["problems"][0]["code"] == "unreadable"
    assert "cannot read file: permission denied" in report["message"]
    assert emulator.state.batches_created == 0


# --- 11. other names ----------------------------------------------------------------------


async def test_other_suffixes_are_taken_and_the_rest_reported(
    tmp_path: Path, emulator: Emulator
) -> None:
    cfg = make_config(tmp_path, emulator.url)
    inbox = cfg.spool.dir / "inbox"
    inbox.mkdir(parents=True)
    (inbox / "upper.JSONL").write_bytes(chat_lines(2, model="m1"))
    (inbox / "lines.ndjson").write_bytes(chat_lines(2, model="m2"))
    (inbox / "packed.jsonl.gz").write_bytes(gzip.compress(chat_lines(3, model="m3")))
    (inbox / "tight.jsonl.zst").write_bytes(zstandard.compress(chat_lines(4, model="m4")))
    (inbox / "broken.jsonl.gz").write_bytes(b"not gzip at all")
    (inbox / "notes.json").write_bytes(b"{}")
    (inbox / "subdir").mkdir()
    old = time.time() - 60
    for p in inbox.iterdir():
        os.utime(p, (old, old))
    d = await run_once(cfg)
    for name, n in (("upper", 2), ("lines", 2), ("packed", 3), ("tight", 4)):
        assert len(read_jsonl(cfg.spool.dir / "done" / name / "output.jsonl")) == n, name
    report = orjson.loads((cfg.spool.dir / "failed" / "broken" / "report.json").read_bytes())
    assert report["problems"][0]["code"] == "invalid_compression"
    assert sorted(p.name for p in inbox.iterdir()) == ["notes.json", "subdir"]
    assert d.metrics.inbox_ignored._value.get() == 2
