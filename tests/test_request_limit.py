"""The enqueued-request limit: the emulator refuses a batch that would put more than N
requests of a model in flight (OpenAI's wording); batchd learns the limit from the
refusal, or takes it from [admission] request_limits, and admits pieces under it."""

from __future__ import annotations

from pathlib import Path

from batchd.admission import request_limit_from_message
from batchd.api import BatchApi
from batchd.cli import build_parser
from batchd.config import ApiConfig
from batchd.metrics import Metrics
from batchd.store import Store
from tests.conftest import (
    API_KEY,
    drop,
    embedding_lines,
    make_config,
    read_jsonl,
    run_once,
    start_emulator,
)
from tests.procs import wait_for

MODEL = "text-embedding-3-small"


def test_emulator_flag_takes_model_limits() -> None:
    args = build_parser().parse_args(["emulator", "--request-limit", f"{MODEL}=1000000"])
    assert args.request_limit == [(MODEL, 1_000_000)]


async def test_emulator_refuses_over_the_enqueued_request_limit(tmp_path: Path) -> None:
    emu, runner = await start_emulator(
        time_scale=1.0, validating_seconds=0.0, in_progress_seconds=600.0, request_limits={MODEL: 5}
    )
    try:
        cfg = ApiConfig(base_url=emu.url, max_retries=1)
        async with BatchApi(cfg, API_KEY, Metrics()) as api:

            async def submit(n: int, tag: str) -> str:
                path = tmp_path / f"{tag}.jsonl"
                path.write_bytes(embedding_lines(n).replace(b"emb-", f"{tag}-".encode()))
                f = await api.upload(path, path.name, 1 << 30, 1 << 26)
                b = await api.create_batch(f["id"], "/v1/embeddings", "24h", {}, None)
                return str(b["id"])

            async def running(bid: str) -> bool:
                return bool((await api.get_batch(bid))["status"] == "in_progress")

            first = await submit(3, "a")
            await wait_for(lambda: running(first), 10, "the first batch running")
            refused = await submit(3, "b")  # 3 + 3 > 5
            await wait_for(lambda: _ended(api, refused), 10, "the refusal")
            batch = await api.get_batch(refused)
            [err] = batch["errors"]["data"]
            assert batch["status"] == "failed"
            assert err["message"].startswith(f"Enqueued request limit reached for {MODEL}")
            assert request_limit_from_message(err["message"]) == 5
            fits = await submit(2, "c")  # 3 + 2 = 5: accepted
            await wait_for(lambda: running(fits), 10, "the batch that fits running")
    finally:
        await runner.cleanup()
        emu.state.close()


async def _ended(api: BatchApi, bid: str) -> bool:
    return (await api.get_batch(bid))["status"] in ("failed", "completed")


async def test_batchd_learns_the_limit_from_the_refusal(tmp_path: Path) -> None:
    emu, runner = await start_emulator(time_scale=0.1, request_limits={MODEL: 6})
    try:
        cfg = make_config(
            tmp_path,
            emu.url,
            limits={"max_requests_per_batch": 4},  # 10 requests: pieces of 4, 4 and 2
            admission={"refusal_backoff_seconds": 0.05},
        )
        drop(cfg, "emb.jsonl", embedding_lines(10))
        d = await run_once(cfg)
        out = read_jsonl(cfg.spool.dir / "done" / "emb" / "output.jsonl")
        assert sorted(r["custom_id"] for r in out) == sorted(f"emb-{i}" for i in range(10))
        batches = emu.state.batches()
        refused = [b for b in batches if b["status"] == "failed"]
        assert refused, "the three pieces went out together before the limit was known"
        assert all("enqueued requests" in b["errors"]["data"][0]["message"] for b in refused)
        # Once learned, admission never put more than 6 in flight: no refusal after that.
        assert len(refused) <= 2 and len(batches) == 3 + len(refused)
        store = await Store.open(cfg.state.database)
        try:
            assert await store.learned_request_limits() == {MODEL: 6}
            assert await store.learned_limits() == {}
        finally:
            await store.close()
        samples = {
            (s.name, s.labels.get("reason") or s.labels.get("model")): s.value
            for m in d.metrics.registry.collect()
            for s in m.samples
        }
        assert samples[("batchd_retries_total", "request_limit")] == len(refused)
        assert samples[("batchd_request_limit_requests", MODEL)] == 6
    finally:
        await runner.cleanup()
        emu.state.close()


async def test_batchd_admits_under_a_configured_limit(tmp_path: Path) -> None:
    emu, runner = await start_emulator(time_scale=0.1, request_limits={MODEL: 6})
    try:
        cfg = make_config(
            tmp_path,
            emu.url,
            limits={"max_requests_per_batch": 4},
            admission={"request_limits": {MODEL: 6}},
        )
        drop(cfg, "emb.jsonl", embedding_lines(10))
        drop(cfg, "more.jsonl", embedding_lines(6).replace(b"emb-", b"more-"))
        await run_once(cfg)
        batches = emu.state.batches()
        assert {b["status"] for b in batches} == {"completed"}  # never refused
        assert len(batches) == 3 + 2
        for name, n in (("emb", 10), ("more", 6)):
            assert len(read_jsonl(cfg.spool.dir / "done" / name / "output.jsonl")) == n
    finally:
        await runner.cleanup()
        emu.state.close()
