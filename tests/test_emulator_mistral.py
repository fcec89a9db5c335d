"""The Mistral emulator (``/mistral``) driven by the official ``mistralai`` SDK (whose
responses are validated by its pydantic models on every call)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from mistralai.client import Mistral, models
from mistralai.client.errors import SDKError
from mistralai.client.utils import BackoffStrategy, RetryConfig

from batchd.emulator.faults import FaultConfig
from tests.emulator_server import KEY, poll, serve

MODEL = "mistral-small-latest"
DONE = {"SUCCESS", "FAILED", "TIMEOUT_EXCEEDED", "CANCELLED"}


def client(url: str, **kw: Any) -> Mistral:
    return Mistral(api_key=KEY, server_url=f"{url}/mistral", **kw)


def lines(n: int, hooks: dict[int, dict[str, Any]] | None = None) -> bytes:
    out = []
    for i in range(n):
        body: dict[str, Any] = {"messages": [{"role": "user", "content": f"q{i}"}]}
        if hooks and i in hooks:
            body["x_emulator"] = hooks[i]
        out.append(orjson.dumps({"custom_id": f"c{i}", "body": body}))
    return b"\n".join(out) + b"\n"


def upload(c: Mistral, data: bytes) -> str:
    f = c.files.upload(file={"file_name": "in.jsonl", "content": data}, purpose="batch")
    assert f.purpose == "batch" and f.sample_type == "batch_request" and f.size_bytes == len(data)
    return f.id


def content(c: Mistral, fid: str | None) -> list[dict[str, Any]]:
    assert fid is not None
    return [orjson.loads(x) for x in c.files.download(file_id=fid).read().splitlines()]


def wait(c: Mistral, job_id: str) -> models.BatchJob:
    return poll(lambda: c.batch.jobs.get(job_id=job_id), lambda j: j.status in DONE)


def test_file_job_results_list_delete() -> None:
    with serve() as srv:
        c = client(srv.url)
        fid = upload(c, lines(5, {2: {"status": 400}}))
        job = c.batch.jobs.create(
            input_files=[fid],
            endpoint="/v1/chat/completions",
            model=MODEL,
            metadata={"job": "j1"},
            timeout_hours=48,
        )
        assert job.status == "QUEUED" and job.model == MODEL and job.input_files == [fid]
        done = wait(c, job.id)
        assert done.status == "SUCCESS" and done.completed_at and done.started_at
        assert (done.total_requests, done.succeeded_requests, done.failed_requests) == (5, 4, 1)
        ok, bad = content(c, done.output_file), content(c, done.error_file)
        assert sorted(o["custom_id"] for o in ok) == ["c0", "c1", "c3", "c4"]
        assert ok[0]["response"]["status_code"] == 200
        assert ok[0]["response"]["body"]["model"] == MODEL
        assert bad[0]["custom_id"] == "c2" and bad[0]["response"]["status_code"] == 400
        out = c.files.retrieve(file_id=done.output_file or "")
        assert out.sample_type == "batch_result" and out.source == "mistral"
        inline = c.batch.jobs.get(job_id=job.id, inline=True)
        assert inline.outputs is not None and len(inline.outputs) == 5
        # offset paging, newest first
        second = c.batch.jobs.create(
            requests=[{"custom_id": "x", "body": {"messages": []}}],
            endpoint="/v1/chat/completions",
            model=MODEL,
        )
        page = c.batch.jobs.list(page=0, page_size=1)
        assert page.total == 2 and page.data and [j.id for j in page.data] == [second.id]
        page = c.batch.jobs.list(page=1, page_size=1)
        assert page.data and [j.id for j in page.data] == [job.id]
        assert c.batch.jobs.list(status=["SUCCESS"]).total >= 1
        deleted = c.batch.jobs.delete(job_id=job.id)
        assert deleted.deleted and deleted.id == job.id
        with pytest.raises(SDKError) as exc:
            c.batch.jobs.get(job_id=job.id)
        assert exc.value.status_code == 404


def test_bad_lines_fail_the_job() -> None:
    with serve() as srv:
        c = client(srv.url)
        fid = upload(c, b'{"custom_id": "a"}\n' + lines(1))
        job = c.batch.jobs.create(input_files=[fid], endpoint="/v1/chat/completions")
        done = wait(c, job.id)
        assert done.status == "FAILED" and done.errors and "body" in done.errors[0].message
        with pytest.raises(SDKError) as exc:
            c.batch.jobs.create(
                input_files=[fid], endpoint="/v1/chat/completions", timeout_hours=999
            )
        assert exc.value.status_code == 422


def test_cancel_and_timeout() -> None:
    with serve(in_progress_seconds=200) as srv:
        c = client(srv.url)
        job = c.batch.jobs.create(
            input_files=[upload(c, lines(10))], endpoint="/v1/chat/completions", model=MODEL
        )
        srv.wait_status(job.id, "in_progress")
        assert c.batch.jobs.cancel(job_id=job.id).status == "CANCELLATION_REQUESTED"
        done = wait(c, job.id)
        assert done.status == "CANCELLED" and done.succeeded_requests == 5
        assert len(content(c, done.output_file)) == 5 and done.error_file is None
    with serve(expire_after_seconds=1.0) as srv:
        c = client(srv.url)
        fid = upload(c, lines(3, {1: {"expire": True}}))
        job = c.batch.jobs.create(input_files=[fid], endpoint="/v1/chat/completions", model=MODEL)
        done = wait(c, job.id)
        assert done.status == "TIMEOUT_EXCEEDED" and done.succeeded_requests == 2
        [timed_out] = content(c, done.error_file)
        assert timed_out["custom_id"] == "c1" and timed_out["response"] is None


def test_rate_limit_retried_with_retry_config() -> None:
    retry = RetryConfig("backoff", BackoffStrategy(10, 50, 1.5, 5000), False)
    with serve(faults=FaultConfig(rate_limit=0.5, seed=2)) as srv:
        c = client(srv.url, retry_config=retry)
        job = c.batch.jobs.create(
            requests=[{"custom_id": "a", "body": {"messages": []}}],
            endpoint="/v1/chat/completions",
            model=MODEL,
        )
        assert wait(c, job.id).status == "SUCCESS"
        assert srv.state.fault_counts["rate_limit"] > 0
