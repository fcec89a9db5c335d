"""The facade over a batch's hard edges, with the official Python SDK: cancel mid-flight,
kill -9 of batchd between create and completion, the enqueued-token limit (held in
`validating`, never a failed batch), expired requests resubmitted under the same id."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.conftest import chat_lines
from tests.emulator_server import Server, serve
from tests.facade_support import Running, daemon, wait_ended, wait_for, write_config
from tests.test_facade_sdk import create, job_id_of, lines_of, upload, upstream_of


def _statuses_until_end(live: Running, batch_id: str, timeout: float = 60) -> list[str]:
    """Every status a polling client sees, in order (repeats dropped)."""
    client = live.client("alpha")
    seen: list[str] = []

    def step() -> bool:
        status = client.batches.retrieve(batch_id).status
        if not seen or seen[-1] != status:
            seen.append(status)
        return status in ("completed", "failed", "expired", "cancelled")

    wait_for(step, timeout, f"{batch_id} ended")
    return seen


@pytest.fixture(scope="module")
def slow() -> Iterator[Server]:
    """Batches validate in 0.3 s and run for 0.9 s: long enough to act while they run."""
    with serve(time_scale=0.3) as server:
        yield server


def test_cancel_in_progress_keeps_what_finished(slow: Server, tmp_path: Path) -> None:
    with daemon(write_config(tmp_path, slow.url)) as live:
        client = live.client("alpha")
        b = create(client, upload(client, chat_lines(40)).id)
        wait_for(lambda: client.batches.retrieve(b.id).status == "in_progress", 30, "running")
        assert client.batches.cancel(b.id).status == "cancelling"
        end = wait_ended(client, b.id)
        assert end.status == "cancelled" and end.cancelling_at and end.cancelled_at
        done = end.request_counts.completed
        assert 0 < done < 40 and end.request_counts.total == 40
        assert len(lines_of(client, end.output_file_id)) == done


def test_kill_9_between_create_and_completion(slow: Server, tmp_path: Path) -> None:
    config = write_config(tmp_path, slow.url)
    with daemon(config) as live:
        client = live.client("alpha")
        early = create(client, upload(client, chat_lines(30)).id, metadata={"at": "create"})
        live.kill9()  # just after the create was answered
    with daemon(config) as live:
        client = live.client("alpha")
        running = create(client, upload(client, chat_lines(30)).id, metadata={"at": "running"})
        wait_for(lambda: client.batches.retrieve(running.id).status == "in_progress", 30, "run")
        live.kill9()  # while its batch runs upstream
    with daemon(config) as live:
        client = live.client("alpha")
        for b in (early, running):
            assert client.batches.retrieve(b.id).status != "failed"
            end = wait_ended(client, b.id)
            assert end.status == "completed" and end.request_counts.completed == 30, end
            ids = [r["custom_id"] for r in lines_of(client, end.output_file_id)]
            assert sorted(ids) == sorted(f"req-{i}" for i in range(30))
            assert len(upstream_of(slow, job_id_of(live, b.id))) == 1  # never created twice
        assert len(list(client.batches.list())) == 2


def test_held_in_validating_under_the_enqueued_token_limit(tmp_path: Path) -> None:
    data = chat_lines(40)
    per_batch = sum(len(orjson.dumps(orjson.loads(x)["body"])) // 4 for x in data.splitlines())
    limit = per_batch * 3 // 2  # one batch fits, two do not
    extra = "[admission]\nrefusal_backoff_seconds = 0.2\n"
    with (
        serve(time_scale=0.5, token_limits={"gpt-4o-mini": limit}) as emu,
        daemon(write_config(tmp_path, emu.url, extra)) as live,
    ):
        client = live.client("alpha")
        first = create(client, upload(client, data).id, metadata={"n": "1"})
        wait_for(lambda: client.batches.retrieve(first.id).status == "in_progress", 30, "run")
        second = create(client, upload(client, data).id, metadata={"n": "2"})
        seen = _statuses_until_end(live, second.id)
        assert seen[-1] == "completed" and "failed" not in seen, seen
        assert seen[0] == "validating"
        up = upstream_of(emu, job_id_of(live, second.id))
        refused = [u for u in up if u["status"] == "failed"]
        assert refused and refused[0]["errors"]["data"][0]["code"] == "token_limit_exceeded"
        end = client.batches.retrieve(second.id)
        assert end.request_counts.completed == 40 and end.errors is None
        assert wait_ended(client, first.id).status == "completed"


@pytest.fixture(scope="module")
def expiring(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Running]]:
    """Every batch expires halfway through (the emulator's knob), two attempts per piece."""
    extra = "[retry]\nmax_attempts_per_piece = 2\n"
    with serve(time_scale=0.1, expire_after_seconds=1.5) as emu:
        config = write_config(tmp_path_factory.mktemp("expiry"), emu.url, extra)
        with daemon(config) as live:
            yield emu, live


def test_expired_when_retries_run_out(expiring: tuple[Server, Running]) -> None:
    emu, live = expiring
    client = live.client("alpha")
    data = chat_lines(10, hooks={2: {"expire": True}, 7: {"expire": True}})
    end = wait_ended(client, create(client, upload(client, data).id).id)
    assert end.status == "expired" and end.expired_at, end
    assert (end.request_counts.completed, end.request_counts.failed) == (8, 2)
    assert len(lines_of(client, end.output_file_id)) == 8
    errs = lines_of(client, end.error_file_id)
    assert {r["custom_id"] for r in errs} == {"req-2", "req-7"}
    assert len(upstream_of(emu, job_id_of(live, end.id))) == 2  # resubmitted once


def test_expired_requests_are_finished_under_the_same_id(
    expiring: tuple[Server, Running],
) -> None:
    emu, live = expiring
    client = live.client("alpha")
    b = create(client, upload(client, chat_lines(20)).id)
    job = job_id_of(live, b.id)

    def first_expired() -> bool:
        return any(u["status"] == "expired" for u in upstream_of(emu, job))

    wait_for(first_expired, 30, "the first attempt expired")

    def no_more_expiry() -> None:
        emu.state.config.expire_after_seconds = None

    emu.call(no_more_expiry)  # the follow-up attempt runs to the end
    end = wait_ended(client, b.id)
    assert end.status == "completed", end
    assert (end.request_counts.completed, end.request_counts.failed) == (20, 0)
    ids = [r["custom_id"] for r in lines_of(client, end.output_file_id)]
    assert sorted(ids) == sorted(f"req-{i}" for i in range(20))
    up = upstream_of(emu, job)
    assert [u["status"] for u in up] == ["expired", "completed"]
    assert end.usage.input_tokens == sum(u["usage"]["input_tokens"] for u in up)
