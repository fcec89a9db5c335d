"""The official Python SDK against a live batchd (a real daemon subprocess) and the emulator:
files, uploads, batches, paging, tenants, dedupe of retried creates, webhooks out.

Bounded for CI; BATCHD_FACADE_FULL=1 runs the issue's full sizes (a 120,000-line batch,
a 300 MB file through the Uploads API).
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from tests.conftest import chat_lines, run_cli
from tests.emulator_server import Server, serve
from tests.facade_support import (
    KEYS,
    WEBHOOK_SECRET,
    Receiver,
    Running,
    daemon,
    proxy,
    receiver,
    wait_ended,
    wait_for,
    write_config,
)

FULL = os.environ.get("BATCHD_FACADE_FULL") == "1"
BAD = b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}\nnot json\n'


@pytest.fixture(scope="module")
def emu() -> Iterator[Server]:
    with serve(time_scale=0.01) as server:
        yield server


@pytest.fixture(scope="module")
def hooks() -> Iterator[Receiver]:
    with receiver() as rec:
        yield rec


@pytest.fixture(scope="module")
def live(
    emu: Server, hooks: Receiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Running]:
    cfg = write_config(tmp_path_factory.mktemp("facade"), emu.url, webhook_url=hooks.url)
    with daemon(cfg) as d:
        yield d


def upload(client: openai.OpenAI, data: bytes, name: str = "requests.jsonl") -> Any:
    return client.files.create(file=(name, data), purpose="batch")


def create(client: openai.OpenAI, file_id: str, **kw: Any) -> Any:
    return client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h", **kw
    )


def lines_of(client: openai.OpenAI, file_id: str) -> list[dict[str, Any]]:
    return [orjson.loads(x) for x in client.files.content(file_id).content.splitlines()]


def upstream_of(emu: Server, job_id: str) -> list[dict[str, Any]]:
    """The emulator's batches made for one job (batchd tags them with metadata)."""
    return [
        b for b in emu.call(emu.state.batches) if (b["metadata"] or {}).get("batchd_job") == job_id
    ]


def job_id_of(live: Running, batch_id: str) -> str:
    out = run_cli("show", batch_id, "--json", "-c", str(live.config))
    assert out.returncode == 0, out.stderr
    return str(orjson.loads(out.stdout)["job"]["id"])


def test_upload_create_poll_download(live: Running, emu: Server, hooks: Receiver) -> None:
    client = live.client("alpha")
    hooks.fail_first = 1  # the first delivery is answered 500: it is made again
    f = upload(client, chat_lines(20, fail=[3]))
    assert f.object == "file" and f.purpose == "batch" and f.bytes == len(chat_lines(20, fail=[3]))
    assert f.id.startswith("file-") and len(f.id) <= 64 and f.expires_at
    b = create(client, f.id, metadata={"run": "nightly"})
    assert b.id.startswith("batch_") and len(b.id) <= 64
    assert b.status == "validating" and b.input_file_id == f.id and b.metadata == {"run": "nightly"}
    b = wait_ended(client, b.id)
    assert b.status == "completed", b
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (
        20,
        19,
        1,
    )
    assert b.model == "gpt-4o-mini" and b.usage and b.usage.total_tokens > 0
    assert b.created_at <= b.in_progress_at <= b.finalizing_at <= b.completed_at
    assert b.errors is None and b.expires_at == b.created_at + 86400
    out = lines_of(client, b.output_file_id)
    assert sorted(r["custom_id"] for r in out) == sorted(f"req-{i}" for i in range(20) if i != 3)
    errs = lines_of(client, b.error_file_id)
    assert [r["custom_id"] for r in errs] == ["req-3"]
    assert errs[0]["response"]["status_code"] == 400
    meta = client.files.retrieve(b.output_file_id)
    assert meta.purpose == "batch_output" and meta.filename == f"{b.id}_output.jsonl"
    listed = {x.id for x in client.files.list()}
    assert {f.id, b.output_file_id, b.error_file_id} <= listed
    # An ordinary job: in `batchd jobs`, named after the batch, its source the tenant.
    jobs = run_cli("jobs", "--json", "-c", str(live.config))
    rows = {j["name"]: j for j in orjson.loads(jobs.stdout)}
    assert rows[b.id]["state"] == "done" and rows[b.id]["source"] == "facade:alpha"
    # Results stay on batchd's disk; the provider's copies go once they are verified.
    up = upstream_of(emu, job_id_of(live, b.id))
    assert len(up) == 1 and up[0]["id"] != b.id
    remote = {up[0]["input_file_id"], up[0]["output_file_id"], up[0]["error_file_id"]}
    wait_for(lambda: not remote & set(emu.call(lambda: list(emu.state.files))), 30, "deleted")
    assert lines_of(client, b.output_file_id) == out
    # batch.completed was posted to the tenant's webhook, signed as OpenAI signs.
    got = wait_for(lambda: [g for g in hooks.got if orjson.loads(g[1])["data"]["id"] == b.id])
    headers, body = got[0]
    event = client.webhooks.unwrap(body, headers, secret=WEBHOOK_SECRET)
    assert event.type == "batch.completed" and event.data.id == b.id
    assert hooks.fail_first == 0 and "facade_webhook_failed" in live.text()


def test_a_failed_validation_has_line_numbered_errors(live: Running) -> None:
    client = live.client("beta")
    bad = upload(client, BAD)
    b = wait_ended(client, create(client, bad.id).id)
    assert b.status == "failed" and b.failed_at and b.output_file_id is None
    assert create(client, bad.id).id != b.id  # a failed batch is not what a new create gets
    assert b.errors is not None
    codes = {(e.code, e.line) for e in b.errors.data}
    assert ("missing_model", 1) in codes and ("invalid_json", 2) in codes
    # The lines must fit the endpoint asked for (OpenAI: url must equal the endpoint).
    emb = chat_lines(2).replace(b"/v1/chat/completions", b"/v1/embeddings")
    b = wait_ended(client, create(client, upload(client, emb).id).id)
    assert b.status == "failed" and b.errors is not None
    assert [(e.code, e.line) for e in b.errors.data] == [("url_mismatch", 1)]


def test_auto_paging_walks_every_batch_once(live: Running) -> None:
    client = live.client("beta")
    f = upload(client, BAD)  # cheap: fails validation locally, never reaches the provider
    made = [create(client, f.id, metadata={"i": str(i)}).id for i in range(105)]
    seen = [b.id for b in client.batches.list(limit=100)]
    assert len(seen) == len(set(seen))
    assert set(made) <= set(seen)
    assert [x for x in seen if x in set(made)] == made[::-1]  # newest first
    first = client.batches.list(limit=7)
    assert len(first.data) == 7 and first.has_more and first.last_id == first.data[-1].id
    rest = client.batches.list(limit=100, after=first.last_id)
    assert [b.id for b in rest.data] == seen[7:107]
    tail = client.batches.list(limit=100, after=seen[-2])
    assert [b.id for b in tail.data] == [seen[-1]] and tail.has_more is False
    for bad, code in (("0", "integer_below_min_value"), ("101", "integer_above_max_value")):
        with pytest.raises(openai.BadRequestError) as e:
            client.batches.list(extra_query={"limit": bad})
        assert e.value.code == code and e.value.param == "limit"
    # Files page the same way (oldest first when asked).
    for _ in range(3):
        upload(client, BAD)
    mine = [x.id for x in client.files.list(purpose="batch", order="asc", limit=2)]
    assert mine == sorted(mine) and len(mine) == len(set(mine)) >= 4


def test_a_tenant_sees_only_its_own(live: Running) -> None:
    a, b = live.client("alpha"), live.client("beta")
    f = upload(a, chat_lines(2))
    batch = create(a, f.id, metadata={"owner": "alpha"})
    ended = wait_ended(a, batch.id)
    for call in (
        lambda: b.batches.retrieve(batch.id),
        lambda: b.batches.cancel(batch.id),
        lambda: b.files.retrieve(f.id),
        lambda: b.files.content(f.id),
        lambda: b.files.content(ended.output_file_id),
        lambda: b.files.delete(ended.output_file_id),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.BadRequestError):
        create(b, f.id)  # another tenant's file is no file at all
    assert batch.id not in {x.id for x in b.batches.list()}
    assert not {f.id, ended.output_file_id} & {x.id for x in b.files.list()}
    stranger = openai.OpenAI(base_url=live.base + "/v1", api_key="sk-nobody", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        stranger.batches.list()
    assert e.value.code == "invalid_api_key"
    req = urllib.request.Request(live.base + "/v1/files")
    with pytest.raises(urllib.error.HTTPError) as raw:
        urllib.request.urlopen(req, timeout=10)
    assert raw.value.code == 401
    assert set(orjson.loads(raw.value.read())["error"]) == {"message", "type", "param", "code"}
    # Unknown routes under the facade answer in OpenAI's envelope too; /v1/jobs is not its.
    with pytest.raises(openai.NotFoundError):
        a.get("/batches/x/y", cast_to=object)
    assert KEYS["alpha"] not in live.text() and KEYS["beta"] not in live.text()


@pytest.mark.parametrize("how", ["drop", "500"])
def test_a_retried_create_makes_one_batch(live: Running, how: str) -> None:
    with proxy(live.base, how=how) as px:
        client = openai.OpenAI(base_url=px.url + "/v1", api_key=KEYS["alpha"])
        f = upload(client, chat_lines(3))
        b = create(client, f.id, metadata={"retried": how})  # the SDK retries by itself
    assert len(px.creates) == 2
    assert orjson.loads(px.creates[0])["id"] == orjson.loads(px.creates[1])["id"] == b.id
    mine = [x for x in live.client("alpha").batches.list() if x.metadata == {"retried": how}]
    assert [x.id for x in mine] == [b.id]
    client = live.client("alpha")
    end = wait_ended(client, b.id)
    assert end.status == "completed" and len(lines_of(client, end.output_file_id)) == 3


def test_idempotency_key(live: Running) -> None:
    client = live.client("alpha")
    f = upload(client, chat_lines(2))
    key = {"Idempotency-Key": "nightly-2026-11-30"}
    one = create(client, f.id, metadata={"k": "1"}, extra_headers=key)
    again = create(client, f.id, metadata={"k": "1"}, extra_headers=key)
    assert again.id == one.id
    with pytest.raises(openai.ConflictError) as e:
        create(client, f.id, metadata={"k": "2"}, extra_headers=key)
    assert e.value.response.headers["x-should-retry"] == "false"
    # Without a key, identical creates are one batch; other keys are other batches.
    plain = [create(client, f.id, metadata={"k": "3"}).id for _ in range(2)]
    assert plain[0] == plain[1]
    keyed = {create(client, f.id, extra_headers={"Idempotency-Key": f"k{i}"}).id for i in range(2)}
    assert len(keyed) == 2


def test_bad_requests_are_400s_in_openais_envelope(live: Running) -> None:
    client = live.client("alpha")
    f = upload(client, chat_lines(1))
    cases: list[tuple[dict[str, Any], str]] = [
        ({"endpoint": "/v1/nope"}, "endpoint"),
        ({"completion_window": "48h"}, "completion_window"),
        ({"input_file_id": "file-missing"}, "input_file_id"),
        ({"metadata": {str(i): "v" for i in range(17)}}, "metadata"),
        (
            {"output_expires_after": {"anchor": "created_at", "seconds": 60}},
            "output_expires_after.seconds",
        ),
    ]
    for change, param in cases:
        args = {
            "input_file_id": f.id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
            **change,
        }
        with pytest.raises(openai.BadRequestError) as e:
            client.batches.create(**args)
        assert e.value.param == param, (change, e.value.body)
    with pytest.raises(openai.BadRequestError) as e:
        client.files.create(file=("x.jsonl", b"{}\n"), purpose="fine-tune")
    assert e.value.param == "purpose"


def test_cancel_right_after_create(live: Running) -> None:
    client = live.client("alpha")
    b = create(client, upload(client, chat_lines(5)).id, metadata={"cancel": "now"})
    cancelled = client.batches.cancel(b.id)
    assert cancelled.status in ("cancelling", "cancelled", "completed"), cancelled
    end = wait_ended(client, b.id)
    assert end.status in ("cancelled", "completed")
    if end.status == "cancelled":
        assert end.cancelled_at and end.cancelling_at
    with pytest.raises(openai.BadRequestError):
        client.batches.cancel(b.id)


def test_deleting_the_input_file_does_not_hurt_its_batch(live: Running) -> None:
    client = live.client("alpha")
    f = upload(client, chat_lines(4))
    b = create(client, f.id, metadata={"delete": "input"})
    assert client.files.delete(f.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)
    end = wait_ended(client, b.id)
    assert end.status == "completed" and end.request_counts.completed == 4
    assert client.files.delete(end.output_file_id).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.files.content(end.output_file_id)


def test_one_logical_batch_of_any_size(live: Running, emu: Server, tmp_path: Path) -> None:
    n = 120_000 if FULL else 60_000  # more than 50,000: split into pieces upstream
    client = live.client("alpha")
    f = upload(client, chat_lines(n, fail=[7, n - 1]), "big.jsonl")
    b = wait_ended(client, create(client, f.id, metadata={"size": str(n)}).id, timeout=110)
    assert b.status == "completed", b
    rc = b.request_counts
    assert (rc.total, rc.completed, rc.failed) == (n, n - 2, 2)
    ids = [r["custom_id"] for r in lines_of(client, b.output_file_id)]
    assert len(ids) == len(set(ids)) == n - 2
    assert {r["custom_id"] for r in lines_of(client, b.error_file_id)} == {"req-7", f"req-{n - 1}"}
    up = upstream_of(emu, job_id_of(live, b.id))
    assert len(up) == -(-n // 50_000)
    assert sum(u["request_counts"]["total"] for u in up) == n
    assert b.usage.input_tokens == sum(u["usage"]["input_tokens"] for u in up)


def test_uploads_api_for_a_big_file(live: Running, tmp_path: Path) -> None:
    size_mb = 300 if FULL else 30
    pad = "x" * 3000
    path = tmp_path / "big.jsonl"
    n = 0
    with path.open("wb") as out:
        while out.tell() < size_mb * 1_000_000:
            line = {
                "custom_id": f"u-{n}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": pad}]},
            }
            out.write(orjson.dumps(line) + b"\n")
            n += 1
    client = live.client("alpha")
    up = client.uploads.upload_file_chunked(
        file=path, mime_type="text/jsonl", purpose="batch", part_size=8 * 1024 * 1024
    )
    assert up.status == "completed" and up.file is not None
    assert up.file.bytes == path.stat().st_size
    assert client.files.content(up.file.id).content[:20] == path.read_bytes()[:20]
    b = wait_ended(client, create(client, up.file.id, metadata={"uploads": "api"}).id, 110)
    assert b.status == "completed" and b.request_counts.completed == n
