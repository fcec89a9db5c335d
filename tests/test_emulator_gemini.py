"""The Gemini emulator (``/gemini``) driven by the official ``google-genai`` SDK."""

from __future__ import annotations

import io
from typing import Any

import orjson
import pytest
from google import genai
from google.genai import batches as genai_batches
from google.genai import errors, types

from batchd.emulator.faults import FaultConfig
from tests.emulator_server import KEY, poll, serve

MODEL = "gemini-2.5-flash"
DONE = {"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED"}


def client(url: str, **options: Any) -> genai.Client:
    http = types.HttpOptions(base_url=f"{url}/gemini", **options)
    return genai.Client(api_key=KEY, http_options=http)


def lines(n: int, hooks: dict[int, dict[str, Any]] | None = None) -> bytes:
    out = []
    for i in range(n):
        request: dict[str, Any] = {"contents": [{"parts": [{"text": f"q{i}"}], "role": "user"}]}
        if hooks and i in hooks:
            request["x_emulator"] = hooks[i]
        out.append(orjson.dumps({"key": f"k{i}", "request": request}))
    return b"\n".join(out) + b"\n"


def upload(c: genai.Client, data: bytes) -> types.File:
    cfg = types.UploadFileConfig(display_name="input", mime_type="application/jsonl")
    return c.files.upload(file=io.BytesIO(data), config=cfg)


def strict(c: genai.Client, name: str) -> types.BatchJob:
    """The batch fetched raw, converted and validated exactly as the SDK's model expects."""
    raw = c._api_client.request("get", name, {}, None)
    job = genai_batches._BatchJob_from_mldev(orjson.loads(raw.body))
    return types.BatchJob.model_validate(job)


def wait(c: genai.Client, name: str) -> types.BatchJob:
    return poll(lambda: strict(c, name), lambda b: b.state.name in DONE)


def test_file_batch_results_list_delete() -> None:
    with serve() as srv:
        c = client(srv.url)
        f = upload(c, lines(5, {3: {"status": 429}}) + orjson.dumps({"key": "k5", "request": {}}))
        assert f.name and f.name.startswith("files/") and f.size_bytes and f.state
        assert c.files.get(name=f.name).display_name == "input"
        job = c.batches.create(model=MODEL, src=f.name, config={"display_name": "nightly"})
        assert job.name and job.name.startswith("batches/")
        assert job.state == types.JobState.JOB_STATE_PENDING and job.display_name == "nightly"
        done = wait(c, job.name)
        assert done.state == types.JobState.JOB_STATE_SUCCEEDED and done.end_time
        assert done.dest and done.dest.file_name
        data = c.files.download(file=done.dest.file_name)
        out = [orjson.loads(x) for x in data.splitlines()]
        assert [o["key"] for o in out] == [f"k{i}" for i in range(6)]  # input order
        good = types.GenerateContentResponse.model_validate(out[0]["response"])
        assert good.text and good.text.startswith("Emulated reply to: q0")
        assert types.JobError.model_validate(out[3]["error"]).code == 429
        assert out[5]["error"]["code"] == 400  # no contents
        raw = orjson.loads(c._api_client.request("get", job.name, {}, None).body)
        assert raw["metadata"]["batchStats"] == {
            "requestCount": "6",
            "successfulRequestCount": "4",
            "failedRequestCount": "2",
            "pendingRequestCount": "0",
        }
        # paging: three batches, two per page
        for _ in range(2):
            c.batches.create(model=MODEL, src=f.name)
        first = c.batches.list(config={"page_size": 2})
        assert len(first.page) == 2 and first.config.get("page_token") == "2"
        names = [b.name for b in c.batches.list(config={"page_size": 2})]
        assert len(names) == 3 and names[-1] == job.name
        c.batches.delete(name=job.name)
        with pytest.raises(errors.ClientError) as exc:
            c.batches.get(name=job.name)
        assert exc.value.code == 404 and exc.value.status == "NOT_FOUND"
        c.files.delete(name=f.name)


def test_inline_requests_with_metadata_hooks() -> None:
    with serve() as srv:
        c = client(srv.url)
        inline: list[types.InlinedRequestOrDict] = [
            {"contents": [{"parts": [{"text": "hi"}], "role": "user"}], "metadata": {"n": "0"}},
            {
                "contents": [{"parts": [{"text": "fail"}], "role": "user"}],
                "metadata": {"n": "1", "x_emulator_status": "500"},
            },
        ]
        job = c.batches.create(model=MODEL, src=inline)
        assert job.name
        done = wait(c, job.name)
        assert done.dest and done.dest.inlined_responses
        first, second = done.dest.inlined_responses
        assert first.response and first.response.text and first.metadata == {"n": "0"}
        assert second.error and second.error.code == 500


def test_cancel_and_expiry() -> None:
    with serve(in_progress_seconds=200) as srv:
        c = client(srv.url)
        f = upload(c, lines(10))
        job = c.batches.create(model=MODEL, src=f.name)
        assert job.name
        srv.wait_status(job.name.removeprefix("batches/"), "in_progress")
        c.batches.cancel(name=job.name)
        done = wait(c, job.name)
        assert done.state == types.JobState.JOB_STATE_CANCELLED and done.dest
        assert done.dest.file_name  # partial results
        assert len(c.files.download(file=done.dest.file_name).splitlines()) == 5
        with pytest.raises(errors.ClientError):
            c.batches.cancel(name=job.name)
    with serve(expire_after_seconds=1.0) as srv:
        c = client(srv.url)
        f = upload(c, lines(4, {0: {"expire": True}}))
        job = c.batches.create(model=MODEL, src=f.name)
        assert job.name
        done = wait(c, job.name)
        assert done.state == types.JobState.JOB_STATE_EXPIRED and done.dest
        assert done.dest.file_name
        keys = [
            orjson.loads(x)["key"] for x in c.files.download(file=done.dest.file_name).splitlines()
        ]
        assert keys == ["k1", "k2", "k3"]


def test_auth_and_rate_limit_with_sdk_retries() -> None:
    with serve() as srv:
        bad = genai.Client(api_key="wrong", http_options={"base_url": f"{srv.url}/gemini"})
        with pytest.raises(errors.ClientError) as exc:
            list(bad.batches.list())
        assert exc.value.code == 400 and exc.value.status == "INVALID_ARGUMENT"
    retry = types.HttpRetryOptions(attempts=10, initial_delay=0.01, max_delay=0.05)
    faults = FaultConfig(rate_limit=0.5, seed=5)
    with serve(faults=faults) as srv:
        c = client(srv.url, retry_options=retry)
        f = upload(c, lines(3))
        job = c.batches.create(model=MODEL, src=f.name)
        assert job.name
        done = poll(lambda: c.batches.get(name=job.name or ""), lambda b: b.done)
        assert done.state == types.JobState.JOB_STATE_SUCCEEDED
        assert srv.state.fault_counts["rate_limit"] > 0
