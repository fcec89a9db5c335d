"""Input-line validation and synthetic per-request results for the emulator.

Token estimator (shared with the daemon's own headroom accounting): a request costs
``len(orjson.dumps(body)) // 4`` tokens, i.e. the UTF-8 bytes of the compact JSON
serialisation of the line's ``body`` object integer-divided by 4; a batch costs the sum over its
lines. ``json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()`` gives the same
byte count for ordinary bodies.

Test hooks inside a line's ``body``: ``"x_emulator": {"status": 4xx|5xx}`` makes that request fail
with that HTTP status (error file); ``"x_emulator": {"expire": true}`` marks it as not run if the
batch expires.
"""

from __future__ import annotations

import random
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

Json = dict[str, Any]
MAX_TASKS = 50_000
MAX_EMBEDDING_INPUTS = 50_000
MAX_REPORTED_ERRORS = 100
_REQUIRED = (("custom_id", str), ("method", str), ("url", str), ("body", dict))


@dataclass(slots=True)
class Req:
    """The compact facts about one input line needed to produce its result."""

    custom_id: str
    status: int = 200  # x_emulator.status, 200 = success
    expire: bool = False  # x_emulator.expire
    tokens: int = 0  # estimate_tokens(body)
    text: str = ""  # prompt snippet echoed in the reply
    n_inputs: int = 1  # embedding / moderation inputs


@dataclass
class Parsed:
    """Outcome of validating an input file."""

    reqs: list[Req]
    errors: list[Json]
    model: str | None
    tokens: int


def estimate_tokens(body: Json) -> int:
    """Estimated token cost of one request body (see module docstring)."""
    return len(orjson.dumps(body)) // 4


UNKNOWN_MODEL_PREFIX = "x-emulator-unknown"


def _err(code: str, message: str, param: str | None = None, line: int | None = None) -> Json:
    return {"code": code, "message": message, "param": param, "line": line}


def _line_problem(
    obj: Any, endpoint: str, seen: set[str], model: str | None
) -> tuple[str, str, str | None] | None:
    if not isinstance(obj, dict):
        return "invalid_json_line", "This line is not a JSON object.", None
    for key, typ in _REQUIRED:
        if not isinstance(obj.get(key), typ) or obj.get(key) == "":
            return "missing_required_parameter", f"Missing required parameter: '{key}'.", key
    if obj["method"] != "POST":
        return "invalid_method", "Only the POST method is supported.", "method"
    if obj["url"] != endpoint:
        msg = f"The URL provided for this request does not match the batch endpoint {endpoint}."
        return "url_mismatch", msg, "url"
    if not isinstance(obj["body"].get("model"), str) or not obj["body"]["model"]:
        return "missing_required_parameter", "Missing required parameter: 'body.model'.", "model"
    if obj["custom_id"] in seen:
        return "duplicate_custom_id", "The custom_id for this request is a duplicate.", "custom_id"
    if model not in (None, obj["body"]["model"]):
        return "model_mismatch", f"The model does not match the batch model {model}.", "model"
    if obj["body"]["model"].startswith(UNKNOWN_MODEL_PREFIX):  # test hook: server-side only
        msg = f"The model '{obj['body']['model']}' does not exist or you do not have access to it."
        return "model_not_found", msg, "model"
    return None


def _prompt_text(body: Json) -> str:
    for key in ("messages", "input", "prompt"):
        v = body.get(key)
        if isinstance(v, list) and v:
            v = v[-1]
        if isinstance(v, dict):
            v = v.get("content")
        if isinstance(v, list) and v and isinstance(v[0], dict):
            v = v[0].get("text")
        if isinstance(v, str):
            return v[:64]
    return ""


def _to_req(obj: Json) -> Req:
    body: Json = obj["body"]
    x = body.get("x_emulator")
    x = x if isinstance(x, dict) else {}
    status = x.get("status")
    inp = body.get("input")
    multi = isinstance(inp, list) and bool(inp) and not isinstance(inp[0], int)
    return Req(
        custom_id=obj["custom_id"],
        status=status if isinstance(status, int) and 400 <= status <= 599 else 200,
        expire=x.get("expire") is True,
        tokens=estimate_tokens(body),
        text=_prompt_text(body),
        n_inputs=len(inp) if multi and isinstance(inp, list) else 1,
    )


def parse_input(path: Path, endpoint: str) -> Parsed:
    """Validate a JSONL input file line by line, streaming it from disk (blank lines skipped)."""
    out = Parsed([], [], None, 0)
    seen: set[str] = set()
    count = inputs = 0
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            count += 1
            if count > MAX_TASKS or len(out.errors) >= MAX_REPORTED_ERRORS:
                continue
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError:
                obj = None
            problem = _line_problem(obj, endpoint, seen, out.model)
            if problem is not None:
                out.errors.append(_err(*problem, line=lineno))
                continue
            out.model = obj["body"]["model"]
            seen.add(obj["custom_id"])
            req = _to_req(obj)
            out.reqs.append(req)
            out.tokens += req.tokens
            inputs += req.n_inputs
    if count == 0:
        out.errors.append(_err("empty_file", "The input file is empty."))
    if count > MAX_TASKS:
        msg = f"The batch has {count} requests; the maximum is {MAX_TASKS}."
        out.errors.append(_err("too_many_tasks", msg))
    if endpoint == "/v1/embeddings" and inputs > MAX_EMBEDDING_INPUTS:
        msg = f"The batch has {inputs} embedding inputs; the maximum is {MAX_EMBEDDING_INPUTS}."
        out.errors.append(_err("too_many_tasks", msg))
    return out


def error_body(status: int) -> Json:
    """The OpenAI error envelope returned for an emulated failed request."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    msg = f"Emulated request failure (HTTP {status})."
    return {"error": {"message": msg, "type": kind, "param": None, "code": None}}


def _vector(seed: str) -> list[float]:
    rng = random.Random(seed)
    return [round(rng.uniform(-1.0, 1.0), 6) for _ in range(8)]


def response_body(endpoint: str, model: str, req: Req, created: int) -> tuple[Json, int]:
    """A plausible success body for ``endpoint`` and its number of output tokens."""
    rid, text = secrets.token_hex(12), f"Emulated reply to: {req.text}"
    n_in, n_out = req.tokens, 1 + len(text) // 4
    chat_usage: Json = {
        "prompt_tokens": n_in,
        "completion_tokens": n_out,
        "total_tokens": n_in + n_out,
    }
    if endpoint == "/v1/chat/completions":
        msg = {"role": "assistant", "content": text, "refusal": None}
        choice = {"index": 0, "message": msg, "logprobs": None, "finish_reason": "stop"}
        chat_usage |= {"prompt_tokens_details": {"cached_tokens": 0}}
        chat_usage |= {"completion_tokens_details": {"reasoning_tokens": 0}}
        body = {"id": f"chatcmpl-{rid}", "object": "chat.completion", "choices": [choice]}
    elif endpoint == "/v1/completions":
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": "stop"}
        body = {"id": f"cmpl-{rid}", "object": "text_completion", "choices": [choice]}
    elif endpoint == "/v1/responses":
        part = {"type": "output_text", "text": text, "annotations": []}
        item = {"type": "message", "id": f"msg_{rid}", "status": "completed", "role": "assistant"}
        usage = {"input_tokens": n_in, "input_tokens_details": {"cached_tokens": 0}}
        usage |= {"output_tokens": n_out, "output_tokens_details": {"reasoning_tokens": 0}}
        output = [item | {"content": [part]}]
        body = {"id": f"resp_{rid}", "object": "response", "status": "completed", "output": output}
        return body | {"created_at": created, "model": model, "usage": usage}, n_out
    elif endpoint == "/v1/embeddings":
        data = [
            {"object": "embedding", "index": i, "embedding": _vector(f"{req.custom_id}:{i}")}
            for i in range(req.n_inputs)
        ]
        usage = {"prompt_tokens": n_in, "total_tokens": n_in}
        return {"object": "list", "data": data, "model": model, "usage": usage}, 0
    elif endpoint == "/v1/moderations":
        result = {"flagged": False, "categories": {"violence": False}}
        result |= {"category_scores": {"violence": 0.0}}
        return {"id": f"modr-{rid}", "model": model, "results": [result] * req.n_inputs}, 0
    else:
        return {"id": f"emu-{rid}", "object": endpoint, "created": created, "model": model}, n_out
    return body | {"created": created, "model": model, "usage": chat_usage}, n_out
