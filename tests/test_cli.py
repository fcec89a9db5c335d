"""The command line, run as real subprocesses."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
import time
from pathlib import Path

import aiohttp
import orjson
import pytest

from batchd.daemon import Daemon
from batchd.spool import check_name
from batchd.store import Store
from tests.conftest import (
    KEY_ENV,
    Emulator,
    chat_lines,
    config_file,
    drop,
    make_config,
    run_cli,
    run_once,
    start_emulator,
)
from tests.daemon_http import until

ROOT = Path(__file__).resolve().parent.parent


def test_validate_prints_file_line_code_and_exits_1(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_bytes(chat_lines(3))
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(chat_lines(2) + b"{not json\n")
    r = run_cli("validate", str(good), str(bad))
    assert r.returncode == 1
    assert r.stdout.splitlines()[0].startswith(f"{bad}:3: invalid_json: ")
    assert str(good) not in r.stdout
    ok = run_cli("validate", str(good))
    assert ok.returncode == 0 and ok.stdout == ""


def test_validate_missing_file(tmp_path: Path) -> None:
    r = run_cli("validate", str(tmp_path / "nope.jsonl"))
    assert r.returncode == 1
    assert "nope.jsonl:0: unreadable" in r.stdout


async def test_jobs_and_show(tmp_path: Path, emulator: Emulator) -> None:
    cfg = make_config(tmp_path, emulator.url)
    drop(cfg, "listed.jsonl", chat_lines(2))
    await run_once(cfg)
    conf = config_file(tmp_path, emulator.url)
    r = await asyncio.to_thread(run_cli, "jobs", "--config", str(conf))
    assert r.returncode == 0 and "listed" in r.stdout and "done" in r.stdout
    js = orjson.loads((await asyncio.to_thread(run_cli, "jobs", "--json", "-c", str(conf))).stdout)
    job_id = js[0]["id"]
    for ref in (job_id, job_id[:20], "listed"):
        s = await asyncio.to_thread(run_cli, "show", ref, "--config", str(conf))
        assert s.returncode == 0, s.stderr
        assert job_id in s.stdout and "batch_" in s.stdout and "collecting->done" in s.stdout
    shown = orjson.loads(
        (await asyncio.to_thread(run_cli, "show", "listed", "--json", "-c", str(conf))).stdout
    )
    assert shown["job"]["state"] == "done" and shown["attempts"][0]["batch_id"]
    missing = await asyncio.to_thread(run_cli, "show", "nothing", "-c", str(conf))
    assert missing.returncode == 3


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_sigterm_stops_gracefully_with_store_consistent(
    tmp_path: Path, emulator: Emulator
) -> None:
    port = _free_port()
    conf = config_file(tmp_path, emulator.url, listen=f"127.0.0.1:{port}")
    env = {**os.environ, KEY_ENV: "sk-test-0123456789abcdefSECRET"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "batchd",
        "run",
        "--config",
        str(conf),
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(400):
                try:
                    async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("daemon never became ready")
            drop(make_config(tmp_path, emulator.url), "sig.jsonl", chat_lines(3))
            for _ in range(400):
                if emulator.state.batches_created:
                    break
                await asyncio.sleep(0.05)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.wait_for(proc.wait(), 10)
        assert rc == 0
        assert time.monotonic() - t0 < 10
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    _, err = await proc.communicate()
    assert b"Traceback" not in err
    assert b"0123456789abcdefSECRET" not in err  # the key never reaches a log line
    db = sqlite3.connect(tmp_path / "batchd.db")
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    db.close()


async def test_submit_copies_atomically_never_overwrites(
    tmp_path: Path, emulator: Emulator
) -> None:
    conf = config_file(tmp_path, emulator.url)
    src = tmp_path / "mine.jsonl"
    src.write_bytes(chat_lines(2))
    r1 = await asyncio.to_thread(run_cli, "submit", str(src), "--config", str(conf))
    r2 = await asyncio.to_thread(run_cli, "submit", str(src), "--name", "mine", "-c", str(conf))
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    inbox = tmp_path / "spool" / "inbox"
    assert sorted(p.name for p in inbox.iterdir()) == ["mine-2.jsonl", "mine.jsonl"]
    assert (inbox / "mine.jsonl").read_bytes() == src.read_bytes()
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"{nope\n")
    r3 = await asyncio.to_thread(run_cli, "submit", str(bad), "-c", str(conf))
    assert r3.returncode == 1 and f"{bad}:1: invalid_json" in r3.stdout
    assert not (inbox / "bad.jsonl").exists()
    await run_once(make_config(tmp_path, emulator.url, spool={"dir": str(tmp_path / "spool")}))
    assert (tmp_path / "spool" / "done" / "mine-2" / "output.jsonl").exists()
    r4 = await asyncio.to_thread(
        run_cli, "jobs", "--state", "done", "--since", "1h", "-c", str(conf)
    )
    assert r4.stdout.count("done") == 2
    r5 = await asyncio.to_thread(run_cli, "jobs", "--state", "failed", "-c", str(conf))
    assert "mine" not in r5.stdout


async def test_check_reports_each_thing(tmp_path: Path, emulator: Emulator) -> None:
    conf = config_file(tmp_path, emulator.url)
    env = {**os.environ, KEY_ENV: "sk-test-0123456789abcdefSECRET"}
    ok = await asyncio.to_thread(run_cli, "check", "-c", str(conf), env=env)
    assert ok.returncode == 0, ok.stdout
    assert [line.split()[:2] for line in ok.stdout.splitlines()] == [
        ["ok", "config"],
        ["ok", "spool"],
        ["ok", "database"],
        ["ok", "api"],
        ["ok", "proxy"],
        ["ok", "api"],
    ]
    wrong = await asyncio.to_thread(
        run_cli, "check", "-c", str(conf), env={**env, KEY_ENV: "sk-wrong-key-000000000000"}
    )
    assert wrong.returncode == 1
    assert "FAIL  api" in wrong.stdout and "401" in wrong.stdout
    assert "sk-wrong-key-000000000000" not in wrong.stdout
    nokey = await asyncio.to_thread(
        run_cli, "check", "-c", str(conf), env={k: v for k, v in env.items() if k != KEY_ENV}
    )
    assert nokey.returncode == 1 and "FAIL  api key" in nokey.stdout


def _inbox(tmp_path: Path) -> list[str]:
    inbox = tmp_path / "spool" / "inbox"
    return sorted(p.name for p in inbox.iterdir()) if inbox.exists() else []


@pytest.mark.parametrize(
    ("name", "stem"), [("nightly", "nightly"), ("nightly.jsonl", "nightly"), ("a.b-c_1", "a.b-c_1")]
)
def test_check_name_accepts(name: str, stem: str) -> None:
    assert check_name(name) == stem


@pytest.mark.parametrize("name", [".hidden", ".x.jsonl", "", ".jsonl", "../x", "sp ace", "a" * 101])
def test_check_name_refuses(name: str) -> None:
    with pytest.raises(ValueError, match="invalid name"):
        check_name(name)


def test_submit_refuses_names_intake_would_ignore(tmp_path: Path) -> None:
    # Before the fix `--name .hidden` (or a source `.x.jsonl`) became inbox/.hidden.jsonl,
    # which intake never takes, and submit still reported success.
    conf = config_file(tmp_path, "http://127.0.0.1:9/v1")
    src = tmp_path / "good.jsonl"
    src.write_bytes(chat_lines(2))
    r = run_cli("submit", str(src), "--name", ".hidden", "-c", str(conf))
    assert r.returncode == 2 and "--name" in r.stderr and "invalid name '.hidden'" in r.stderr
    hidden = tmp_path / ".x.jsonl"
    hidden.write_bytes(chat_lines(2))
    r = run_cli("submit", str(src), str(hidden), "-c", str(conf))
    assert r.returncode == 2 and "pass --name" in r.stderr, r.stderr
    assert _inbox(tmp_path) == []  # checked before anything is copied
    r = run_cli("submit", str(hidden), "--name", "x", "-c", str(conf))
    assert r.returncode == 0, r.stderr
    r = run_cli("submit", str(src), "--name", "nightly.jsonl", "-c", str(conf))
    assert r.returncode == 0, r.stderr
    assert _inbox(tmp_path) == ["nightly.jsonl", "x.jsonl"]


async def test_jobs_since_takes_epoch_seconds_and_zoneless_iso(tmp_path: Path) -> None:
    conf = config_file(tmp_path, "http://127.0.0.1:9/v1")
    await (await Store.open(tmp_path / "batchd.db")).close()
    for since in ("1700000000", "2023-11-14T22:13:20", "2023-11-14T22:13:20Z", "2h"):
        r = await asyncio.to_thread(run_cli, "jobs", "--since", since, "-c", str(conf))
        assert r.returncode == 0, (since, r.stderr)
    r = await asyncio.to_thread(run_cli, "jobs", "--since", "yesterday", "-c", str(conf))
    assert r.returncode == 2 and "--since" in r.stderr


def _job_state(db: Path) -> str | None:
    con = sqlite3.connect(db)
    try:
        row = con.execute("SELECT state FROM jobs").fetchone()
    except sqlite3.OperationalError:
        return None
    finally:
        con.close()
    return None if row is None else str(row[0])


async def test_cancel_without_a_daemon_leaves_the_inbox_alone(tmp_path: Path) -> None:
    # Before the fix, `cancel` with no daemon ran `Daemon(once=True)`: it claimed and
    # submitted every file waiting in the inbox and waited for all of them.
    emu, runner = await start_emulator(
        time_scale=1.0, validating_seconds=0.0, in_progress_seconds=600.0, cancelling_seconds=0.2
    )
    try:
        cfg = make_config(tmp_path, emu.url)
        conf = config_file(tmp_path, emu.url)
        drop(cfg, "slow.jsonl", chat_lines(4))
        d = Daemon(cfg, serve_http=False)
        task = asyncio.create_task(d.run())
        await until(lambda: _job_state(tmp_path / "batchd.db") == "tracking", timeout=30)
        d.request_stop()
        await asyncio.wait_for(task, 10)
        drop(cfg, "other.jsonl", chat_lines(2))
        r = await asyncio.to_thread(run_cli, "cancel", "slow", "--wait", "30", "-c", str(conf))
        assert r.returncode == 0, r.stderr
        assert "\ncancelled: " in r.stdout
        assert _inbox(tmp_path) == ["other.jsonl"]  # untouched
        assert not list((tmp_path / "spool" / "processing").glob("*other*"))
        [batch] = emu.state.batches()
        assert batch["status"] == "cancelled"
        info = orjson.loads((tmp_path / "spool" / "done" / "slow" / "job.json").read_bytes())
        assert info["status"] == "cancelled"
        again = await asyncio.to_thread(run_cli, "cancel", "slow", "-c", str(conf))
        assert again.returncode == 1 and "already ended" in again.stderr
    finally:
        await runner.cleanup()
        emu.state.close()
