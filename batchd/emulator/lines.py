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
    message: str | None = None  # why the request failed, when the provider validates per request
    meta: Any = None  # provider data echoed in the result (Gemini inline ``metadata``)


@dataclass
class Parsed:
    """Outcome of validating an input file."""

    reqs: list[Req]
    errors: list[Json]
    model: str | None
    tokens: int


Problem = tuple[str, str, str | None]  # (code, message, param) of a line that fails the batch


class Rules:
    """One provider's input-line rules; this base class holds OpenAI's ``{custom_id, method,
    url, body}`` lines. Subclasses override the hooks for other envelopes."""

    max_tasks = MAX_TASKS
    same_model = True  # every line must name the same body.model

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint

    def problem(self, obj: Any, seen: set[str], model: str | None) -> Problem | None:
        """Why this line fails the whole batch, or None."""
        return _line_problem(obj, self.endpoint, seen, model if self.same_model else None)

    def custom_id(self, obj: Json, index: int) -> str:
        """The request's id (``index`` counts requests from 0)."""
        return str(obj["custom_id"])

    def body(self, obj: Json) -> Json:
        """The request body, where ``x_emulator`` hooks live."""
        return dict(obj["body"])

    def model(self, obj: Json) -> str | None:
        """The model the line names, if any."""
        m = self.body(obj).get("model")
        return m if isinstance(m, str) else None

    def request_error(self, obj: Json) -> str | None:
        """Why this one request fails (errored result, batch unaffected), or None."""
        return None

    def meta(self, obj: Json) -> Any:
        """Provider data to echo in the request's result."""
        return None


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
    contents = body.get("contents")  # Gemini: contents[-1].parts[0].text
    if isinstance(contents, list) and contents and isinstance(contents[-1], dict):
        parts = contents[-1].get("parts")
        if isinstance(parts, list) and parts and isinstance(parts[0], dict):
            text = parts[0].get("text")
            if isinstance(text, str):
                return text[:64]
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


def hooks(body: Json, meta: Any = None) -> tuple[int, bool]:
    """The (status, expire) test hooks of a request: ``body.x_emulator`` or, where a provider
    keeps only string metadata (Gemini inline), ``x_emulator_status``/``x_emulator_expire``."""
    x = body.get("x_emulator")
    x = dict(x) if isinstance(x, dict) else {}
    if isinstance(meta, dict):
        if str(meta.get("x_emulator_status", "")).isdigit():
            x.setdefault("status", int(meta["x_emulator_status"]))
        if meta.get("x_emulator_expire") == "true":
            x.setdefault("expire", True)
    status = x.get("status")
    if not isinstance(status, int) or isinstance(status, bool) or not 400 <= status <= 599:
        status = 200
    return status, x.get("expire") is True


def make_req(custom_id: str, body: Json, meta: Any = None) -> Req:
    """The Req of one valid line with request body ``body``."""
    status, expire = hooks(body, meta)
    inp = body.get("input")
    multi = isinstance(inp, list) and bool(inp) and not isinstance(inp[0], int)
    return Req(
        custom_id=custom_id,
        status=status,
        expire=expire,
        tokens=estimate_tokens(body),
        text=_prompt_text(body),
        n_inputs=len(inp) if multi and isinstance(inp, list) else 1,
        meta=meta,
    )


def parse_input(path: Path, endpoint: str) -> Parsed:
    """Validate an OpenAI-format JSONL input file (see :func:`parse_lines`)."""
    return parse_lines(path, Rules(endpoint), embedding_cap=endpoint == "/v1/embeddings")


def parse_lines(path: Path, rules: Rules, embedding_cap: bool = False) -> Parsed:
    """Validate a JSONL input file line by line with ``rules``, streaming it from disk (blank
    lines skipped)."""
    out = Parsed([], [], None, 0)
    seen: set[str] = set()
    count = inputs = 0
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            count += 1
            if count > rules.max_tasks or len(out.errors) >= MAX_REPORTED_ERRORS:
                continue
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError:
                obj = None
            problem = rules.problem(obj, seen, out.model)
            if problem is not None:
                out.errors.append(_err(*problem, line=lineno))
                continue
            cid = rules.custom_id(obj, count - 1)
            out.model = rules.model(obj) or out.model
            seen.add(cid)
            req = make_req(cid, rules.body(obj), rules.meta(obj))
            why = rules.request_error(obj)
            if why is not None:
                req.status, req.message = 400, why
            out.reqs.append(req)
            out.tokens += req.tokens
            inputs += req.n_inputs
    if count == 0:
        out.errors.append(_err("empty_file", "The input file is empty."))
    if count > rules.max_tasks:
        msg = f"The batch has {count} requests; the maximum is {rules.max_tasks}."
        out.errors.append(_err("too_many_tasks", msg))
    if embedding_cap and inputs > MAX_EMBEDDING_INPUTS:
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
