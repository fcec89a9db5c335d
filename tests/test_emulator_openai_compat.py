"""The OpenAI-compatible emulators driven by their official SDKs: Azure OpenAI (``openai``'s
``AzureOpenAI`` and the v1 ``OpenAI`` client), Groq (``groq``), Together (``together``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import groq
import openai
import orjson
import pytest
import together
from openai.types import Batch, FileObject
from together.types import BatchJob as TogetherBatch
from together.types import FileResponse as TogetherFile

from batchd.emulator.faults import FaultConfig
from tests.emulator_server import KEY, poll, serve

DEPLOYMENT = "gpt-4o-mini-batch"
CHAT = "/v1/chat/completions"
OPENAI_DONE = {"completed", "failed", "expired", "cancelled"}


def chat_lines(n: int, model: str, hooks: dict[int, dict[str, Any]] | None = None) -> bytes:
    out = []
    for i in range(n):
        body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": f"q{i}"}]}
        if hooks and i in hooks:
            body["x_emulator"] = hooks[i]
        out.append(
            orjson.dumps({"custom_id": f"r{i}", "method": "POST", "url": CHAT, "body": body})
        )
    return b"\n".join(out) + b"\n"


def jsonl(data: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(x) for x in data.splitlines() if x.strip()]


# -- Azure -----------------------------------------------------------------------------------
def azure(url: str, version: str = "2024-10-21", **kw: Any) -> openai.AzureOpenAI:
    kw.setdefault("api_key", KEY)
    return openai.AzureOpenAI(azure_endpoint=f"{url}/azure", api_version=version, **kw)


def azure_strict(c: openai.AzureOpenAI, bid: str) -> Batch:
    return Batch.model_validate(c.batches.with_raw_response.retrieve(bid).http_response.json())


def test_azure_classic_lifecycle_paging_and_quirks() -> None:
    with serve(azure_deployments=frozenset({DEPLOYMENT})) as srv, azure(srv.url) as c:
        f = c.files.create(
            file=("in.jsonl", chat_lines(4, DEPLOYMENT, {1: {"status": 500}})), purpose="batch"
        )
        assert f.status == "pending"  # Azure: poll the file until processed
        raw = c.files.with_raw_response.retrieve(f.id).http_response.json()
        assert FileObject.model_validate(raw).status == "processed"
        batch = c.batches.create(
            input_file_id=f.id, endpoint="/chat/completions", completion_window="24h"
        )
        assert batch.endpoint == "/chat/completions" and batch.status == "validating"
        done = poll(lambda: azure_strict(c, batch.id), lambda b: b.status in OPENAI_DONE)
        assert done.status == "completed" and done.request_counts
        assert (done.request_counts.completed, done.request_counts.failed) == (3, 1)
        out = jsonl(c.files.content(done.output_file_id or "").content)
        assert len(out) == 3 and out[0]["response"]["body"]["model"] == DEPLOYMENT
        assert len(jsonl(c.files.content(done.error_file_id or "").content)) == 1
        # every line must name a batch deployment, the same one
        other = c.files.create(file=("x.jsonl", chat_lines(1, "gpt-4o")), purpose="batch")
        bad = c.batches.create(
            input_file_id=other.id, endpoint="/chat/completions", completion_window="24h"
        )
        failed = poll(lambda: azure_strict(c, bad.id), lambda b: b.status in OPENAI_DONE)
        assert failed.status == "failed" and failed.errors and failed.errors.data
        assert failed.errors.data[0].code == "model_not_found"
        page = c.batches.list(limit=1)
        assert [b.id for b in page.data] == [bad.id] and page.has_more
        assert [b.id for b in c.batches.list(limit=1, after=bad.id).data] == [batch.id]
        # api-version is required on the classic surface
        with pytest.raises(openai.BadRequestError):
            c.batches.list(extra_query={"api-version": ""})


def test_azure_success_keeps_an_empty_error_file_and_legacy_rendering() -> None:
    with serve() as srv, azure(srv.url) as c:
        f = c.files.create(file=("in.jsonl", chat_lines(2, DEPLOYMENT)), purpose="batch")
        batch = c.batches.create(
            input_file_id=f.id, endpoint="/chat/completions", completion_window="24h"
        )
        done = poll(lambda: azure_strict(c, batch.id), lambda b: b.status in OPENAI_DONE)
        assert done.error_file_id and c.files.content(done.error_file_id).content == b""
        with azure(srv.url, "2024-07-01-preview") as old:
            raw = old.batches.with_raw_response.retrieve(batch.id).http_response.json()
            assert raw["status"] == "Completed" and raw["created_at"].endswith("Z")
            assert old.batches.retrieve(batch.id).status == "Completed"  # the SDK still parses it


def test_azure_token_limit_refused_at_create_and_entra_token() -> None:
    limits = {DEPLOYMENT: 30}
    with serve(token_limits=limits, in_progress_seconds=500) as srv:
        with azure(srv.url, api_key=None, azure_ad_token=KEY) as c:  # Entra ID bearer token
            data = chat_lines(1, DEPLOYMENT)
            first = c.files.create(file=("a.jsonl", data), purpose="batch")
            b1 = c.batches.create(
                input_file_id=first.id, endpoint="/chat/completions", completion_window="24h"
            )
            srv.wait_status(b1.id, "in_progress")
            with pytest.raises(openai.BadRequestError) as exc:
                c.batches.create(
                    input_file_id=first.id, endpoint="/chat/completions", completion_window="24h"
                )
            assert exc.value.code == "token_limit_exceeded"
            c.batches.cancel(b1.id)
        with azure(srv.url, api_key="wrong") as bad, pytest.raises(openai.AuthenticationError):
            bad.batches.list()


def test_azure_v1_surface_with_the_plain_openai_client_and_ghost_create() -> None:
    faults = FaultConfig(ghost_create=1.0, seed=1)
    with serve(faults=faults) as srv:
        c = openai.OpenAI(api_key=KEY, base_url=f"{srv.url}/azure/openai/v1", max_retries=0)
        f = c.files.create(file=("in.jsonl", chat_lines(2, DEPLOYMENT)), purpose="batch")
        with pytest.raises((openai.InternalServerError, openai.APIConnectionError)):
            c.batches.create(
                input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
        [ghost] = c.batches.list().data  # created although the call failed
        assert ghost.input_file_id == f.id and srv.state.fault_counts["ghost_create"] == 1


# -- Groq ------------------------------------------------------------------------------------
def test_groq_windows_results_cancel_and_retries() -> None:
    faults = FaultConfig(rate_limit=0.4, seed=4, retry_after_seconds=0.01)
    with serve(faults=faults, expire_after_seconds=1.0) as srv:
        c = groq.Groq(api_key=KEY, base_url=f"{srv.url}/groq", max_retries=10)
        data = chat_lines(4, "llama-3.1-8b-instant", {0: {"status": 400}, 3: {"expire": True}})
        f = c.files.create(file=("in.jsonl", data), purpose="batch")
        with pytest.raises(groq.BadRequestError):
            c.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="8d")
        batch = c.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="48h")
        assert batch.completion_window == "48h" and batch.expires_at == batch.created_at + 2 * 86400
        done = poll(lambda: c.batches.retrieve(batch.id), lambda b: b.status in OPENAI_DONE)
        raw = c.batches.with_raw_response.retrieve(batch.id).http_response.json()
        groq.types.BatchRetrieveResponse.model_validate(raw)
        assert done.status == "expired" and done.request_counts
        assert (done.request_counts.completed, done.request_counts.failed) == (2, 2)
        errors = {
            e["custom_id"]: e for e in jsonl(c.files.content(done.error_file_id or "").read())
        }
        assert errors["r3"]["error"]["code"] == "batch_expired"
        assert errors["r0"]["response"]["status_code"] == 400
        listed = c.batches.with_raw_response.list().http_response.json()
        groq.types.BatchListResponse.model_validate(listed)
        assert srv.state.fault_counts["rate_limit"] > 0
    with serve(in_progress_seconds=500) as srv:
        c = groq.Groq(api_key=KEY, base_url=f"{srv.url}/groq")
        f = c.files.create(file=("in.jsonl", chat_lines(4, "m")), purpose="batch")
        batch = c.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
        srv.wait_status(batch.id, "in_progress")
        assert c.batches.cancel(batch.id).status == "cancelling"
        done = poll(lambda: c.batches.retrieve(batch.id), lambda b: b.status == "cancelled")
        assert done.request_counts and done.request_counts.completed == 2


# -- Together --------------------------------------------------------------------------------
def together_lines(n: int, hooks: dict[int, dict[str, Any]] | None = None) -> bytes:
    out = []
    for i in range(n):
        body: dict[str, Any] = {"messages": [{"role": "user", "content": f"q{i}"}]}
        if hooks and i in hooks:
            body["x_emulator"] = hooks[i]
        out.append(orjson.dumps({"custom_id": f"t{i}", "body": body}))
    return b"\n".join(out) + b"\n"


def test_together_presigned_upload_batch_results_cancel(tmp_path: Path) -> None:
    faults = FaultConfig(rate_limit=0.4, seed=6, retry_after_seconds=0.01)
    with serve(faults=faults) as srv:
        c = together.Together(api_key=KEY, base_url=f"{srv.url}/together", max_retries=10)
        path = tmp_path / "in.jsonl"
        path.write_bytes(together_lines(4, {2: {"status": 500}}))
        f = c.files.upload(file=path, purpose="batch-api", check=True)  # the SDK's own check
        assert f.purpose == "batch-api" and f.bytes == path.stat().st_size
        TogetherFile.model_validate(c.files.with_raw_response.retrieve(f.id).http_response.json())
        created = c.batches.create(input_file_id=f.id, endpoint=CHAT, model_id="llama-3-8b")
        assert created.job and created.job.id and created.job.status == "VALIDATING"
        bid = created.job.id
        done = poll(lambda: c.batches.retrieve(bid), lambda b: b.status == "COMPLETED")
        TogetherBatch.model_validate(c.batches.with_raw_response.retrieve(bid).http_response.json())
        assert done.progress == 100.0 and done.created_at and done.completed_at
        out = jsonl(c.files.content(done.output_file_id or "").read())
        assert len(out) == 3 and out[0]["response"]["body"]["model"] == "llama-3-8b"
        [err] = jsonl(c.files.content(done.error_file_id or "").read())
        assert err["custom_id"] == "t2" and err["response"]["status_code"] == 500
        assert [b.id for b in c.batches.list()] == [bid]
        assert srv.state.fault_counts["rate_limit"] > 0
    with serve(in_progress_seconds=500) as srv:
        c = together.Together(api_key=KEY, base_url=f"{srv.url}/together")
        path.write_bytes(together_lines(6))
        f = c.files.upload(file=path, purpose="batch-api", check=False)
        created = c.batches.create(input_file_id=f.id, endpoint=CHAT, model_id="m")
        assert created.job and created.job.id
        srv.wait_status(created.job.id, "in_progress")
        c.batches.cancel(created.job.id)
        done = poll(lambda: c.batches.retrieve(created.job.id), lambda b: b.status == "CANCELLED")
        assert len(jsonl(c.files.content(done.output_file_id or "").read())) == 3
        with pytest.raises(together.BadRequestError):
            c.batches.create(input_file_id="file-nope", endpoint=CHAT)


def test_together_expiry_and_bad_lines(tmp_path: Path) -> None:
    with serve(expire_after_seconds=1.0) as srv:
        c = together.Together(api_key=KEY, base_url=f"{srv.url}/together")
        path = tmp_path / "in.jsonl"
        path.write_bytes(together_lines(3, {0: {"expire": True}}))
        f = c.files.upload(file=path, purpose="batch-api", check=False)
        job = c.batches.create(input_file_id=f.id, endpoint=CHAT, model_id="m").job
        assert job and job.id
        done = poll(lambda: c.batches.retrieve(job.id or ""), lambda b: b.status == "EXPIRED")
        [expired] = jsonl(c.files.content(done.error_file_id or "").read())
        assert expired["custom_id"] == "t0" and expired["error"]["code"] == "batch_expired"
        path.write_bytes(together_lines(2))  # no model anywhere
        f = c.files.upload(file=path, purpose="batch-api", check=False)
        job = c.batches.create(input_file_id=f.id, endpoint=CHAT).job
        assert job and job.id
        failed = poll(lambda: c.batches.retrieve(job.id or ""), lambda b: b.status == "FAILED")
        assert failed.error and "model" in failed.error
