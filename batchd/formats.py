"""Each provider's input line format and its rules, as `jsonl.Validator` subclasses.

Lines stay in the provider's native format (batchd never translates a request); these
rules are what `batchd validate --provider P`, `batchd submit` and the daemon apply:

- openai, groq, azure_openai: `{custom_id, method: "POST", url, body}`, one url and one
  `body.model` per file (Azure: the batch deployment; Groq: chat completions only);
- together: `{custom_id (<= 64 chars), body}` (`method`/`url` optional);
- anthropic: `{custom_id, params}` (Message Batches: custom_id `[a-zA-Z0-9_-]{1,64}`,
  params with model, max_tokens >= 1, messages; no streaming); models may differ;
- gemini: `{key, request}` (a GenerateContentRequest with contents; the model is the
  job's: `request.model` if the lines name one, else `[providers.NAME] model`);
- mistral: `{custom_id, body}` (the model is the job's: `body.model` or the config's).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Collection
from typing import Any

from batchd import jsonl
from batchd.jsonl import Validator, _json_type, _show

ANTHROPIC_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}")
AZURE_ENDPOINTS = frozenset({"/v1/chat/completions", "/v1/responses"})
GROQ_ENDPOINTS = frozenset({"/v1/chat/completions"})
TOGETHER_ENDPOINTS = frozenset(
    {"/v1/chat/completions", "/v1/audio/transcriptions", "/v1/audio/translations"}
)
ANTHROPIC_ENDPOINT = "/v1/messages"
GEMINI_ENDPOINT = "batchGenerateContent"
_LIMITS = jsonl.Limits()

OnRequest = Callable[[dict[str, Any]], None]

# The per-request id field of each kind's input (and result) lines.
ID_KEYS = {"gemini": "key"}


def id_key(kind: str) -> str:
    """The field naming a request in this kind's lines."""
    return ID_KEYS.get(kind, "custom_id")


class _Lines(Validator):
    """Shared per-line checks; subclasses say what a line must hold."""

    allowed: frozenset[str] = frozenset()  # top-level keys (empty: any)
    id_field = "custom_id"
    id_pattern: re.Pattern[str] | None = None
    max_id_len = 0  # 0: no limit
    same_model = True  # every line must name the same model

    def __init__(
        self,
        limits: jsonl.Limits = _LIMITS,
        max_problems: int = 100,
        model: str | None = None,
        on_request: OnRequest | None = None,
    ) -> None:
        super().__init__(limits, max_problems, on_request)
        self._default_model = model
        self._mixed = False

    def _id(self, n: int, obj: dict[str, Any]) -> None:
        key = self.id_field
        cid = obj.get(key)
        if cid is None and key not in obj:
            self._add(n, f"missing_{key}", f"no {key}")
        elif not isinstance(cid, str) or not cid:
            self._add(n, f"invalid_{key}", f"{key} must be a non-empty string, not {_show(cid)}")
        elif self.id_pattern is not None and not self.id_pattern.fullmatch(cid):
            msg = f"{key} {_show(cid)} must match {self.id_pattern.pattern}"
            self._add(n, f"invalid_{key}", msg)
        elif self.max_id_len and len(cid) > self.max_id_len:
            msg = f"{key} {_show(cid)} is longer than {self.max_id_len} characters"
            self._add(n, f"invalid_{key}", msg)
        elif (first := self._seen.setdefault(cid, n)) != n:
            self._add(n, f"duplicate_{key}", f"{key} {_show(cid)} already used on line {first}")

    def _unknown(self, n: int, obj: dict[str, Any]) -> None:
        if self.allowed:
            extra = sorted(k for k in obj if k not in self.allowed)
            if extra:
                names = ", ".join(extra[:3])
                self._add(n, "unknown_field", f"unexpected field(s) {names} in the line")

    def _object(self, n: int, obj: dict[str, Any], key: str) -> dict[str, Any] | None:
        if key not in obj:
            self._add(n, f"missing_{key}", f"no {key}")
            return None
        value = obj[key]
        if type(value) is not dict:
            msg = f"{key} must be an object, got a JSON {_json_type(value)}"
            self._add(n, f"invalid_{key}", msg)
            return None
        return value

    def _model(self, n: int, model: Any, where: str) -> None:
        """One line's model (None: the line names none, the job's default applies)."""
        s = self._summary
        if model is None:
            model = self._default_model
            if model is None:
                self._add(n, "missing_model", f"no model: name it in {where} or configure one")
                return
        if not isinstance(model, str) or not model:
            self._add(n, "missing_model", f"{where} must be a non-empty string")
        elif s.model is None and not self._mixed:
            s.model = model
        elif model != s.model:
            if self.same_model:
                msg = f"model {_show(model)} differs from the first line's {_show(s.model)}"
                self._add(n, "model_mismatch", msg)
            else:
                s.model, self._mixed = None, True  # mixed models: no one model for the job


class OpenAILines(Validator):
    """OpenAI's rules (jsonl.Validator), narrowed for a host's endpoints and deployments."""

    def __init__(
        self,
        limits: jsonl.Limits = _LIMITS,
        max_problems: int = 100,
        endpoints: Collection[str] | None = None,
        deployments: Collection[str] = (),
        on_request: OnRequest | None = None,
    ) -> None:
        super().__init__(limits, max_problems, on_request)
        self._endpoints = frozenset(endpoints) if endpoints is not None else None
        self._deployments = frozenset(deployments)

    def _request(self, n: int, obj: dict[str, Any]) -> None:
        url = obj.get("url")
        if self._endpoints is not None and isinstance(url, str) and url not in self._endpoints:
            allowed = ", ".join(sorted(self._endpoints))
            self._add(n, "invalid_url", f"url {_show(url)}: this provider takes {allowed}")
            return
        super()._request(n, obj)
        body = obj.get("body")
        model = body.get("model") if isinstance(body, dict) else None
        if self._deployments and isinstance(model, str) and model not in self._deployments:
            known = ", ".join(sorted(self._deployments))
            msg = f"model {_show(model)} is not a batch deployment ({known})"
            self._add(n, "unknown_deployment", msg)


class TogetherLines(_Lines):
    """Together: `{custom_id (1..64 chars), body}`, `method`/`url` optional."""

    allowed = frozenset({"custom_id", "body", "method", "url"})
    max_id_len = 64
    same_model = False

    def _request(self, n: int, obj: dict[str, Any]) -> None:
        self._unknown(n, obj)
        self._id(n, obj)
        s = self._summary
        url = obj.get("url", "/v1/chat/completions")
        if url not in TOGETHER_ENDPOINTS:
            allowed = ", ".join(sorted(TOGETHER_ENDPOINTS))
            self._add(n, "invalid_url", f"url must be one of {allowed}, got {_show(url)}")
        elif s.endpoint is None:
            s.endpoint = url
        elif url != s.endpoint:
            self._add(n, "url_mismatch", f"url {_show(url)} differs from {_show(s.endpoint)}")
        if "method" in obj and obj["method"] != "POST":
            self._add(n, "invalid_method", f'method must be "POST", got {_show(obj["method"])}')
        body = self._object(n, obj, "body")
        if body is not None:
            self._model(n, body.get("model"), "body.model")


class AnthropicLines(_Lines):
    """Message Batches requests: `{custom_id, params}`."""

    allowed = frozenset({"custom_id", "params"})
    id_pattern = ANTHROPIC_ID
    same_model = False

    def _request(self, n: int, obj: dict[str, Any]) -> None:
        self._unknown(n, obj)
        self._id(n, obj)
        self._summary.endpoint = ANTHROPIC_ENDPOINT
        params = self._object(n, obj, "params")
        if params is None:
            return
        self._model(n, params.get("model", ""), "params.model")
        mt = params.get("max_tokens")
        if type(mt) is not int or mt < 1:
            self._add(
                n,
                "invalid_max_tokens",
                f"params.max_tokens must be an integer >= 1, got {_show(mt)}",
            )
        msgs = params.get("messages")
        if type(msgs) is not list or not msgs:
            self._add(n, "invalid_messages", "params.messages must be a non-empty array")
        if params.get("stream"):
            self._add(n, "stream_not_supported", "params.stream: batches do not stream")


class GeminiLines(_Lines):
    """Gemini Batch Mode file lines: `{key, request}` (a GenerateContentRequest)."""

    allowed = frozenset({"key", "request"})
    id_field = "key"

    def _request(self, n: int, obj: dict[str, Any]) -> None:
        self._unknown(n, obj)
        self._id(n, obj)
        self._summary.endpoint = GEMINI_ENDPOINT
        req = self._object(n, obj, "request")
        if req is None:
            return
        contents = req.get("contents")
        if type(contents) is not list or not contents:
            self._add(n, "invalid_contents", "request.contents must be a non-empty array")
        model = req.get("model")
        if isinstance(model, str):
            model = model.removeprefix("models/")
        self._model(n, model, "request.model")


class MistralLines(_Lines):
    """Mistral batch lines: `{custom_id, body}` (batchd needs the custom_id to match
    results, so it is required here although Mistral would number the lines)."""

    allowed = frozenset({"custom_id", "body"})

    def __init__(self, *a: Any, endpoint: str | None = None, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self._endpoint = endpoint or "/v1/chat/completions"

    def _request(self, n: int, obj: dict[str, Any]) -> None:
        self._unknown(n, obj)
        self._id(n, obj)
        self._summary.endpoint = self._endpoint
        body = self._object(n, obj, "body")
        if body is not None:
            self._model(n, body.get("model"), "body.model")


_OPENAI_SHAPED = frozenset({"openai", "azure_openai", "groq"})
_CHAT = "/v1/chat/completions"


def openai_request(
    kind: str, obj: dict[str, Any], model: str | None = None, endpoint: str | None = None
) -> dict[str, Any]:
    """One line of a kind's format as the OpenAI-shaped request the cost estimator reads
    (its messages, output limit and model; `model`/`endpoint`: the provider's defaults).
    Nothing is sent in this shape: lines stay native."""
    if kind == "anthropic":
        p = obj.get("params")
        if type(p) is not dict:
            return {}
        msgs = list(p["messages"]) if type(p.get("messages")) is list else []
        if p.get("system"):
            msgs.insert(0, {"role": "system", "content": p["system"]})
        body = {"model": p.get("model"), "messages": msgs, "max_tokens": p.get("max_tokens")}
        if p.get("tools"):
            body["tools"] = p["tools"]
        return {"url": _CHAT, "body": body}
    if kind == "gemini":
        r = obj.get("request")
        if type(r) is not dict:
            return {}
        contents = r["contents"] if type(r.get("contents")) is list else []
        msgs = [
            {"role": c.get("role") or "user", "content": c.get("parts")}
            for c in contents
            if type(c) is dict
        ]
        si = r.get("systemInstruction") or r.get("system_instruction")
        if type(si) is dict:
            msgs.insert(0, {"role": "system", "content": si.get("parts")})
        gc = r.get("generationConfig") or r.get("generation_config") or {}
        limit = (
            (gc.get("maxOutputTokens") or gc.get("max_output_tokens")) if type(gc) is dict else None
        )
        m = r.get("model")
        m = m.removeprefix("models/") if isinstance(m, str) else model
        body = {"model": m, "messages": msgs, "max_tokens": limit}
        if r.get("tools"):
            body["tools"] = r["tools"]
        return {"url": _CHAT, "body": body}
    if kind in ("mistral", "together"):
        b = obj.get("body")
        if type(b) is not dict:
            return {}
        if b.get("model") is None and model:
            b = {"model": model, **b}
        return {"url": obj.get("url") or endpoint or _CHAT, "body": b}
    return obj


KINDS = ("openai", "azure_openai", "anthropic", "gemini", "mistral", "groq", "together")


def validator(
    kind: str,
    limits: jsonl.Limits = jsonl.UNBOUNDED,
    *,
    model: str | None = None,
    endpoint: str | None = None,
    deployments: Collection[str] = (),
    max_problems: int = 100,
    on_request: OnRequest | None = None,
) -> Validator:
    """The line rules of a provider kind (`model`: the job's model where lines need not
    name one; `deployments`: Azure batch deployments lines may name; `on_request`: sees
    every line parsed as a JSON object, as `jsonl.Validator`'s)."""
    f = on_request
    if f is not None and kind not in _OPENAI_SHAPED:
        native = f  # the cost estimator reads OpenAI's shape: hand it each line as such

        def f(obj: dict[str, Any]) -> None:
            native(openai_request(kind, obj, model, endpoint))

    if kind == "anthropic":
        return AnthropicLines(limits, max_problems, on_request=f)
    if kind == "gemini":
        return GeminiLines(limits, max_problems, model, on_request=f)
    if kind == "mistral":
        return MistralLines(limits, max_problems, model, endpoint=endpoint, on_request=f)
    if kind == "together":
        return TogetherLines(limits, max_problems, on_request=f)
    if kind == "groq":
        return OpenAILines(limits, max_problems, GROQ_ENDPOINTS, on_request=f)
    if kind == "azure_openai":
        return OpenAILines(limits, max_problems, AZURE_ENDPOINTS, deployments, on_request=f)
    if kind == "openai":
        return OpenAILines(limits, max_problems, on_request=f)
    raise ValueError(f"unknown provider kind {kind!r} (one of {', '.join(KINDS)})")


def validate_path(
    path: str, kind: str, limits: jsonl.Limits = jsonl.UNBOUNDED, **kw: Any
) -> jsonl.Summary:
    """Stream a file through a kind's validator."""
    v = validator(kind, limits, **kw)
    fd = os.open(path, os.O_RDONLY)
    with os.fdopen(fd, "rb", buffering=0) as f:
        while chunk := f.read(1 << 20):
            v.feed(chunk)
    return v.finish()
