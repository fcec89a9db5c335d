"""What an operator sees: progress, why a job failed, names, one-line errors, CLI manners."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import orjson

from batchd.daemon import Daemon
from batchd.store import NewJob, Store
from tests.conftest import (
    Emulator,
    chat_lines,
    config_file,
    drop,
    make_config,
    run_cli,
    run_once,
    start_emulator,
)
from tests.procs import ROOT, daemon, wait_for

# --- 6, 7. progress while it runs; failures say why ---------------------------------------


async def test_progress_shows_while_the_batch_runs(tmp_path: Path) -> None:
    """Before: jobs, show, the HTTP job and the metrics said 0 completed while the API
    reported 80/200."""
    emu, runner = await start_emulator(
        time_scale=1.0, validating_seconds=0.1, in_progress_seconds=8
    )
    try:
        cfg = make_config(tmp_path, emu.url, http={"listen": "127.0.0.1:0"})
        conf = config_file(tmp_path, emu.url)
        drop(cfg, "long.jsonl", chat_lines(200))
        d = Daemon(cfg)
        task = asyncio.create_task(d.run())

        def progressed() -> bool:
            r = run_cli("jobs", "--json", "-c", str(conf))
            jobs = orjson.loads(r.stdout) if r.returncode == 0 and r.stdout else []
            return bool(jobs) and 0 < jobs[0]["completed"] < 200

        await wait_for(lambda: asyncio.to_thread(progressed), 30, "progress in `jobs`")
        show = await asyncio.to_thread(run_cli, "show", "long", "-c", str(conf))
        assert "(so far)" in show.stdout and "in_progress" in show.stdout
        gauge = d.metrics.requests_in_flight.labels("completed")
        await wait_for(lambda: gauge._value.get() > 0, 10, "the progress gauge")
        d.request_stop()
        await asyncio.wait_for(task, 20)
    finally:
        await runner.cleanup()
        emu.state.close()


async def test_a_failed_batch_says_why_everywhere(tmp_path: Path, emulator: Emulator) -> None:
    """Before: `show` said only "the Batch API rejected the batch"."""
    cfg = make_config(tmp_path, emulator.url)
    conf = config_file(tmp_path, emulator.url)
    drop(cfg, "unknown.jsonl", chat_lines(3, model="x-emulator-unknown-model"))
    d = await run_once(cfg)
    assert d.exit_code == 1  # a job failed
    show = await asyncio.to_thread(run_cli, "show", "unknown", "-c", str(conf))
    assert "model_not_found" in show.stdout and "does not exist" in show.stdout
    assert "(line 1)" in show.stdout
    js = orjson.loads(
        (await asyncio.to_thread(run_cli, "show", "unknown", "--json", "-c", str(conf))).stdout
    )
    assert js["first_error"]["code"] == "model_not_found"


async def test_failed_requests_of_a_done_job_show_the_first_error(
    tmp_path: Path, emulator: Emulator
) -> None:
    cfg = make_config(tmp_path, emulator.url)
    conf = config_file(tmp_path, emulator.url)
    drop(cfg, "some.jsonl", chat_lines(4, fail=[2]))
    await run_once(cfg)
    show = await asyncio.to_thread(run_cli, "show", "some", "-c", str(conf))
    assert "first err  req-2: HTTP 400" in show.stdout
    info = orjson.loads((cfg.spool.dir / "done" / "some" / "job.json").read_bytes())
    assert info["first_error"]["custom_id"] == "req-2"


# --- 8. validate and submit agree with the daemon ----------------------------------------


def test_validate_accepts_what_the_daemon_splits(tmp_path: Path) -> None:
    """Before: files over 50,000 lines were refused although the daemon splits them."""
    big = tmp_path / "big.jsonl"
    big.write_bytes(chat_lines(60_000))
    r = run_cli("validate", str(big))
    assert r.returncode == 0, r.stdout
    assert "60000 requests" in r.stderr and "split into 2 batches" in r.stderr


# --- 10. reused names --------------------------------------------------------------------


async def test_a_name_means_the_newest_job_and_the_name_used_is_accepted(
    tmp_path: Path, emulator: Emulator
) -> None:
    """Before: after two jobs named nightly, `show nightly` answered "ambiguous"."""
    cfg = make_config(tmp_path, emulator.url)
    conf = config_file(tmp_path, emulator.url)
    for i in range(2):
        drop(cfg, "nightly.jsonl", chat_lines(2 + i))
        await run_once(cfg)
    newest = await asyncio.to_thread(run_cli, "show", "nightly", "-c", str(conf))
    assert newest.returncode == 0, newest.stderr
    assert "name       nightly-2   (dropped as nightly)" in newest.stdout
    assert "results    " in newest.stdout and "done/nightly-2" in newest.stdout
    first = await asyncio.to_thread(run_cli, "show", "nightly-2", "--json", "-c", str(conf))
    assert orjson.loads(first.stdout)["job"]["requests"] == 3
    jobs = await asyncio.to_thread(run_cli, "jobs", "-c", str(conf))
    names = [line.split()[1] for line in jobs.stdout.splitlines()[1:]]
    assert names == ["nightly-2", "nightly"]  # newest first, the names used


# --- 12. one-line errors; check creates nothing; no jobs yet -------------------------------


def test_a_busy_port_is_one_line_and_exit_2(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        conf = config_file(tmp_path, "http://127.0.0.1:9/v1", listen=f"127.0.0.1:{port}")
        r = run_cli("run", "-c", str(conf))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"batchd: [http] listen: 127.0.0.1:{port}: address already in use (another batchd, "
        "or another program, listens there)"
    ]


def test_an_unusable_spool_is_one_line_and_exit_2(tmp_path: Path) -> None:
    conf = config_file(tmp_path, "http://127.0.0.1:9/v1")
    (tmp_path / "spool").write_text("a file, not a directory")
    r = run_cli("run", "-c", str(conf))
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "[spool] dir:" in r.stderr


def test_check_creates_nothing_and_jobs_says_no_jobs_yet(tmp_path: Path) -> None:
    conf = config_file(tmp_path, "http://127.0.0.1:9/v1")
    r = run_cli("check", "-c", str(conf))
    assert "created at the first run" in r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batchd.toml"]
    jobs = run_cli("jobs", "-c", str(conf))
    assert jobs.returncode == 0 and "no jobs yet" in jobs.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batchd.toml"]


# --- 14. CLI manners -----------------------------------------------------------------------


async def test_jobs_newest_first_limited_full_names_utc(tmp_path: Path, emulator: Emulator) -> None:
    cfg = make_config(tmp_path, emulator.url)
    conf = config_file(tmp_path, emulator.url)
    long = "a-rather-long-job-name-that-used-to-be-cut-off"
    for i, name in enumerate(("first", "second", long)):
        drop(cfg, f"{name}.jsonl", chat_lines(1 + i))
        await run_once(cfg)
    r = await asyncio.to_thread(run_cli, "jobs", "--limit", "2", "-c", str(conf))
    lines = r.stdout.splitlines()
    assert "CREATED (UTC)" in lines[0]
    assert [ln.split()[1] for ln in lines[1:]] == [long, "second"]
    assert "--limit N for more" in r.stderr
    assert "[retention] jobs_days" in r.stderr  # how far back it sees


async def test_jobs_into_a_closed_pipe_says_nothing(tmp_path: Path) -> None:
    """`batchd jobs | head -1` with more output than a pipe holds: before, a
    BrokenPipeError traceback."""
    conf = config_file(tmp_path, "http://127.0.0.1:9/v1")
    async with Store.connect(tmp_path / "batchd.db") as store:
        await store.create_jobs(
            [
                NewJob(f"01J{i:023d}", f"job-{i}", f"processing/{i}.jsonl", "inbox")
                for i in range(3000)
            ]
        )
    cmd = f"{sys.executable} -m batchd jobs --limit 3000 -c {conf} | head -1"
    r = await asyncio.to_thread(
        subprocess.run, ["bash", "-c", cmd], capture_output=True, text=True, cwd=ROOT
    )
    assert r.stdout.startswith("ID ")
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr


def test_help_is_written_for_users() -> None:
    r = run_cli("--help")
    assert "exit codes:" in r.stdout and "examples:" in r.stdout
    retry = " ".join(run_cli("retry", "--help").stdout.split())
    assert "that have no successful result as a new job" in retry


def test_emulator_port_0_prints_the_bound_port() -> None:
    p = subprocess.Popen(
        [sys.executable, "-m", "batchd", "emulator", "--port", "0"],
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        assert p.stderr is not None
        line = p.stderr.readline().decode()
        assert line.startswith("batchd emulator on http://127.0.0.1:") and ":0/" not in line
    finally:
        p.terminate()
        p.wait(10)
        if p.stderr is not None:
            p.stderr.close()


async def test_cancel_wait_that_times_out_says_the_cancel_goes_on(tmp_path: Path) -> None:
    emu, runner = await start_emulator(
        time_scale=1.0, validating_seconds=0.0, in_progress_seconds=600.0, cancelling_seconds=60
    )
    try:
        conf = config_file(tmp_path, emu.url)
        async with daemon(conf):
            drop(make_config(tmp_path, emu.url), "slow.jsonl", chat_lines(2))
            await wait_for(lambda: bool(emu.state.batches()), 30, "a batch")
            r = await asyncio.to_thread(run_cli, "cancel", "slow", "--wait", "1", "-c", str(conf))
        assert r.returncode == 1
        assert "the cancel goes on" in r.stderr and "batchd show slow" in r.stderr
    finally:
        await runner.cleanup()
        emu.state.close()


async def test_sighup_says_which_keys_need_a_restart(tmp_path: Path, emulator: Emulator) -> None:
    conf = config_file(tmp_path, emulator.url, extra='[log]\nformat = "json"\n')
    async with daemon(conf) as proc:
        text = conf.read_text().replace(
            "poll_interval_seconds = 0.1", "poll_interval_seconds = 0.2"
        )
        conf.write_text(text + "[limits]\nmax_requests_per_batch = 10\n")
        proc.popen.send_signal(signal.SIGHUP)
        await wait_for(lambda: "reload_needs_restart" in proc.text(), 20, "reload line")
    lines = [orjson.loads(x) for x in proc.text().splitlines() if x.startswith("{")]
    need = next(x for x in lines if x["event"] == "reload_needs_restart")
    applied = next(x for x in lines if x["event"] == "reloaded")
    assert need["keys"] == ["limits.max_requests_per_batch"]
    assert "batch.poll_interval_seconds" in applied["applied"]


async def test_listen_port_0_prints_the_bound_address(tmp_path: Path, emulator: Emulator) -> None:
    conf = config_file(tmp_path, emulator.url)
    async with daemon(conf) as proc:  # procs.daemon reads the printed address
        async with aiohttp.ClientSession() as s, s.get(proc.base + "/healthz") as r:
            assert r.status == 200
