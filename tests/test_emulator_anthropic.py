"""The Anthropic emulator (``/anthropic``) driven by the official ``anthropic`` SDK."""

from __future__ import annotations

from typing import Any

import anthropic
import pytest
from anthropic.types.messages import (
    DeletedMessageBatch,
    MessageBatch,
    MessageBatchIndividualResponse,
)

from batchd.emulator.faults import FaultConfig
from tests.emulator_server import KEY, poll, serve

MODEL = "claude-haiku-4-5"


def requests(n: int, hooks: dict[int, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        params: dict[str, Any] = {
            "model": MODEL,
            "max_tokens": 64,
            "messages": [{"role": "user", "content": f"question {i}"}],
        }
        if hooks and i in hooks:
            params["x_emulator"] = hooks[i]
        out.append({"custom_id": f"req-{i}", "params": params})
    return out


def client(url: str, **kw: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key=KEY, base_url=f"{url}/anthropic", **kw)


def strict(c: anthropic.Anthropic, bid: str) -> MessageBatch:
    """Fetch the batch raw and validate it with the SDK's model (not the SDK's lenient parse)."""
    raw = c.messages.batches.with_raw_response.retrieve(bid).http_response.json()
    return MessageBatch.model_validate(raw)


def results(c: anthropic.Anthropic, bid: str) -> dict[str, MessageBatchIndividualResponse]:
    out = {}
    for r in c.messages.batches.results(bid):
        out[r.custom_id] = MessageBatchIndividualResponse.model_validate(r.to_dict())
    return out


def test_create_poll_results_mixed_list_delete() -> None:
    with serve() as srv, client(srv.url) as c:
        bad = {"custom_id": "bad", "params": {"model": MODEL, "messages": []}}  # no max_tokens
        batch = c.messages.batches.create(requests=[*requests(5, {1: {"status": 500}}), bad])
        assert batch.processing_status == "in_progress" and batch.id.startswith("msgbatch_")
        assert batch.request_counts.processing == 6 and batch.results_url is None
        assert strict(c, batch.id).expires_at > batch.created_at
        done = poll(lambda: strict(c, batch.id), lambda b: b.processing_status == "ended")
        assert done.request_counts.model_dump() == {
            "processing": 0,
            "succeeded": 4,
            "errored": 2,
            "canceled": 0,
            "expired": 0,
        }
        assert done.ended_at is not None and done.results_url is not None
        res = results(c, batch.id)
        assert set(res) == {f"req-{i}" for i in range(5)} | {"bad"}
        ok = res["req-0"].result
        assert ok.type == "succeeded" and ok.message.content[0].type == "text"
        assert ok.message.model == MODEL and ok.message.usage.output_tokens > 0
        failed = res["req-1"].result
        assert failed.type == "errored" and failed.error.error.type == "api_error"
        invalid = res["bad"].result
        assert invalid.type == "errored" and invalid.error.error.type == "invalid_request_error"
        assert "max_tokens" in invalid.error.error.message
        # a second batch, then paging newest first with after_id / before_id
        other = c.messages.batches.create(requests=requests(1))
        page = c.messages.batches.list(limit=1)
        assert [b.id for b in page.data] == [other.id] and page.has_more
        assert [b.id for b in page.get_next_page().data] == [batch.id]
        assert [b.id for b in c.messages.batches.list(limit=5)] == [other.id, batch.id]
        older = c.messages.batches.list(limit=1, before_id=batch.id)
        assert [b.id for b in older.data] == [other.id] and not older.has_more
        raw = c.messages.batches.with_raw_response.list(limit=2).http_response.json()
        assert {"data", "has_more", "first_id", "last_id"} <= set(raw)
        for item in raw["data"]:
            MessageBatch.model_validate(item)
        raw = c.messages.batches.with_raw_response.delete(batch.id).http_response.json()
        assert DeletedMessageBatch.model_validate(raw).type == "message_batch_deleted"
        with pytest.raises(anthropic.NotFoundError):
            c.messages.batches.retrieve(batch.id)


def test_create_time_checks() -> None:
    with serve() as srv, client(srv.url) as c:
        with pytest.raises(anthropic.BadRequestError) as exc:
            c.messages.batches.create(requests=[*requests(2), *requests(1)])  # duplicate id
        assert exc.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
        with pytest.raises(anthropic.BadRequestError):
            c.messages.batches.create(requests=[{"custom_id": "no spaces!", "params": {}}])
        with pytest.raises(anthropic.BadRequestError):
            c.messages.batches.create(requests=[])
        with pytest.raises(anthropic.AuthenticationError):
            anthropic.Anthropic(
                api_key="wrong", base_url=f"{srv.url}/anthropic"
            ).messages.batches.list()
    with serve(anthropic_max_requests=3) as srv, client(srv.url) as c:
        with pytest.raises(anthropic.BadRequestError):
            c.messages.batches.create(requests=requests(4))


def test_cancel_keeps_finished_results_and_marks_the_rest_canceled() -> None:
    with serve(in_progress_seconds=200) as srv, client(srv.url) as c:
        batch = c.messages.batches.create(requests=requests(10))
        srv.wait_status(batch.id, "in_progress")
        with pytest.raises(anthropic.BadRequestError):  # still processing
            c.messages.batches.delete(batch.id)
        canceling = c.messages.batches.cancel(batch.id)
        assert canceling.processing_status == "canceling" and canceling.cancel_initiated_at
        done = poll(lambda: strict(c, batch.id), lambda b: b.processing_status == "ended")
        counts = done.request_counts
        assert counts.canceled == 5 and counts.succeeded == 5 and counts.processing == 0
        kinds = sorted(r.result.type for r in results(c, batch.id).values())
        assert kinds == ["canceled"] * 5 + ["succeeded"] * 5


def test_expiry_gives_partial_results() -> None:
    with serve(expire_after_seconds=1.0) as srv, client(srv.url) as c:
        hooks = {i: {"expire": True} for i in (0, 2)}
        batch = c.messages.batches.create(requests=requests(4, hooks))
        done = poll(lambda: strict(c, batch.id), lambda b: b.processing_status == "ended")
        assert done.request_counts.expired == 2 and done.request_counts.succeeded == 2
        res = results(c, batch.id)
        assert res["req-0"].result.type == "expired" and res["req-1"].result.type == "succeeded"


def test_rate_limited_calls_are_retried_by_the_sdk() -> None:
    faults = FaultConfig(rate_limit=0.5, seed=3, retry_after_seconds=0.01)
    with serve(faults=faults) as srv, client(srv.url, max_retries=10) as c:
        batch = c.messages.batches.create(requests=requests(3))
        done = poll(lambda: c.messages.batches.retrieve(batch.id), lambda b: b.ended_at)
        assert done.request_counts.succeeded == 3
        assert len(list(c.messages.batches.results(batch.id))) == 3
        assert srv.state.fault_counts["rate_limit"] > 0
        raw = c.messages.batches.with_raw_response.retrieve(batch.id).http_response
        assert raw.status_code == 200
