"""What a job will cost before it runs: tokens and a low-high price range from its lines.

Fed one parsed request line at a time (the validator already parses each line), so it
adds a walk over the body and no second parse. Input tokens: the UTF-8 bytes of the
prompt text / 4, calibrated by really tokenizing a deterministic sample of lines (the
first 32, then one in 256) when an offline tokenizer is
installed, plus exact counts where the line holds token ids, per-message overheads and
a fixed charge per image. Tokenizing every line would make validation 10-30x slower
(bench/estimate.py). Output tokens: low = `output_ratio` x input (0 by default: the
prompt alone), high = max_completion_tokens / max_tokens / max_output_tokens x n, or
the model's documented maximum output when the line sets no limit.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import orjson

from batchd.config import EstimateConfig
from batchd.prices import Price, Unknown, format_usd, round_amount

__all__ = [
    "Estimate",
    "Estimator",
    "configured",
    "encoding_for_model",
    "max_output_tokens",
    "token_counter",
]

Counter = Callable[[str], int]

CHAT: Final = "/v1/chat/completions"
RESPONSES: Final = "/v1/responses"
EMBEDDINGS: Final = "/v1/embeddings"
COMPLETIONS: Final = "/v1/completions"
MODERATIONS: Final = "/v1/moderations"

# OpenAI's chat format: ~3 tokens around every message and 1 for its role ("system",
# "user", "assistant" are one token each; without it short chat lines were estimated
# ~10-20 % low, bench/cost_accuracy.py), +1 for a name, 3 to prime the reply.
_PER_MESSAGE: Final = 4
_PER_NAME: Final = 1
_PRIMING: Final = 3
# Images are not decoded. A high/auto-detail image costs at most 85 + 8 x 170 = 1,445
# tokens on gpt-4o-family models (a 768x2048 image, 8 tiles); low detail costs 85.
# gpt-4o-mini counts 2,833 + 8 x 5,667 tokens (its image tokens are priced ~33x lower).
_IMAGE_LOW: Final = 85
_IMAGE_HIGH: Final = 1_445
_IMAGE_HIGH_BY_MODEL: Final = (("gpt-4o-mini", 2_833 + 8 * 5_667),)
# The documented maximum output of OpenAI models (longest prefix wins), for a line that
# sets no output limit: the true upper bound of what that request may cost.
_MAX_OUTPUT: Final = (
    ("gpt-5", 128_000),
    ("gpt-4.1", 32_768),
    ("gpt-4o-2024-05-13", 4_096),
    ("gpt-4o", 16_384),
    ("chatgpt-4o", 16_384),
    ("gpt-4-turbo", 4_096),
    ("gpt-4", 8_192),
    ("gpt-3.5", 4_096),
    ("o1-mini", 65_536),
    ("o1", 100_000),
    ("o3", 100_000),
    ("o4-mini", 100_000),
)
_COMPLETIONS_DEFAULT_MAX: Final = 16  # /v1/completions without max_tokens
_CL100K: Final = ("gpt-4", "gpt-3.5", "text-embedding-", "davinci-002", "babbage-002")
_O200K: Final = ("gpt-4o", "gpt-4.1", "gpt-4.5", "chatgpt-4o")


def _base_model(model: str) -> str:
    # "ft:gpt-4o-mini-2024-07-18:acme::id" is tokenized and bounded like its base model.
    return model.split(":")[1] if model.startswith("ft:") and model.count(":") >= 2 else model


def encoding_for_model(model: str) -> str:
    """tiktoken encoding of an OpenAI model; o200k_base (an approximation) for other models."""
    m = _base_model(model)
    if m.startswith(_O200K):
        return "o200k_base"
    return "cl100k_base" if m.startswith(_CL100K) else "o200k_base"


def max_output_tokens(model: str, default: int) -> int:
    """The documented maximum output tokens of `model`, else `default`."""
    m = _base_model(model)
    best = max((p for p, _ in _MAX_OUTPUT if m.startswith(p)), key=len, default=None)
    return dict(_MAX_OUTPUT)[best] if best is not None else default


def _image_high(model: str) -> int:
    m = _base_model(model)
    return next((n for p, n in _IMAGE_HIGH_BY_MODEL if m.startswith(p)), _IMAGE_HIGH)


_TIKTOKEN_URLS: Final = {
    "o200k_base": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
    "cl100k_base": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
}


def _tiktoken_cached(encoding: str) -> bool:
    """True when tiktoken has `encoding` in its cache, so loading it touches no network."""
    url = _TIKTOKEN_URLS.get(encoding)
    if url is None:
        return False
    env = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    cache = Path(env) if env else Path(tempfile.gettempdir()) / "data-gym-cache"
    return (cache / hashlib.sha1(url.encode()).hexdigest()).is_file()


@functools.cache
def token_counter(encoding: str) -> tuple[Counter, str] | None:
    """(count, name) of an offline tokenizer for `encoding`, or None when none is installed.

    bpe-openai (the `tokens` extra) bundles OpenAI's BPE files; tiktoken is used only if
    its cache already holds the file (it would download it otherwise, which a daemon
    must not do on the validation path).
    """
    try:
        with warnings.catch_warnings():
            # bpe-openai 0.1.4 loads its data with a deprecated importlib.resources call.
            warnings.simplefilter("ignore", DeprecationWarning)
            bindings: Any = importlib.import_module("bpe_openai._bindings")
        count: Counter = bindings.tokenizer_for_encoding(encoding).count
        return count, f"{encoding} (bpe-openai)"
    except (ImportError, AttributeError, RuntimeError, ValueError):
        pass
    if _tiktoken_cached(encoding):
        try:
            enc: Any = importlib.import_module("tiktoken").get_encoding(encoding)
        except Exception:  # any failure means "no tokenizer", never a crash
            return None

        def count_tiktoken(text: str) -> int:
            return len(enc.encode_ordinary(text))

        return count_tiktoken, f"{encoding} (tiktoken)"
    return None


@dataclass(frozen=True)
class Estimate:
    """A job's estimated tokens and cost range; costs in nano-dollars or Unknown."""

    requests: int
    input_tokens: int
    output_low: int
    output_high: int
    cost_low: int | Unknown
    cost_high: int | Unknown
    method: str = "bytes/4"  # how input tokens were counted
    price_source: str = ""
    unbounded: int = 0  # requests without an output limit (high uses the model maximum)
    images: int = 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form for job.json (costs as nano-dollars; null + reason when unknown)."""
        unknown = self.cost_high.reason if isinstance(self.cost_high, Unknown) else None
        return {
            "requests": self.requests,
            "input_tokens": self.input_tokens,
            "output_tokens_low": self.output_low,
            "output_tokens_high": self.output_high,
            "cost_low_nanousd": None if isinstance(self.cost_low, Unknown) else self.cost_low,
            "cost_high_nanousd": None if isinstance(self.cost_high, Unknown) else self.cost_high,
            "cost_unknown_reason": unknown,
            "method": self.method,
            "price_source": self.price_source,
            "unbounded_requests": self.unbounded,
            "images": self.images,
        }

    def describe(self) -> str:
        """One line for `batchd validate` / `submit`."""
        cost = (
            f"cost unknown ({self.cost_high.reason})"
            if isinstance(self.cost_high, Unknown)
            else f"cost {format_usd(self.cost_low)} to {format_usd(self.cost_high)}"
        )
        text = (
            f"estimate: {self.requests:,} requests, ~{self.input_tokens:,} input tokens"
            f" ({self.method}), {self.output_low:,} to {self.output_high:,} output tokens, {cost}"
        )
        if self.unbounded:
            text += (
                f"; {self.unbounded:,} requests set no max tokens (bounded by the model maximum)"
            )
        return text


def _nbytes(s: str) -> int:
    return len(s) if s.isascii() else len(s.encode("utf-8", "surrogatepass"))


class Estimator:
    """Incremental: add() each parsed request line of one job, then finish()."""

    def __init__(
        self,
        price_of: Callable[[str], Price | Unknown] | None = None,
        *,
        output_ratio: float = 0.0,
        default_max_output_tokens: int = 16_384,
        tokenizer: bool | Counter = True,
        sample_head: int = 32,
        sample_every: int = 256,
    ) -> None:
        """`price_of(model)` prices the job's model; `tokenizer` False = bytes/4 only."""
        self._price_of = price_of
        self._ratio = output_ratio
        self._default_max = default_max_output_tokens
        self._tokenizer = tokenizer
        self._head = sample_head
        # About one line in `sample_every`, picked by a multiplicative hash of the line
        # number: deterministic, yet not in step with any period the file may have.
        self._threshold = (1 << 32) // max(sample_every, 1)
        self._model: str | None = None
        self._price: Price | Unknown = Unknown("no request line names a model")
        self._count: Counter | None = None
        self._method = "bytes/4"
        self._max_out = default_max_output_tokens
        self._image_high = _IMAGE_HIGH
        self._unpriced: str | None = None
        self._tiered = False
        self._tier: Callable[[int], int] = lambda tokens: 0
        self.requests = 0
        self.images = 0
        self.unbounded = 0
        # Per price tier: fixed input tokens, input text bytes, output tokens (high).
        self._fixed = [0]
        self._text = [0]
        self._out = [0]
        self._sample_tokens = 0
        self._sample_bytes = 0
        self._sampled = 0
        # Work areas of the current line.
        self._line_fixed = 0
        self._line_text = 0
        self._sink: list[str] | None = None

    # -- setup on the first model --------------------------------------------------

    def _set_model(self, model: str) -> None:
        self._model = model
        self._max_out = max_output_tokens(model, self._default_max)
        self._image_high = _image_high(model)
        if self._price_of is not None:
            self._price = self._price_of(model)
        else:
            self._price = Unknown("no price list given")
        if isinstance(self._price, Price) and self._price.thresholds:
            n = len(self._price.rates)
            self._fixed, self._text, self._out = [0] * n, [0] * n, [0] * n
            self._tiered, self._tier = True, self._price.tier
        if callable(self._tokenizer):
            self._count, self._method = self._tokenizer, "tokenizer"
        elif self._tokenizer:
            found = token_counter(encoding_for_model(model))
            if found is not None:
                self._count, self._method = found

    # -- feeding -------------------------------------------------------------------

    def add(self, request: Mapping[str, Any]) -> None:
        """Account one parsed request line ({custom_id, method, url, body})."""
        n = self.requests = self.requests + 1
        body = request.get("body")
        if type(body) is not dict:
            return
        if self._model is None:
            model = body.get("model")
            if isinstance(model, str) and model:
                self._set_model(model)
        if self._count is not None and (
            n <= self._head or (n * 2654435761) & 0xFFFFFFFF < self._threshold
        ):
            self._add(request, body, [])
        elif not (self._simple_chat(request, body)):
            self._add(request, body, None)

    def _simple_chat(self, request: Mapping[str, Any], body: dict[str, Any]) -> bool:
        """The common line (chat; string contents; an output limit; nothing else) inlined,
        since this runs once per line; False: leave it to the general walk."""
        if len(body) > 3 or self._tiered or request.get("url") != CHAT:
            return False
        messages = body.get("messages")
        if type(messages) is not list:
            return False
        fixed, text = _PRIMING, 0
        for m in messages:
            if type(m) is not dict or len(m) > 2:  # a name, tool calls: the general walk
                return False
            content = m.get("content")
            if type(content) is not str:
                return False
            fixed += _PER_MESSAGE
            text += len(content) if content.isascii() else _nbytes(content)
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        if type(limit) is not int or limit <= 0:
            return False
        self._fixed[0] += fixed
        self._text[0] += text
        self._out[0] += limit
        return True

    def _add(
        self, request: Mapping[str, Any], body: dict[str, Any], sink: list[str] | None
    ) -> None:
        """The general walk of one line; with a `sink`, its text is also tokenized."""
        self._sink = sink
        self._line_fixed = self._line_text = 0
        url = request.get("url")
        if url == CHAT:
            out = self._chat(body)
        elif url == RESPONSES:
            out = self._responses(body)
        elif url == EMBEDDINGS or url == MODERATIONS:
            self._inputs(body.get("input"))
            out = 0
        elif url == COMPLETIONS:
            out = self._completions(body)
        else:
            self._unpriced = f"{url} is not priced per token"
            return
        fixed, text = self._line_fixed, self._line_text
        tier = self._tier(fixed + round(text * self._tokens_per_byte())) if self._tiered else 0
        self._fixed[tier] += fixed
        self._text[tier] += text
        self._out[tier] += out
        if sink is not None and self._count is not None:
            count = self._count
            self._sample_tokens += sum(count(s) for s in sink)
            self._sample_bytes += text
            self._sampled += 1
            self._sink = None

    def _tokens_per_byte(self) -> float:
        if self._sample_bytes:
            return self._sample_tokens / self._sample_bytes
        return 0.25

    def _str(self, s: str) -> None:
        self._line_text += _nbytes(s)
        if self._sink is not None:
            self._sink.append(s)

    def _json(self, value: object) -> None:
        """Tools, schemas, tool calls: their JSON text approximates what the model reads."""
        self._str(orjson.dumps(value).decode())

    def _image(self, part: Mapping[str, Any]) -> None:
        self.images += 1
        detail = part.get("detail")
        if detail is None and isinstance(url := part.get("image_url"), dict):
            detail = url.get("detail")
        self._line_fixed += _IMAGE_LOW if detail == "low" else self._image_high

    def _content(self, content: object) -> None:
        """A message's content: a string or a list of parts (text, images, ...)."""
        if type(content) is str:
            self._str(content)
        elif type(content) is list:
            for part in content:
                if type(part) is dict:
                    kind = part.get("type")
                    text = part.get("text")
                    if type(text) is str:
                        self._str(text)
                    elif kind in ("image_url", "input_image"):
                        self._image(part)
                    elif kind == "refusal" and type(r := part.get("refusal")) is str:
                        self._str(r)
                elif type(part) is str:
                    self._str(part)

    def _extras(self, body: Mapping[str, Any]) -> None:
        for key in ("tools", "functions", "response_format", "text"):
            value = body.get(key)
            if value:
                self._json(value)

    def _output_limit(self, *values: object) -> int:
        for v in values:
            if type(v) is int and v > 0:
                return v
        self.unbounded += 1
        return self._max_out

    def _chat(self, body: Mapping[str, Any]) -> int:
        messages = body.get("messages")
        fixed, text, sink = _PRIMING, 0, self._sink
        if type(messages) is list:
            for m in messages:
                if type(m) is not dict:
                    continue
                fixed += _PER_MESSAGE + _PER_NAME if "name" in m else _PER_MESSAGE
                content = m.get("content")
                if type(content) is str:  # the common case, inlined: this runs per line
                    text += len(content) if content.isascii() else _nbytes(content)
                    if sink is not None:
                        sink.append(content)
                elif content is not None:
                    self._content(content)
                if m.get("tool_calls"):
                    self._json(m["tool_calls"])
        self._line_fixed += fixed
        self._line_text += text
        if len(body) > 3:  # model, messages, max_tokens: anything else may add tokens
            self._extras(body)
        n = body.get("n")
        choices = n if type(n) is int and n > 0 else 1
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        if type(limit) is int and limit > 0:
            return choices * limit
        return choices * self._output_limit()

    def _responses(self, body: Mapping[str, Any]) -> int:
        instructions = body.get("instructions")
        if type(instructions) is str:
            self._str(instructions)
        items = body.get("input")
        if type(items) is str:
            self._str(items)
        elif type(items) is list:
            for item in items:
                if type(item) is not dict:
                    continue
                self._line_fixed += _PER_MESSAGE
                if "content" in item:
                    self._content(item["content"])
                else:  # function_call, function_call_output, ...: their text fields
                    for key in ("arguments", "output", "name"):
                        if type(v := item.get(key)) is str:
                            self._str(v)
        self._line_fixed += _PRIMING
        self._extras(body)
        return self._output_limit(body.get("max_output_tokens"))

    def _completions(self, body: Mapping[str, Any]) -> int:
        self._inputs(body.get("prompt"))
        suffix = body.get("suffix")
        if type(suffix) is str:
            self._str(suffix)
        limit = body.get("max_tokens")
        per = limit if type(limit) is int and limit > 0 else _COMPLETIONS_DEFAULT_MAX
        n, best_of = body.get("n"), body.get("best_of")
        runs = max(v if type(v) is int and v > 0 else 1 for v in (n, best_of))
        return runs * per

    def _inputs(self, value: object) -> None:
        """Embedding / completion / moderation input: text, texts, token ids, or parts."""
        if type(value) is str:
            self._str(value)
        elif type(value) is list and value:
            first = value[0]
            if type(first) is int:
                self._line_fixed += len(value)  # token ids: exact
            else:
                for v in value:
                    if type(v) is str:
                        self._str(v)
                    elif type(v) is list:
                        self._line_fixed += len(v)
                    elif type(v) is dict:
                        self._content([v])

    # -- result --------------------------------------------------------------------

    def finish(self) -> Estimate:
        """The estimate of everything added so far."""
        per_byte = self._tokens_per_byte()
        inputs = [f + round(t * per_byte) for f, t in zip(self._fixed, self._text, strict=True)]
        lows = [min(o, round(i * self._ratio)) for i, o in zip(inputs, self._out, strict=True)]
        method = self._method
        if self._count is not None and self._sampled:
            method = f"{self._method}, {self._sampled:,} of {self.requests:,} lines tokenized"
        price = self._price
        low: int | Unknown
        high: int | Unknown
        if self._unpriced is not None:
            low = high = Unknown(self._unpriced)
        elif isinstance(price, Unknown):
            low = high = price
        else:
            low = high = 0
            for tier, (i, lo, hi) in enumerate(zip(inputs, lows, self._out, strict=True)):
                rates = price.rates[tier]
                low += i * rates.input + lo * rates.output
                high += i * rates.input + hi * rates.output
            low, high = round_amount(low), round_amount(high)
        return Estimate(
            requests=self.requests,
            input_tokens=sum(inputs),
            output_low=sum(lows),
            output_high=sum(self._out),
            cost_low=low,
            cost_high=high,
            method=method,
            price_source=price.source if isinstance(price, Price) else "",
            unbounded=self.unbounded,
            images=self.images,
        )


def configured(cfg: EstimateConfig, price_of: Callable[[str], Price | Unknown]) -> Estimator:
    """The estimator of one job as [estimate] configures it (daemon and CLI alike)."""
    return Estimator(
        price_of,
        output_ratio=cfg.output_ratio,
        default_max_output_tokens=cfg.default_max_output_tokens,
        tokenizer=cfg.tokenizer,
    )
