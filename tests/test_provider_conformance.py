"""What batchd sends each provider, checked against that provider's official SDK types
(from PyPI: openai, anthropic, google-genai, mistralai, groq, together), and what each
emulator answered, parsed with the same SDK's response models.

A run per provider drives the real daemon against the emulator with a recorder in front
of it; every JSON request body is then validated (pydantic, the SDKs' TypedDicts and
models; unknown keys refused), and every batch object answered is parsed strictly.
The emulator's test hook (`x_emulator` inside a request) is removed before checking.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter

from tests.conftest import read_jsonl, run_once
from tests.providers_support import Emu, Recorded, drop_to, emulator, lines, provider_config

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "openai": ("openai", {}),
    "anthropic": ("anthropic", {}),
    "gemini-inline": ("gemini", {"model": "gemini-2.5-flash"}),
    "gemini-file": ("gemini", {"model": "gemini-2.5-flash", "inline_max_bytes": 0}),
    "mistral": ("mistral", {"model": "mistral-small-latest"}),
    "azure": ("azure_openai", {"api_version": "2024-10-21"}),
    "azure-v1": ("azure_openai", {}),
    "groq": ("groq", {"completion_window": "48h"}),
    "together": ("together", {}),
}


def _strip_hooks(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_hooks(v) for k, v in value.items() if k != "x_emulator"}
    if isinstance(value, list):
        return [_strip_hooks(v) for v in value]
    return value


def _typed_dict(t: Any, value: Any, where: str) -> None:
    """`value` validates as TypedDict `t` and holds no key `t` does not declare."""
    TypeAdapter(t).validate_python(value)
    known = set(typing.get_type_hints(t))
    unknown = set(value) - known
    assert not unknown, f"{where}: keys the SDK does not know: {sorted(unknown)}"


async def _run(tmp_path: Path, variant: str) -> tuple[Emu, Path]:
    kind, extra = VARIANTS[variant]
    async with emulator() as emu:
        if kind == "openai":
            from tests.conftest import make_config

            cfg = make_config(tmp_path, emu.url + "/v1")
            provider = None
        else:
            cfg = provider_config(tmp_path, emu.url, "p", kind, provider=extra)
            provider = "p"
        data = lines(kind, 3, fail=[2])
        drop_to(cfg, provider, "conf.jsonl", data)
        d = await run_once(cfg)
        assert d.exit_code == 0
        done = cfg.spool.dir / "done" / "conf"
        assert len(read_jsonl(done / "output.jsonl")) == 2
        return emu, done


def _bodies(emu: Emu, method: str, part: str) -> list[Recorded]:
    found = [r for r in emu.sent(method, part) if r.body is not None]
    assert found, f"no {method} {part} was sent"
    return found


def _answers(emu: Emu, method: str, part: str) -> list[Any]:
    return [r.answer for r in emu.sent(method, part) if r.status < 300 and r.answer is not None]


# --- per provider ---------------------------------------------------------------------


def _check_openai_family(emu: Emu, sdk: str, base: str) -> None:
    if sdk == "openai":
        from openai.types import Batch, FileObject
        from openai.types.batch_create_params import BatchCreateParams

        batch_model: Any = Batch
    elif sdk == "groq":
        from groq.types import BatchRetrieveResponse
        from groq.types.batch_create_params import BatchCreateParams  # type: ignore[assignment]

        batch_model = BatchRetrieveResponse
    else:
        raise AssertionError(sdk)
    for r in _bodies(emu, "POST", f"{base}/batches"):
        _typed_dict(BatchCreateParams, r.body, f"{sdk} create")
    answers = _answers(emu, "POST", f"{base}/batches") + _answers(emu, "GET", f"{base}/batches")
    batches = [a for a in answers if a.get("object") == "batch"]
    batches += [b for a in answers if a.get("object") == "list" for b in a["data"]]
    assert batches
    for b in batches:
        batch_model.model_validate(b)
    if base == "/v1":  # (Azure answers an upload with status "pending", which the
        for f in _answers(emu, "POST", f"{base}/files"):  # SDK's Literal lacks)
            FileObject.model_validate(f)


def _check_anthropic(emu: Emu) -> None:
    from anthropic.types.messages import MessageBatch, batch_create_params
    from anthropic.types.messages.batch_create_params import BatchCreateParams

    creates = _bodies(emu, "POST", "/anthropic/v1/messages/batches")
    for r in creates:
        body = _strip_hooks(r.body)
        _typed_dict(BatchCreateParams, body, "anthropic create")
        for item in body["requests"]:
            _typed_dict(batch_create_params.Request, item, "anthropic request")
        assert r.headers.get("anthropic-version") and r.headers.get("x-api-key")
        assert r.headers.get("Content-Length")  # streamed from disk, yet not chunked
    for a in _answers(emu, "POST", "/anthropic/v1/messages/batches") + _answers(
        emu, "GET", "/anthropic/v1/messages/batches"
    ):
        for b in a.get("data", [a]) if a.get("type") != "message_batch" else [a]:
            MessageBatch.model_validate(b)


def _check_anthropic_results(done: Path) -> None:
    from anthropic.types.messages import MessageBatchIndividualResponse

    for name in ("output.jsonl", "errors.jsonl"):
        for rec in read_jsonl(done / name):
            MessageBatchIndividualResponse.model_validate(rec)


def _check_gemini(emu: Emu, inline: bool) -> None:
    from google import genai
    from google.genai import batches as gb
    from google.genai import types

    client = genai.Client(api_key="conformance")._api_client
    creates = _bodies(emu, "POST", ":batchGenerateContent")
    for r in creates:
        sent = _strip_hooks(r.body)
        batch = sent["batch"]
        model = r.path.rsplit("/models/", 1)[1].removesuffix(":batchGenerateContent")
        config = types.CreateBatchJobConfig(display_name=batch["displayName"])
        source = batch["inputConfig"]
        if "fileName" in source:
            assert not inline
            src: Any = source["fileName"]
        else:
            assert inline
            src = [
                types.InlinedRequest.model_validate(
                    {"contents": item["request"]["contents"], "metadata": item["metadata"]}
                )
                for item in source["requests"]["requests"]
            ]
        params = types._CreateBatchJobParameters(model=model, src=src, config=config)
        expected = gb._CreateBatchJobParameters_to_mldev(client, params)
        # What the SDK would send for the same batch is exactly what batchd sent.
        assert expected["batch"] == batch, (expected["batch"], batch)
        assert expected["_url"]["model"] == f"models/{model}"
    if not inline:
        starts = _bodies(emu, "POST", "/gemini/upload/")
        for r in starts:
            types.File.model_validate(r.body["file"])
            assert r.headers["X-Goog-Upload-Protocol"] == "resumable"
            assert r.headers["X-Goog-Upload-Command"] == "start"
    ops = _answers(emu, "POST", ":batchGenerateContent") + _answers(emu, "GET", "/batches")
    ops = [o for o in ops if "operations" not in o] + [
        op for o in ops if "operations" in o for op in o["operations"]
    ]
    assert ops
    for op in ops:
        types.BatchJob.model_validate(gb._BatchJob_from_mldev(op))


def _check_mistral(emu: Emu) -> None:
    from mistralai.client.models import BatchJob, CreateBatchJobRequest

    fields = {f.alias or n for n, f in CreateBatchJobRequest.model_fields.items()}
    for r in _bodies(emu, "POST", "/mistral/v1/batch/jobs"):
        CreateBatchJobRequest.model_validate(r.body)
        assert set(r.body) <= fields, set(r.body) - fields
    jobs = _answers(emu, "POST", "/mistral/v1/batch/jobs") + _answers(
        emu, "GET", "/mistral/v1/batch/jobs"
    )
    jobs = [j for j in jobs if j.get("object") == "batch"] + [
        b for j in jobs if j.get("object") == "list" for b in j["data"]
    ]
    assert jobs
    for j in jobs:
        BatchJob.model_validate(j)


def _check_together(emu: Emu) -> None:
    from together.types import BatchCreateResponse, BatchJob
    from together.types.batch_create_params import BatchCreateParams

    for r in _bodies(emu, "POST", "/together/v1/batches"):
        _typed_dict(BatchCreateParams, r.body, "together create")
    for a in _answers(emu, "POST", "/together/v1/batches"):
        BatchCreateResponse.model_validate(a)
    for a in _answers(emu, "GET", "/together/v1/batches/"):
        BatchJob.model_validate(a)


@pytest.mark.parametrize("variant", list(VARIANTS))
async def test_requests_batchd_sends_conform_to_the_sdk(tmp_path: Path, variant: str) -> None:
    emu, done = await _run(tmp_path, variant)
    if variant == "openai":
        _check_openai_family(emu, "openai", "/v1")
    elif variant == "azure":
        _check_openai_family(emu, "openai", "/azure/openai")
    elif variant == "azure-v1":
        _check_openai_family(emu, "openai", "/azure/openai/v1")
    elif variant == "groq":
        _check_openai_family(emu, "groq", "/groq/openai/v1")
    elif variant == "anthropic":
        _check_anthropic(emu)
        _check_anthropic_results(done)
    elif variant.startswith("gemini"):
        _check_gemini(emu, inline=variant == "gemini-inline")
    elif variant == "mistral":
        _check_mistral(emu)
    elif variant == "together":
        _check_together(emu)
    # No request carried a key anywhere but in its auth header.
    for r in emu.requests:
        assert "sk-test" not in repr(r.body) and "sk-test" not in r.path
