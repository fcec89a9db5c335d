"""What batchd sends OpenAI and Together, and what the emulator answers, checked against
the providers' published OpenAPI specs (trimmed copies in tests/specs/, see their headers).

A run per variant drives the real daemon against the emulator with the recorder of
tests/providers_support.py in front of it, then calls the provider the daemon used for
what a clean run does not reach (list, cancel, file lookup, errors). Every call batchd
made must be an operation of the spec; its query parameters and JSON body validate
against the operation's schemas, the multipart upload's fields against the form schema,
and every JSON answer against the schema of its status (an error without one: the
provider's error envelope). Schemas are JSON Schema 2020-12 (OpenAPI 3.1) with the OAS
vocabulary (openapi-schema-validator), formats asserted.
"""

from __future__ import annotations

import copy
import functools
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from openapi_schema_validator import OAS31Validator

from batchd.metrics import Metrics
from batchd.providers import Providers, make
from batchd.providers.base import Create
from batchd.providers.errors import AuthError, InvalidRequest, NotFound
from tests.conftest import make_config, read_jsonl, run_once
from tests.providers_support import Emu, Recorded, drop_to, emulator, lines, provider_config

SPECS = Path(__file__).parent / "specs"

# Where the API answers null but the spec's schema has no null: (spec, schema, property).
# Each is null in the spec's own example answers (the `x-oaiMeta` examples of POST, GET
# /batches, GET /batches/{batch_id} and cancel, trimmed from the vendored copy) and
# Optional in the official SDK. An entry that no longer names a non-nullable property
# (fixed upstream) fails the test.
_BATCH_NULLS = (
    "errors output_file_id error_file_id in_progress_at finalizing_at completed_at "
    "failed_at expired_at cancelling_at cancelled_at"
)
KNOWN_NULLS: list[tuple[str, str, str]] = [
    ("openai", "Batch", prop) for prop in _BATCH_NULLS.split()
]

# Calls batchd makes that the spec has no operation for, with why.
UNSPECIFIED = {
    # Together's spec documents only POST /files/upload (one multipart request with
    # `file_name`); its SDK, like batchd, POSTs /v1/files (the presigned-upload flow).
    ("together", "POST", "/files"),
}

VARIANTS: dict[str, dict[str, Any]] = {
    "openai": {"spec": "openai", "kind": "openai", "prefix": "/v1"},
    "openai-uploads": {  # the Uploads API: create, one part, complete
        "spec": "openai",
        "kind": "openai",
        "prefix": "/v1",
        "upload": {"uploads_api_threshold_bytes": 1, "part_bytes": 1024},
    },
    "together": {"spec": "together", "kind": "together", "prefix": "/together/v1"},
}
ERROR_ENVELOPE = {"openai": "ErrorResponse", "together": "ErrorData"}


# --- the specs --------------------------------------------------------------------------


def _nullable_as_30(node: Any) -> Any:
    """Both specs say OpenAPI 3.1 yet still write 3.0's `nullable`, which 3.1 dropped
    (a 3.1 validator ignores it). Read it as 3.0.3 defines it: `nullable: true` adds null
    to the `type` of the same schema object (and to its `enum`), and means nothing
    without a `type` there."""
    if isinstance(node, list):
        return [_nullable_as_30(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _nullable_as_30(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable") is True and isinstance(node.get("type"), str):
        out["type"] = [node["type"], "null"]
        if isinstance(out.get("enum"), list) and None not in out["enum"]:
            out["enum"] = [*out["enum"], None]
    return out


def _accepts_null(schema: dict[str, Any]) -> bool:
    t = schema.get("type")
    return (
        t == "null"
        or (isinstance(t, list) and "null" in t)
        or any(s.get("type") == "null" for s in schema.get("anyOf", []) + schema.get("oneOf", []))
    )


@functools.cache
def spec(name: str) -> dict[str, Any]:
    """A vendored spec, its `nullable` read as 3.0 and KNOWN_NULLS applied."""
    raw = yaml.safe_load((SPECS / f"{name}.yaml").read_text(encoding="utf-8"))
    doc: dict[str, Any] = _nullable_as_30(raw)
    for spec_name, schema, prop in KNOWN_NULLS:
        if spec_name != name:
            continue
        props = doc["components"]["schemas"][schema]["properties"]
        assert prop in props, f"{name}: {schema}.{prop} is gone: drop it from KNOWN_NULLS"
        assert not _accepts_null(props[prop]), f"{name}: {schema}.{prop} is nullable now"
        props[prop] = {"anyOf": [props[prop], {"type": "null"}]}
    return doc


def _pointer(*parts: str) -> str:
    return "#/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


def check(name: str, pointer: str, instance: Any, what: str) -> None:
    """`instance` validates against the schema at `pointer` in spec `name`."""
    root = {**copy.deepcopy(spec(name)), "$ref": pointer}
    validator = OAS31Validator(root, format_checker=OAS31Validator.FORMAT_CHECKER)
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    assert not errors, f"{name} {what}:\n" + "\n".join(
        f"  at {'/'.join(map(str, e.absolute_path)) or '.'}: {e.message}" for e in errors[:10]
    )


def operation(name: str, method: str, path: str) -> tuple[str, dict[str, Any]] | None:
    """The spec's (path template, operation object) for a concrete path, or None."""
    for template, item in spec(name)["paths"].items():
        pattern = re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template))
        if re.fullmatch(pattern, path) and method.lower() in item:
            return template, item[method.lower()]
    return None


# --- checking one recorded call ---------------------------------------------------------


def _check_query(name: str, template: str, op: dict[str, Any], r: Recorded) -> None:
    params = {p["name"]: p for p in op.get("parameters", []) if p.get("in") == "query"}
    unknown = set(r.query) - set(params)
    assert not unknown, f"{name} {r.method} {template}: query parameters {sorted(unknown)}"
    for key, value in r.query.items():
        sch = params[key]["schema"]
        t = sch.get("type")
        typed: Any = int(value) if t == "integer" or t == ["integer", "null"] else value
        i = op["parameters"].index(params[key])
        where = _pointer("paths", template, r.method.lower(), "parameters", str(i), "schema")
        check(name, where, typed, f"{r.method} {template} ?{key}={value}")


def _response_pointer(name: str, template: str, op: dict[str, Any], status: int) -> str | None:
    responses = op.get("responses", {})
    codes = (str(status), f"{str(status)[0]}XX", "default")
    code = next((c for c in codes if c in responses), None)
    if code is None:
        return _pointer("components", "schemas", ERROR_ENVELOPE[name]) if status >= 400 else None
    content = responses[code].get("content", {})
    if "application/json" not in content:
        return None
    return _pointer("paths", template, op["__method"], "responses", code, "content") + (
        "/application~1json/schema"
    )


def check_call(name: str, prefix: str, r: Recorded) -> str:
    """Validate one call batchd made and the emulator's answer; return its operation."""
    assert r.path.startswith(prefix), r.path
    path = r.path.removeprefix(prefix)
    found = operation(name, r.method, path)
    if found is None:
        key = (name, r.method, re.sub(r"/[^/]*-[0-9a-f-]{8,}", "/{id}", path))
        assert key in UNSPECIFIED, f"{name}: {r.method} {path} is no operation of the spec"
        return f"{r.method} {path} (not in the spec)"
    template, op = found
    op = {**op, "__method": r.method.lower()}
    _check_query(name, template, op, r)
    if r.body is not None:
        content = op.get("requestBody", {}).get("content", {})
        assert "application/json" in content, f"{name} {r.method} {template} takes no JSON"
        where = _pointer("paths", template, r.method.lower(), "requestBody", "content")
        check(name, where + "/application~1json/schema", r.body, f"{r.method} {template} body")
    if r.answer is not None:
        where_answer = _response_pointer(name, template, op, r.status)
        assert where_answer is not None, f"{name} {r.method} {template}: {r.status} + JSON"
        check(name, where_answer, r.answer, f"{r.method} {template} answer {r.status}")
    return f"{r.method} {template} {r.status}"


# --- the runs ---------------------------------------------------------------------------


@pytest.fixture
def forms(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, str]]]:
    """The multipart forms batchd builds (text fields, and the file part as a string):
    the recorder reads only JSON bodies, a multipart one is for the emulator to stream."""
    import batchd.providers.openai as mod

    seen: list[dict[str, str]] = []
    real = mod.form

    def spy(name: str, path: Path, offset: int, length: int, *a: Any, **fields: str) -> Any:
        seen.append({**fields, name: path.read_bytes()[offset : offset + length].decode()})
        return real(name, path, offset, length, *a, **fields)

    monkeypatch.setattr(mod, "form", spy)
    yield seen


async def _more_calls(cfg: Any, name: str, kind: str, emu: Emu, tmp_path: Path) -> None:
    """What a clean run does not reach: list, cancel, file lookup, and three errors."""
    emu.state.config.time_scale = 100.0  # the new batch stays validating till cancelled
    metrics = Metrics(list(cfg.provider_configs()))
    async with Providers.build(cfg, metrics) as providers:
        p = providers.of(name)
        data = tmp_path / "more.jsonl"
        data.write_bytes(lines(kind, 2))
        file_id = await p.stage(data, "batchd-more.jsonl")
        req = Create("att-more", "job-more", data, file_id, 2, "/v1/chat/completions", None)
        snap = await p.create(req)

        async def owned(_batch_id: str) -> bool:
            return True

        found = await p.find(req, time.time(), owned)
        assert found is not None and found.id == snap.id
        assert await p.find_staged("batchd-more.jsonl", 0, data.stat().st_size) == file_id
        await p.cancel(snap.id)
        with pytest.raises(NotFound):
            await p.get(snap.id + "x")
        bad = Create("att-bad", "job-bad", data, "file-missing", 2, "/v1/chat/completions", None)
        with pytest.raises(InvalidRequest):
            await p.create(bad)
    wrong = make(cfg.provider_configs()[name], "sk-wrong", metrics)
    async with wrong:
        with pytest.raises(AuthError):
            await wrong.get(snap.id)


@pytest.mark.parametrize("variant", list(VARIANTS))
async def test_calls_and_answers_conform_to_the_published_spec(
    tmp_path: Path, variant: str, forms: list[dict[str, str]]
) -> None:
    v = VARIANTS[variant]
    name, kind = v["spec"], v["kind"]
    async with emulator() as emu:
        sections = {"upload": v["upload"]} if "upload" in v else {}
        if kind == "openai":
            cfg = make_config(tmp_path, emu.url + "/v1", **sections)
            provider: str | None = None
        else:
            cfg = provider_config(tmp_path, emu.url, "p", kind, **sections)
            provider = "p"
        drop_to(cfg, provider, "conf.jsonl", lines(kind, 3, fail=[2]))
        assert (await run_once(cfg)).exit_code == 0
        assert len(read_jsonl(cfg.spool.dir / "done" / "conf" / "output.jsonl")) == 2
        await _more_calls(cfg, provider or "openai", kind, emu, tmp_path)

    seen = {check_call(name, v["prefix"], r) for r in emu.requests}
    expected = {
        "openai": [
            "POST /batches 200",
            "GET /batches 200",
            "GET /batches/{batch_id} 200",
            "GET /batches/{batch_id} 404",
            "GET /batches/{batch_id} 401",
            "POST /batches/{batch_id}/cancel 200",
            "POST /batches 400",
            "GET /files 200",
            "GET /files/{file_id}/content 200",
            "DELETE /files/{file_id} 200",
        ],
        "together": [
            "POST /batches 201",
            "GET /batches 200",
            "GET /batches/{id} 200",
            "GET /batches/{id} 404",
            "GET /batches/{id} 401",
            "POST /batches/{id}/cancel 200",
            "POST /batches 400",
            "GET /files 200",
            "GET /files/{id}/content 200",
            "DELETE /files/{id} 200",
        ],
    }[name]
    if variant == "openai-uploads":
        expected += [
            "POST /uploads 200",
            "POST /uploads/{upload_id}/parts 200",
            "POST /uploads/{upload_id}/complete 200",
        ]
    elif variant == "openai":
        expected.append("POST /files 200")
    missing = set(expected) - seen
    assert not missing, f"not exercised: {sorted(missing)} (seen: {sorted(seen)})"

    # The multipart forms batchd built: the file upload's (and the Uploads API part's).
    assert forms
    form_op = {"openai": ("/files", "post"), "together": ("/files/upload", "post")}[name]
    for f in forms:
        if "data" in f:  # POST /uploads/{upload_id}/parts
            where = _pointer("components", "schemas", "AddUploadPartRequest")
            check(name, where, f, "upload part form")
            continue
        where = _pointer("paths", form_op[0], form_op[1], "requestBody", "content")
        check(name, where + "/multipart~1form-data/schema", f, "upload form")


def test_the_checks_refuse_what_the_specs_refuse() -> None:
    """The validation is not vacuous: enums, formats, required keys, 3.0 `nullable`."""
    batch = _pointer("components", "schemas", "Batch")
    good = {
        "id": "batch_1",
        "object": "batch",
        "endpoint": "/v1/chat/completions",
        "input_file_id": "file-1",
        "completion_window": "24h",
        "status": "validating",
        "created_at": 1,
        "output_file_id": None,  # KNOWN_NULLS
    }
    check("openai", batch, good, "a batch")
    for bad in ({**good, "status": "done"}, {**good, "model": None}, {**good, "id": None}):
        with pytest.raises(AssertionError):
            check("openai", batch, bad, "a bad batch")
    job = _pointer("components", "schemas", "BatchJob")
    check("together", job, {"id": "01234567-8901-2345-6789-012345678901"}, "a job")
    for bad_job in ({"id": "batch-1"}, {"status": "CANCELLING"}, {"created_at": "yesterday"}):
        with pytest.raises(AssertionError):
            check("together", job, bad_job, "a bad job")
    err = _pointer("components", "schemas", "ErrorData")
    check("together", err, {"error": {"message": "m", "type": "t", "param": None}}, "null")
    with pytest.raises(AssertionError):  # `nullable: false`
        check("together", err, {"error": {"message": None, "type": "t"}}, "a null message")
