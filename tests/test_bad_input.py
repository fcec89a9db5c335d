"""Bad input through the real daemon: every file is answered by a report naming the line,
the original is kept, and the daemon keeps serving the others."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import orjson

from batchd.spool import Spool
from tests.conftest import Emulator, chat_lines, drop, make_config, read_jsonl, run_once

DATA = Path(__file__).parent / "data"


async def test_corpus_each_file_failed_with_its_line_and_original_kept(
    tmp_path: Path, emulator: Emulator
) -> None:
    expected = orjson.loads((DATA / "bad" / "EXPECTED.json").read_bytes())
    cfg = make_config(tmp_path, emulator.url)
    inbox = cfg.spool.dir / "inbox"
    inbox.mkdir(parents=True)
    for name in expected:
        shutil.copyfile(DATA / "bad" / name, inbox / name)
    outside = tmp_path / "secret-outside.jsonl"
    outside.write_bytes(chat_lines(2))
    os.symlink(outside, inbox / "link.jsonl")
    (inbox / "adir.jsonl").mkdir()
    drop(cfg, "good.jsonl", chat_lines(3))
    await run_once(cfg)

    failed = cfg.spool.dir / "failed"
    for name, want in expected.items():
        d = failed / name[: -len(".jsonl")]
        report = orjson.loads((d / "report.json").read_bytes())
        first = report["problems"][0]
        assert (first["code"], first["line"]) == (want["code"], want["line"]), name
        assert report["reason"] == "invalid_input" and first["message"]
        assert (d / "input.jsonl").read_bytes() == (DATA / "bad" / name).read_bytes(), name
    link = failed / "link"
    assert orjson.loads((link / "report.json").read_bytes())["problems"][0]["code"] == (
        "not_a_file"
    )
    assert (link / "input.jsonl").is_symlink()  # kept as it was, never followed
    assert os.readlink(link / "input.jsonl") == str(outside)
    assert (failed / "adir" / "input.jsonl").is_dir()
    assert len(read_jsonl(cfg.spool.dir / "done" / "good" / "output.jsonl")) == 3
    assert emulator.state.batches_created == 1
    assert not list((cfg.spool.dir / "processing").iterdir())
    assert not list(inbox.iterdir())


async def test_single_10mb_line_is_valid(tmp_path: Path, emulator: Emulator) -> None:
    cfg = make_config(tmp_path, emulator.url)
    big = orjson.dumps(
        {
            "custom_id": "big",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": "x" * 10_000_000}],
            },
        }
    )
    drop(cfg, "big.jsonl", big + b"\n")
    await run_once(cfg)
    assert len(read_jsonl(cfg.spool.dir / "done" / "big" / "output.jsonl")) == 1


def test_file_deleted_before_claim_is_skipped(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.ensure()
    assert spool.claim("gone.jsonl") is None
    assert not list(spool.processing.iterdir())


async def test_file_deleted_after_claim_fails_with_reason(
    tmp_path: Path, emulator: Emulator
) -> None:
    from batchd.store import Store

    cfg = make_config(tmp_path, emulator.url)
    spool = Spool(cfg.spool.dir)
    spool.ensure()
    (spool.inbox / "vanish.jsonl").write_bytes(chat_lines(1))
    claimed = spool.claim("vanish.jsonl")
    assert claimed is not None
    store = await Store.open(cfg.state.database)
    await store.create_job(claimed.job_id, claimed.name, claimed.rel_path, "inbox")
    await store.close()
    spool.path(claimed.rel_path).unlink()
    await run_once(cfg)
    report = orjson.loads((cfg.spool.dir / "failed" / "vanish" / "report.json").read_bytes())
    assert report["problems"][0]["code"] == "not_a_file"
