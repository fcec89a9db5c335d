"""Configuration: TOML plus environment into frozen dataclasses; every error names the key."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import math
import os
import re
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchd.jobmeta import API_MAX_PAIRS, BATCHD_PAIRS

if TYPE_CHECKING:
    from batchd.provider_config import ProviderConfig

DEFAULT_BASE_URL = "https://api.openai.com/v1"


class ConfigError(Exception):
    """A configuration problem; the message names the offending key."""


@dataclass(frozen=True)
class ApiConfig:
    base_url: str = DEFAULT_BASE_URL
    api_key_env: str = "OPENAI_API_KEY"
    api_key_file: Path | None = None
    organization: str | None = None
    project: str | None = None
    request_timeout_seconds: float = 60.0
    max_retries: int = 6
    # None: the environment decides (HTTPS_PROXY/HTTP_PROXY/ALL_PROXY, NO_PROXY), as the
    # SDK and curl do; "" = connect directly; else the proxy URL for every API call.
    proxy: str | None = None
    ca_file: Path | None = None  # trusted besides the system's CAs (and $SSL_CERT_FILE)
    client_cert_file: Path | None = None  # for a gateway that wants mutual TLS
    client_key_file: Path | None = None  # never logged; default: in client_cert_file
    credential: str = "openai_api_key"  # the systemd credential holding the key

    def api_key(self) -> str | None:
        """Return the API key from the key file, $CREDENTIALS_DIRECTORY, or the environment."""
        if self.api_key_file is not None:
            return self.api_key_file.read_text(encoding="utf-8").strip() or None
        creds = os.environ.get("CREDENTIALS_DIRECTORY")
        if creds and (Path(creds) / self.credential).is_file():
            return (Path(creds) / self.credential).read_text(encoding="utf-8").strip() or None
        return os.environ.get(self.api_key_env) or None


@dataclass(frozen=True)
class SpoolConfig:
    dir: Path = Path("spool")


@dataclass(frozen=True)
class StateConfig:
    database: Path = Path("batchd.db")
    # `[state] database = "postgresql://..."`: the PostgreSQL store several replicas
    # share (the password from $PGPASSWORD or ~/.pgpass, never from this file's text).
    url: str | None = None

    @property
    def target(self) -> Path | str:
        """What Store.open() takes: the PostgreSQL URL, else the SQLite file."""
        return self.url if self.url is not None else self.database


@dataclass(frozen=True)
class ReplicasConfig:
    """[replicas]: several daemons on one PostgreSQL store and one shared spool."""

    lease_seconds: float = 30.0  # a claim on an item runs out this long after its last renewal
    role_lease_seconds: float = (
        5.0  # the tracker's role: taken over this soon after its holder dies
    )
    adopt_after_seconds: float = 60.0  # a claimed file still without a job is adopted after this


@dataclass(frozen=True)
class BatchConfig:
    completion_window: str = "24h"
    metadata: Mapping[str, str] = field(default_factory=dict)
    output_expires_after_seconds: int | None = None
    poll_interval_seconds: float = 30.0
    max_concurrent_submits: int = 4


DEFAULT_MAX_UPLOAD_BYTES = 210 * 1024 * 1024  # above the API's 200 MB, so jsonl reports it
HTTP_TOKEN_ENV = "BATCHD_HTTP_TOKEN"
WEBHOOK_SECRET_ENV = "OPENAI_WEBHOOK_SECRET"


def _read_secret(path: Path | None, key: str, env_name: str, env: Mapping[str, str]) -> str | None:
    """A secret from `path` (stripped) or else the environment; None when neither is set."""
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{key}: cannot read {path}: {e}") from None
        if not text:
            raise ConfigError(f"{key}: {path} is empty")
        return text
    return env.get(env_name, "").strip() or None


@dataclass(frozen=True)
class HttpConfig:
    listen: str = "127.0.0.1:9464"
    token_file: Path | None = None
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES

    def token(self, env: Mapping[str, str] | None = None) -> str | None:
        """Bearer token of the HTTP queue (`token_file`, else $BATCHD_HTTP_TOKEN); None = off."""
        env = os.environ if env is None else env
        return _read_secret(self.token_file, "[http] token_file", HTTP_TOKEN_ENV, env)

    @property
    def host(self) -> str:
        """Host part of `listen`."""
        return self.listen.rpartition(":")[0].strip("[]") or "127.0.0.1"

    @property
    def port(self) -> int:
        """Port part of `listen`."""
        return int(self.listen.rpartition(":")[2])


@dataclass(frozen=True)
class WebhooksConfig:
    """[webhooks]: verify OpenAI's Standard Webhooks deliveries; poll slower meanwhile."""

    secret_file: Path | None = None
    poll_interval_seconds: float = 300.0

    def secret(self, env: Mapping[str, str] | None = None) -> bytes | None:
        """The HMAC key (base64 after `whsec_`) from `secret_file` or $OPENAI_WEBHOOK_SECRET."""
        env = os.environ if env is None else env
        key = "[webhooks] secret_file" if self.secret_file else WEBHOOK_SECRET_ENV
        text = _read_secret(self.secret_file, key, WEBHOOK_SECRET_ENV, env)
        if text is None:
            return None
        return _whsec(text, key)


def _whsec(text: str, what: str) -> bytes:
    """A Standard Webhooks signing secret (`whsec_` + base64) as its HMAC key bytes."""
    b64 = text.removeprefix("whsec_")
    try:
        raw = base64.b64decode(b64 + "=" * (-len(b64) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{what}: expected whsec_<base64>, got a malformed secret") from None
    if not raw:
        raise ConfigError(f"{what}: the secret is empty")
    return raw


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    format: str = "auto"  # "json" | "console" | "auto" (console on a TTY, JSON otherwise)


@dataclass(frozen=True)
class LimitsConfig:
    """[limits]: what one batch may hold; bigger jobs are split into pieces."""

    max_requests_per_batch: int = 50_000
    max_bytes_per_batch: int = 200_000_000
    max_embedding_inputs_per_batch: int = 50_000


@dataclass(frozen=True)
class UploadConfig:
    """[upload]: when to use the Uploads API (parts) instead of one multipart request."""

    # Above the largest batch input (200 MB), so by default every piece goes in one
    # request: over a fast link the Uploads API's parts and server-side assembly cost
    # ~50 % more time for a 190 MB file (bench/big_submit.py); lower it for a flaky link.
    uploads_api_threshold_bytes: int = 200 * 1024 * 1024
    part_bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True)
class RetryConfig:
    """[retry]: follow-up attempts for expired or retryable failed requests."""

    max_attempts_per_piece: int = 3


@dataclass(frozen=True)
class AdmissionConfig:
    """[admission]: per-model enqueued-token budgets (learned ones are added at run time)."""

    token_budgets: Mapping[str, int] = field(default_factory=dict)
    # Enqueued-request limit per model (OpenAI caps e.g. embeddings at 1,000,000).
    request_limits: Mapping[str, int] = field(default_factory=dict)
    refusal_backoff_seconds: float = 30.0
    max_refusal_backoff_seconds: float = 1800.0


@dataclass(frozen=True)
class OutputConfig:
    """[output]: `order = "api"` keeps the API's order; "input" sorts by input line."""

    order: str = "api"


@dataclass(frozen=True)
class IntakeConfig:
    """[intake]: when a file written in place counts as complete; duplicate drops."""

    # A file still open for writing is never taken; one that was not renamed into
    # inbox/ is taken only after this long without a change (writers that pause).
    settle_seconds: float = 1.0
    # The same content (SHA-256) dropped again within this window is held in
    # failed/NAME/ as duplicate_of JOB (0 = never).
    duplicate_window_seconds: float = 7 * 86400.0


@dataclass(frozen=True)
class RetentionConfig:
    """[retention]: what is deleted, when; applied in small bounded steps."""

    # Delete the provider's copies: an input file once its batch ended, output and
    # error files once they are verified and fsynced on disk.
    delete_remote_files: bool = True
    # Delete finished jobs' rows (and their events) after this many days (0 = keep).
    jobs_days: float = 180.0
    # Delete done/NAME and failed/NAME directories after this many days (0 = keep).
    results_days: float = 0.0


@dataclass(frozen=True)
class DaemonConfig:
    """[daemon]: process behaviour."""

    # At SIGTERM, work in flight (an upload, a create, a download) gets this long to
    # finish before it is cancelled (it is picked up again at the next start).
    shutdown_grace_seconds: float = 10.0


@dataclass(frozen=True)
class PriceOverride:
    """One [prices."MODEL"] entry: USD per million tokens, or `same_as` another model's price.

    `batch` says whether the rates are already batch prices (true) or synchronous list
    prices that still get the provider's batch discount (false).
    """

    input_per_mtok: Decimal | None = None
    output_per_mtok: Decimal | None = None
    cached_input_per_mtok: Decimal | None = None
    batch: bool = False
    same_as: str | None = None


@dataclass(frozen=True)
class EstimateConfig:
    """[estimate]: how the output side of a job's cost estimate is bounded."""

    output_ratio: float = 0.0
    default_max_output_tokens: int = 16_384
    # Tokenize a sample of each job's lines (bpe-openai, the `tokens` extra) instead of
    # UTF-8 bytes / 4 alone: closer input counts, but each encoding loaded costs the
    # process ~70-100 MB of memory and ~1 s at first use, so it is off by default.
    tokenizer: bool = False


NANOS_PER_USD = 1_000_000_000


@dataclass(frozen=True)
class Limit:
    """Spending limits of one scope, in nano-dollars; None = no limit for that period."""

    daily: int | None = None
    monthly: int | None = None


@dataclass(frozen=True)
class BudgetConfig:
    """[budget]: per day / per month limits, globally, per model and per source."""

    timezone: str = "UTC"
    unknown_price: str = "wait"  # "wait" | "admit": a job whose price is unknown
    total: Limit = field(default_factory=Limit)
    models: Mapping[str, Limit] = field(default_factory=dict)  # "*" = every other model
    sources: Mapping[str, Limit] = field(default_factory=dict)  # "*" = every other source

    @property
    def enabled(self) -> bool:
        """True when any limit is configured."""
        limits = [self.total, *self.models.values(), *self.sources.values()]
        return any(lim.daily is not None or lim.monthly is not None for lim in limits)


SOURCE_KINDS = ("redis_stream", "amqp")
# Job sources batchd names itself: a queue source may not take one of these names.
RESERVED_SOURCES = frozenset({"inbox", "http", "retry"})


@dataclass(frozen=True)
class SourceConfig:
    """One [sources.NAME]: a Redis stream or an AMQP queue batchd consumes jobs from."""

    name: str
    kind: str  # "redis_stream" | "amqp"
    url: str  # may hold a password: log only redact_url(url)
    stream: str = ""  # redis_stream: the stream read through `group`
    queue: str = ""  # amqp: the queue consumed
    group: str = "batchd"  # redis_stream: the consumer group
    consumer: str = ""  # redis_stream: this daemon's consumer name ("" = host + spool)
    results: str = ""  # stream (redis) or exchange (amqp) outcomes are published to
    dead_letter: str = ""  # where invalid messages are copied ("" = derived, see below)
    provider: str | None = None  # the configured provider its jobs go to (None: [api])
    max_pending_jobs: int = 100  # stop reading while this many jobs of the source live
    claim_idle_seconds: float = 300.0  # redis: take a dead consumer's pending after this
    prefetch: int = 16  # messages read at once (XREADGROUP COUNT / AMQP prefetch)
    maxlen: int = 100_000  # redis: approximate cap of the results/dead-letter streams
    password_file: Path | None = None  # the broker password, instead of one in the URL
    path_root: Path | None = None  # a message's `path` must lie under it (None = any)

    @property
    def dead_letter_name(self) -> str:
        """The dead-letter stream (redis) or exchange (amqp) actually used."""
        if self.dead_letter:
            return self.dead_letter
        return f"{self.stream}:dead" if self.kind == "redis_stream" else f"{self.queue}.dead"

    def password(self) -> str | None:
        """The password from `password_file` (None when not configured)."""
        if self.password_file is None:
            return None
        return _read_secret(self.password_file, self.key("password_file"), "", {})

    def key(self, key: str) -> str:
        """How a key of this section is named in messages."""
        return f"[sources.{self.name}] {key}"


TENANT_NAME_RE = r"[A-Za-z0-9_-]{1,64}"


@dataclass(frozen=True)
class TenantConfig:
    """One [facade.tenants.NAME]: the tenant's API key (a file, or its SHA-256), and where
    its batch events are posted (optional)."""

    name: str
    key_file: Path | None = None
    key_sha256: str | None = None  # hex digest of the key (the key itself is never stored)
    webhook_url: str | None = None
    webhook_secret_file: Path | None = None
    webhook_secret: str | None = field(default=None, repr=False)  # prefer webhook_secret_file

    def key_digest(self) -> bytes:
        """SHA-256 of the tenant's API key (reads `key_file`); raises ConfigError."""
        where = f"[facade.tenants.{self.name}]"
        if self.key_sha256 is not None:
            return bytes.fromhex(self.key_sha256)
        assert self.key_file is not None
        key = _read_secret(self.key_file, f"{where} key_file", "", {})
        assert key is not None
        import hashlib  # here: loading OpenSSL's hashes slows every CLI command's start

        return hashlib.sha256(key.encode()).digest()

    def webhook_key(self) -> bytes | None:
        """The HMAC key of the tenant's webhook secret (`whsec_<base64>`), or None."""
        where = f"[facade.tenants.{self.name}]"
        if self.webhook_secret_file is not None:
            text = _read_secret(self.webhook_secret_file, f"{where} webhook_secret_file", "", {})
        else:
            text = self.webhook_secret
        if text is None:
            return None
        return _whsec(text, f"{where} webhook secret")


@dataclass(frozen=True)
class FacadeConfig:
    """[facade]: the OpenAI-compatible Files/Batches API, served on [http] listen as soon as
    one tenant is configured."""

    tenants: Mapping[str, TenantConfig] = field(default_factory=dict)
    # An identical create (same input file, endpoint, window, metadata) within this long
    # returns the batch already made: the SDK retries a create on timeouts and 5xx.
    dedupe_window_seconds: float = 600.0
    max_file_bytes: int = 512 * 1024 * 1024  # one POST /v1/files (OpenAI's cap)
    max_upload_bytes: int = 8 * 1024 * 1024 * 1024  # one Uploads API upload (OpenAI's cap)


@dataclass(frozen=True)
class Config:
    api: ApiConfig = field(default_factory=ApiConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    state: StateConfig = field(default_factory=StateConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    webhooks: WebhooksConfig = field(default_factory=WebhooksConfig)
    log: LogConfig = field(default_factory=LogConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    upload: UploadConfig = field(default_factory=UploadConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    intake: IntakeConfig = field(default_factory=IntakeConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    replicas: ReplicasConfig = field(default_factory=ReplicasConfig)
    prices: Mapping[str, PriceOverride] = field(default_factory=dict)
    estimate: EstimateConfig = field(default_factory=EstimateConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    sources: Mapping[str, SourceConfig] = field(default_factory=dict)
    facade: FacadeConfig = field(default_factory=FacadeConfig)
    source: Path | None = None
    # [providers.NAME] tables (batchd/provider_config.py); [api] is the provider "openai".
    providers: Mapping[str, ProviderConfig] = field(default_factory=dict)

    def provider_configs(self) -> dict[str, ProviderConfig]:
        """Every provider by NAME, the default ([api], named "openai") first."""
        from batchd.provider_config import default_provider

        first = default_provider(
            self.api,
            self.limits,
            self.upload,
            self.batch.completion_window,
            self.batch.output_expires_after_seconds,
        )
        return {first.name: first, **self.providers}


_LEVELS = ("debug", "info", "warning", "error", "critical")
_SECTIONS = {
    "api": {
        "base_url",
        "api_key_env",
        "api_key_file",
        "organization",
        "project",
        "request_timeout_seconds",
        "max_retries",
        "proxy",
        "ca_file",
        "client_cert_file",
        "client_key_file",
    },
    "spool": {"dir"},
    "state": {"database"},
    "batch": {
        "completion_window",
        "metadata",
        "output_expires_after_seconds",
        "poll_interval_seconds",
        "max_concurrent_submits",
    },
    "http": {"listen", "token_file", "max_upload_bytes"},
    "webhooks": {"secret_file", "poll_interval_seconds"},
    "log": {"level", "format"},
    "limits": {"max_requests_per_batch", "max_bytes_per_batch", "max_embedding_inputs_per_batch"},
    "upload": {"uploads_api_threshold_bytes", "part_bytes"},
    "retry": {"max_attempts_per_piece"},
    "admission": {
        "token_budgets",
        "request_limits",
        "refusal_backoff_seconds",
        "max_refusal_backoff_seconds",
    },
    "output": {"order"},
    "intake": {"settle_seconds", "duplicate_window"},
    "retention": {"delete_remote_files", "jobs_days", "results_days"},
    "daemon": {"shutdown_grace_seconds"},
    "replicas": {"lease_seconds", "role_lease_seconds", "adopt_after_seconds"},
    "prices": set(),  # keys are model names (see _FREE_KEYS)
    "estimate": {"output_ratio", "default_max_output_tokens", "tokenizer"},
    "budget": {"timezone", "unknown_price", "daily_usd", "monthly_usd", "models", "sources"},
    "providers": set(),  # keys are provider NAMEs (see _FREE_KEYS)
    # Keys of each [sources.NAME] table (the section's own keys are source names).
    "sources": {
        "kind",
        "url",
        "stream",
        "queue",
        "group",
        "consumer",
        "results",
        "dead_letter",
        "provider",
        "max_pending_jobs",
        "claim_idle_seconds",
        "prefetch",
        "maxlen",
        "password_file",
        "path_root",
    },
    "facade": {"tenants", "dedupe_window", "max_file_bytes", "max_upload_bytes"},
}
# Keys SIGHUP applies to a running daemon; any other change needs a restart.
RELOADABLE = frozenset(
    {
        "log.level",
        "log.format",
        "batch.poll_interval_seconds",
        "batch.metadata",
        "api.api_key_env",
        "api.api_key_file",
        "intake.settle_seconds",
        "intake.duplicate_window",
        "retention.delete_remote_files",
        "retention.jobs_days",
        "retention.results_days",
        "admission.token_budgets",
        "webhooks.poll_interval_seconds",
        # cost: prices, estimates and budgets apply to the next decision
        "admission.request_limits",
        "prices",
        "estimate.output_ratio",
        "estimate.default_max_output_tokens",
        "estimate.tokenizer",
        "budget.timezone",
        "budget.unknown_price",
        "budget.total",
        "budget.models",
        "budget.sources",
    }
)
# Sections whose keys are names chosen by the user; their parsers check the inner tables.
_FREE_KEYS = {"prices", "providers", "sources"}
_PRICE_KEYS = {"input_per_mtok", "output_per_mtok", "cached_input_per_mtok", "batch", "same_as"}
_LIMIT_KEYS = {"daily_usd", "monthly_usd"}
_TENANT_KEYS = {"key_file", "key_sha256", "webhook_url", "webhook_secret_file", "webhook_secret"}


def _get(table: Mapping[str, Any], section: str, key: str, kind: type, default: Any) -> Any:
    if key not in table:
        return default
    value = table[key]
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ConfigError(f"[{section}] {key}: expected {kind.__name__}, got {value!r}")
    return value


def _positive(section: str, key: str, value: float) -> float:
    if value <= 0:
        raise ConfigError(f"[{section}] {key}: must be > 0, got {value!r}")
    return value


def _path(base: Path, value: str | None) -> Path | None:
    if value is None:
        return None
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def _check_keys(data: Mapping[str, Any]) -> None:
    for section, table in data.items():
        if section not in _SECTIONS:
            raise ConfigError(f"[{section}]: unknown section (known: {', '.join(_SECTIONS)})")
        if not isinstance(table, dict):
            raise ConfigError(f"[{section}]: must be a table")
        if section in _FREE_KEYS:
            continue
        for key in table:
            if key not in _SECTIONS[section]:
                raise ConfigError(f"[{section}] {key}: unknown key")


def _api(t: Mapping[str, Any], base: Path, env: Mapping[str, str]) -> ApiConfig:
    s = "api"
    url = env.get("OPENAI_BASE_URL") or _get(t, s, "base_url", str, DEFAULT_BASE_URL)
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"[api] base_url: must start with http:// or https://, got {url!r}")
    return ApiConfig(
        base_url=url.rstrip("/"),
        api_key_env=_get(t, s, "api_key_env", str, "OPENAI_API_KEY"),
        api_key_file=_path(base, _get(t, s, "api_key_file", str, None)),
        organization=env.get("OPENAI_ORG_ID") or _get(t, s, "organization", str, None),
        project=env.get("OPENAI_PROJECT_ID") or _get(t, s, "project", str, None),
        request_timeout_seconds=_positive(
            s, "request_timeout_seconds", _get(t, s, "request_timeout_seconds", float, 60.0)
        ),
        max_retries=int(_positive(s, "max_retries", _get(t, s, "max_retries", int, 6))),
        **_tls_and_proxy(t, base),
    )


def redact_url(url: str) -> str:
    """`url` with any password in it replaced by `***` (proxy URLs may carry one)."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    userinfo, at, host = netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}{sep}{userinfo.split(':', 1)[0]}:***@{host}{slash}{path}"


def _tls_and_proxy(t: Mapping[str, Any], base: Path, section: str = "api") -> dict[str, Any]:
    """[api] proxy, ca_file, client_cert_file, client_key_file (files must be readable)."""
    proxy = _get(t, section, "proxy", str, None)
    if proxy:
        if not proxy.startswith(("http://", "https://")):
            raise ConfigError(
                f"[{section}] proxy: must start with http:// or https://, got {redact_url(proxy)!r}"
            )
        if not proxy.split("://", 1)[1].split("/", 1)[0]:
            raise ConfigError(f"[{section}] proxy: no host in the URL")
    out: dict[str, Any] = {"proxy": proxy}
    for key in ("ca_file", "client_cert_file", "client_key_file"):
        path = _path(base, _get(t, section, key, str, None))
        if path is not None and not os.access(path, os.R_OK):
            raise ConfigError(f"[{section}] {key}: cannot read {path}")
        out[key] = path
    if out["client_key_file"] is not None and out["client_cert_file"] is None:
        raise ConfigError(f"[{section}] client_key_file: needs [{section}] client_cert_file")
    _check_tls_files(out["ca_file"], out["client_cert_file"], out["client_key_file"], section)
    return out


def _check_tls_files(
    ca: Path | None, cert: Path | None, key: Path | None, section: str = "api"
) -> None:
    """Load the CA and client certificate once, so a bad file stops start-up by name."""
    if ca is None and cert is None:
        return
    import ssl  # only when TLS files are configured: the CLI starts quicker without it

    ctx = ssl.create_default_context()
    if ca is not None:
        try:
            ctx.load_verify_locations(cafile=str(ca))
        except (ssl.SSLError, OSError, ValueError) as e:
            raise ConfigError(f"[{section}] ca_file: {ca} is not a PEM CA bundle ({e})") from None
    if cert is not None:
        try:
            ctx.load_cert_chain(str(cert), str(key) if key else None, password=_no_password)
        except (ssl.SSLError, OSError, ValueError) as e:  # the message never holds the key
            raise ConfigError(
                f"[{section}] client_cert_file: cannot load {cert}"
                + (f" with {key}" if key else "")
                + f" ({getattr(e, 'reason', None) or e})"
            ) from None


def _no_password() -> str:
    raise ValueError("the key is encrypted: give an unencrypted PEM key")


def _batch(t: Mapping[str, Any]) -> BatchConfig:
    s = "batch"
    window = _get(t, s, "completion_window", str, "24h")
    if window != "24h":
        raise ConfigError(f'[batch] completion_window: only "24h" is supported, got {window!r}')
    meta = _get(t, s, "metadata", dict, {})
    room = API_MAX_PAIRS - BATCHD_PAIRS
    if len(meta) > room:
        raise ConfigError(
            f"[batch] metadata: at most {room} pairs (the API takes {API_MAX_PAIRS};"
            f" batchd adds {BATCHD_PAIRS} of its own), got {len(meta)}"
        )
    for k, v in meta.items():
        if not isinstance(v, str) or len(k) > 64 or len(v) > 512:
            raise ConfigError(
                f"[batch] metadata.{k}: keys ≤ 64 chars, values strings ≤ 512 chars, got {v!r}"
            )
    expires = _get(t, s, "output_expires_after_seconds", int, None)
    if expires is not None and not 3600 <= expires <= 2_592_000:
        raise ConfigError(
            f"[batch] output_expires_after_seconds: must be 3600..2592000, got {expires}"
        )
    return BatchConfig(
        completion_window=window,
        metadata=dict(meta),
        output_expires_after_seconds=expires,
        poll_interval_seconds=_positive(
            s, "poll_interval_seconds", _get(t, s, "poll_interval_seconds", float, 30.0)
        ),
        max_concurrent_submits=int(
            _positive(s, "max_concurrent_submits", _get(t, s, "max_concurrent_submits", int, 4))
        ),
    )


def _http(t: Mapping[str, Any], base: Path) -> HttpConfig:
    listen = _get(t, "http", "listen", str, "127.0.0.1:9464")
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f'[http] listen: expected "HOST:PORT", got {listen!r}')
    max_upload = _get(t, "http", "max_upload_bytes", int, DEFAULT_MAX_UPLOAD_BYTES)
    return HttpConfig(
        listen=listen,
        token_file=_path(base, _get(t, "http", "token_file", str, None)),
        max_upload_bytes=int(_positive("http", "max_upload_bytes", max_upload)),
    )


def _webhooks(t: Mapping[str, Any], base: Path) -> WebhooksConfig:
    s = "webhooks"
    return WebhooksConfig(
        secret_file=_path(base, _get(t, s, "secret_file", str, None)),
        poll_interval_seconds=_positive(
            s, "poll_interval_seconds", _get(t, s, "poll_interval_seconds", float, 300.0)
        ),
    )


def _int(t: Mapping[str, Any], section: str, key: str, default: int, lo: int, hi: int) -> int:
    value = int(_get(t, section, key, int, default))
    if not lo <= value <= hi:
        raise ConfigError(f"[{section}] {key}: must be {lo}..{hi}, got {value}")
    return value


def _pieces(data: Mapping[str, Any]) -> dict[str, Any]:
    lim, up = data.get("limits", {}), data.get("upload", {})
    adm, out = data.get("admission", {}), data.get("output", {})
    budgets = _get(adm, "admission", "token_budgets", dict, {})
    request_limits = _get(adm, "admission", "request_limits", dict, {})
    for key, table in (("token_budgets", budgets), ("request_limits", request_limits)):
        for model, n in table.items():
            if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
                raise ConfigError(f"[admission] {key}.{model}: a positive integer, got {n!r}")
    order = _get(out, "output", "order", str, "api")
    if order not in ("api", "input"):
        raise ConfigError(f'[output] order: "api" or "input", got {order!r}')
    mb = 1_000_000
    return {
        "limits": LimitsConfig(
            _int(lim, "limits", "max_requests_per_batch", 50_000, 1, 50_000),
            _int(lim, "limits", "max_bytes_per_batch", 200 * mb, 1024, 200 * mb),
            _int(lim, "limits", "max_embedding_inputs_per_batch", 50_000, 1, 50_000),
        ),
        "upload": UploadConfig(
            _int(up, "upload", "uploads_api_threshold_bytes", 200 << 20, 1, 1 << 40),
            _int(up, "upload", "part_bytes", 64 << 20, 1024, 64 << 20),
        ),
        "retry": RetryConfig(
            _int(data.get("retry", {}), "retry", "max_attempts_per_piece", 3, 1, 100)
        ),
        "admission": AdmissionConfig(
            dict(budgets),
            dict(request_limits),
            _positive(
                "admission",
                "refusal_backoff_seconds",
                _get(adm, "admission", "refusal_backoff_seconds", float, 30.0),
            ),
            _positive(
                "admission",
                "max_refusal_backoff_seconds",
                _get(adm, "admission", "max_refusal_backoff_seconds", float, 1800.0),
            ),
        ),
        "output": OutputConfig(order),
    }


def _duration(t: Mapping[str, Any], section: str, key: str, default: float) -> float:
    """Seconds, given as a number or as `90s`, `30m`, `2h`, `7d`; must be >= 0."""
    if key not in t:
        return default
    v = t[key]
    if isinstance(v, str) and v.isdigit():
        return float(v)
    if isinstance(v, str) and v[:-1].isdigit() and v[-1:] in _SINCE_UNITS:
        return float(int(v[:-1]) * _SINCE_UNITS[v[-1]])
    if isinstance(v, int | float) and not isinstance(v, bool) and v >= 0:
        return float(v)
    raise ConfigError(f"[{section}] {key}: seconds or an age like 90s, 30m, 2h, 7d; got {v!r}")


def _days(t: Mapping[str, Any], section: str, key: str, default: float) -> float:
    v = _get(t, section, key, float, default)
    if v < 0:
        raise ConfigError(f"[{section}] {key}: days >= 0 (0 = keep for ever), got {v!r}")
    return float(v)


def _retention(t: Mapping[str, Any]) -> RetentionConfig:
    jobs = _days(t, "retention", "jobs_days", 180.0)
    results = _days(t, "retention", "results_days", 0.0)
    if jobs and results > jobs:
        raise ConfigError(
            f"[retention] results_days: at most jobs_days ({jobs:g}): a job's row is how "
            f"batchd finds its result dir, got {results:g}"
        )
    return RetentionConfig(
        delete_remote_files=_get(t, "retention", "delete_remote_files", bool, True),
        jobs_days=jobs,
        results_days=results,
    )


def _sections(data: Mapping[str, Any]) -> dict[str, Any]:
    """[intake], [retention], [daemon]."""
    it, rt, dm = data.get("intake", {}), data.get("retention", {}), data.get("daemon", {})
    return {
        "intake": IntakeConfig(
            settle_seconds=_duration(it, "intake", "settle_seconds", 1.0),
            duplicate_window_seconds=_duration(it, "intake", "duplicate_window", 7 * 86400.0),
        ),
        "retention": _retention(rt),
        "daemon": DaemonConfig(
            shutdown_grace_seconds=_duration(dm, "daemon", "shutdown_grace_seconds", 10.0)
        ),
        "replicas": _replicas(data.get("replicas", {})),
    }


def _replicas(t: Mapping[str, Any]) -> ReplicasConfig:
    lease = _duration(t, "replicas", "lease_seconds", ReplicasConfig.lease_seconds)
    role = _duration(t, "replicas", "role_lease_seconds", ReplicasConfig.role_lease_seconds)
    adopt = _duration(t, "replicas", "adopt_after_seconds", ReplicasConfig.adopt_after_seconds)
    for key, v, low in (("lease_seconds", lease, 3.0), ("role_lease_seconds", role, 1.0)):
        if v < low:
            raise ConfigError(f"[replicas] {key}: at least {low:g} seconds, got {v:g}")
    return ReplicasConfig(lease_seconds=lease, role_lease_seconds=role, adopt_after_seconds=adopt)


def changed_keys(old: Config, new: Config) -> list[str]:
    """`section.key` names whose values differ between two configs."""
    out = []
    for f in dataclasses.fields(Config):
        a, b = getattr(old, f.name), getattr(new, f.name)
        if f.name == "providers" and a != b:
            out.append("providers")  # a provider added, removed or changed: restart
        if f.name == "sources" and a != b:
            out += [f"sources.{n}" for n in sorted(set(a) | set(b)) if a.get(n) != b.get(n)]
        if a != b and f.name == "prices":  # a table of models, named as a whole
            out.append(f.name)
        if not dataclasses.is_dataclass(a) or a == b:
            continue
        for g in dataclasses.fields(a):
            if getattr(a, g.name) != getattr(b, g.name):
                out.append(f"{f.name}.{_KEY_NAMES.get(g.name, g.name)}")
    return out


_KEY_NAMES = {
    "duplicate_window_seconds": "duplicate_window",
    "dedupe_window_seconds": "dedupe_window",
}


def _usd(key: str, value: Any, per: str = "") -> Decimal:
    """A non-negative amount of USD from a TOML int or float (floats via their shortest repr)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key}: expected a number of USD{per}, got {value!r}")
    try:
        amount = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    except InvalidOperation:
        raise ConfigError(f"{key}: expected a number of USD{per}, got {value!r}") from None
    if not amount.is_finite() or amount < 0:
        raise ConfigError(f"{key}: must be a finite amount >= 0, got {value!r}")
    return amount


def _price_override(model: str, t: Any) -> PriceOverride:
    key = f'[prices."{model}"]'
    if not isinstance(t, dict):
        raise ConfigError(f"{key}: must be a table (input_per_mtok, output_per_mtok, batch, ...)")
    for k in t:
        if k not in _PRICE_KEYS:
            raise ConfigError(f"{key} {k}: unknown key (known: {', '.join(sorted(_PRICE_KEYS))})")
    if "same_as" in t:
        same = t["same_as"]
        if not isinstance(same, str) or not same or same == model:
            raise ConfigError(f"{key} same_as: the name of another model, got {same!r}")
        if len(t) > 1:
            raise ConfigError(f"{key} same_as: give either same_as or prices, not both")
        return PriceOverride(same_as=same)
    for k in ("input_per_mtok", "output_per_mtok", "batch"):
        if k not in t:
            raise ConfigError(f'{key} {k}: required (or same_as = "OTHER-MODEL")')
    if not isinstance(t["batch"], bool):
        raise ConfigError(
            f"{key} batch: true if these are batch prices already, false if the provider's"
            f" batch discount still applies; got {t['batch']!r}"
        )
    per = " per million tokens"
    cached = t.get("cached_input_per_mtok")
    return PriceOverride(
        input_per_mtok=_usd(f"{key} input_per_mtok", t["input_per_mtok"], per),
        output_per_mtok=_usd(f"{key} output_per_mtok", t["output_per_mtok"], per),
        cached_input_per_mtok=None
        if cached is None
        else _usd(f"{key} cached_input_per_mtok", cached, per),
        batch=t["batch"],
    )


def _prices(t: Mapping[str, Any]) -> dict[str, PriceOverride]:
    return {model: _price_override(model, entry) for model, entry in t.items()}


def _estimate(t: Mapping[str, Any]) -> EstimateConfig:
    s = "estimate"
    ratio = _get(t, s, "output_ratio", float, 0.0)
    if not 0 <= ratio <= 1000:
        raise ConfigError(f"[estimate] output_ratio: must be 0..1000, got {ratio!r}")
    return EstimateConfig(
        output_ratio=ratio,
        default_max_output_tokens=_int(t, s, "default_max_output_tokens", 16_384, 1, 10_000_000),
        tokenizer=_get(t, s, "tokenizer", bool, False),
    )


def _limit(key: str, t: Any, check_keys: bool = True) -> Limit:
    if not isinstance(t, dict):
        raise ConfigError(f"{key}: must be a table like {{ daily_usd = 10, monthly_usd = 200 }}")
    if check_keys:
        for k in t:
            if k not in _LIMIT_KEYS:
                raise ConfigError(f"{key} {k}: unknown key (known: daily_usd, monthly_usd)")
    daily, monthly = t.get("daily_usd"), t.get("monthly_usd")
    return Limit(
        daily=None if daily is None else int(_usd(f"{key} daily_usd", daily) * NANOS_PER_USD),
        monthly=None
        if monthly is None
        else int(_usd(f"{key} monthly_usd", monthly) * NANOS_PER_USD),
    )


def _budget(t: Mapping[str, Any]) -> BudgetConfig:
    s = "budget"
    tz = _get(t, s, "timezone", str, "UTC")
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f'[budget] timezone: an IANA time zone like "UTC", got {tz!r}') from None
    unknown = _get(t, s, "unknown_price", str, "wait")
    if unknown not in ("wait", "admit"):
        raise ConfigError(f'[budget] unknown_price: "wait" or "admit", got {unknown!r}')
    scopes: dict[str, dict[str, Limit]] = {}
    for scope in ("models", "sources"):
        table = _get(t, s, scope, dict, {})
        scopes[scope] = {
            name: _limit(f'[budget.{scope}."{name}"]', entry) for name, entry in table.items()
        }
    return BudgetConfig(
        timezone=tz,
        unknown_price=unknown,
        total=_limit("[budget]", t, check_keys=False),
        models=scopes["models"],
        sources=scopes["sources"],
    )


def _log(t: Mapping[str, Any]) -> LogConfig:
    level = _get(t, "log", "level", str, "info").lower()
    if level not in _LEVELS:
        raise ConfigError(f"[log] level: one of {', '.join(_LEVELS)}, got {level!r}")
    fmt = _get(t, "log", "format", str, "auto")
    if fmt not in ("json", "console", "auto"):
        raise ConfigError(f'[log] format: "json", "console" or "auto", got {fmt!r}')
    return LogConfig(level=level, format=fmt)


_SOURCE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SOURCE_SCHEMES = {
    "redis_stream": ("redis://", "rediss://", "unix://"),
    "amqp": ("amqp://", "amqps://"),
}


def _source(name: str, t: Any, base: Path) -> SourceConfig:
    s = f"sources.{name}"
    if not _SOURCE_NAME.fullmatch(name) or name in RESERVED_SOURCES:
        raise ConfigError(
            f"[{s}]: a source name is 1..64 of A-Z a-z 0-9 _ - and not one of "
            f"{', '.join(sorted(RESERVED_SOURCES))}"
        )
    if not isinstance(t, dict):
        raise ConfigError(f"[{s}]: must be a table (kind, url, ...)")
    for k in t:
        if k not in _SECTIONS["sources"]:
            raise ConfigError(f"[{s}] {k}: unknown key")
    kind = _get(t, s, "kind", str, None)
    if kind not in SOURCE_KINDS:
        raise ConfigError(f'[{s}] kind: "redis_stream" or "amqp", got {kind!r}')
    url = _get(t, s, "url", str, None)
    if not url or not url.startswith(_SOURCE_SCHEMES[kind]):
        shown = redact_url(url) if url else url
        schemes = " or ".join(_SOURCE_SCHEMES[kind])
        raise ConfigError(f"[{s}] url: a {kind} URL starting with {schemes}, got {shown!r}")
    where = "stream" if kind == "redis_stream" else "queue"
    other = "queue" if kind == "redis_stream" else "stream"
    if other in t or (kind == "amqp" and ("group" in t or "consumer" in t)):
        bad = other if other in t else ("group" if "group" in t else "consumer")
        raise ConfigError(f"[{s}] {bad}: not a key of a {kind} source")
    for key in (where, "results"):
        if not _get(t, s, key, str, ""):
            raise ConfigError(f"[{s}] {key}: required (a non-empty string)")
    provider = _get(t, s, "provider", str, None)  # checked against [providers] in parse()
    root = _path(base, _get(t, s, "path_root", str, None))
    password_file = _path(base, _get(t, s, "password_file", str, None))
    cfg = SourceConfig(
        name=name,
        kind=kind,
        url=url,
        stream=_get(t, s, "stream", str, ""),
        queue=_get(t, s, "queue", str, ""),
        group=_get(t, s, "group", str, "batchd") or "batchd",
        consumer=_get(t, s, "consumer", str, ""),
        results=_get(t, s, "results", str, ""),
        dead_letter=_get(t, s, "dead_letter", str, ""),
        provider=provider,
        max_pending_jobs=_int(t, s, "max_pending_jobs", 100, 1, 1_000_000),
        claim_idle_seconds=_positive(
            s, "claim_idle_seconds", _duration(t, s, "claim_idle_seconds", 300.0)
        ),
        prefetch=_int(t, s, "prefetch", 16, 1, 1000),
        maxlen=_int(t, s, "maxlen", 100_000, 0, 1 << 40),
        password_file=password_file,
        path_root=root,
    )
    cfg.password()  # unreadable or empty: a config error now, not a broker error later
    # An outcome or a dead letter read back as a job would make another, for ever.
    for key, value in (("results", cfg.results), ("dead_letter", cfg.dead_letter_name)):
        if value == (cfg.stream or cfg.queue):
            raise ConfigError(f"[{s}] {key}: must differ from the {where} jobs are read from")
    if cfg.results == cfg.dead_letter_name:
        raise ConfigError(f"[{s}] dead_letter: must differ from results")
    return cfg


def _sources(t: Mapping[str, Any], base: Path) -> dict[str, SourceConfig]:
    return {name: _source(name, entry, base) for name, entry in t.items()}


def parse(data: Mapping[str, Any], base: Path, env: Mapping[str, str] | None = None) -> Config:
    """Build a Config from parsed TOML; relative paths resolve against `base`."""
    from batchd.provider_config import parse_providers

    env = os.environ if env is None else env
    _check_keys(data)
    spool = _path(base, _get(data.get("spool", {}), "spool", "dir", str, "spool"))
    state = _state(data.get("state", {}), base)
    assert spool is not None
    cfg = Config(
        api=_api(data.get("api", {}), base, env),
        spool=SpoolConfig(dir=spool),
        state=state,
        batch=_batch(data.get("batch", {})),
        http=_http(data.get("http", {}), base),
        webhooks=_webhooks(data.get("webhooks", {}), base),
        log=_log(data.get("log", {})),
        prices=_prices(data.get("prices", {})),
        estimate=_estimate(data.get("estimate", {})),
        budget=_budget(data.get("budget", {})),
        providers=parse_providers(data.get("providers", {}), base, _pieces(data)["upload"]),
        sources=_sources(data.get("sources", {}), base),
        facade=_facade(data.get("facade", {}), base),
        **_pieces(data),
        **_sections(data),
    )
    names = cfg.provider_configs()
    for name, src in cfg.sources.items():
        if src.provider is not None and src.provider not in names:
            raise ConfigError(
                f"[sources.{name}] provider: a configured provider ({', '.join(names)}), "
                f"got {src.provider!r}"
            )
    return cfg


def _state(t: Mapping[str, Any], base: Path) -> StateConfig:
    value = _get(t, "state", "database", str, "batchd.db")
    if value.startswith(("postgresql://", "postgres://")):
        rest = value.partition("://")[2]
        if "@" in rest and ":" in rest.rpartition("@")[0]:
            raise ConfigError(
                "[state] database: no password in the URL (it would be written in a file "
                "and shown by tools); use $PGPASSWORD or a ~/.pgpass / $PGPASSFILE file"
            )
        return StateConfig(url=value)
    if "://" in value:
        raise ConfigError(
            f"[state] database: a SQLite file path or a postgresql:// URL, got {value!r}"
        )
    db = _path(base, value)
    assert db is not None
    return StateConfig(database=db)


_SINCE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _tenant(name: str, t: Any, base: Path) -> TenantConfig:
    where = f"[facade.tenants.{name}]"
    if not re.fullmatch(TENANT_NAME_RE, name):
        raise ConfigError(f"{where}: a tenant name is 1..64 of A-Z a-z 0-9 _ -")
    if not isinstance(t, dict):
        raise ConfigError(f"{where}: must be a table")
    for key in t:
        if key not in _TENANT_KEYS:
            known = ", ".join(sorted(_TENANT_KEYS))
            raise ConfigError(f"{where} {key}: unknown key (known: {known})")
    key_file = _path(base, _get(t, f"facade.tenants.{name}", "key_file", str, None))
    digest = _get(t, f"facade.tenants.{name}", "key_sha256", str, None)
    if (key_file is None) == (digest is None):
        raise ConfigError(f"{where}: exactly one of key_file or key_sha256")
    if digest is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
        raise ConfigError(f"{where} key_sha256: 64 hex digits (sha256sum of the key)")
    url = _get(t, f"facade.tenants.{name}", "webhook_url", str, None)
    if url is not None and not url.startswith(("http://", "https://")):
        raise ConfigError(f"{where} webhook_url: must start with http:// or https://")
    secret_file = _path(base, _get(t, f"facade.tenants.{name}", "webhook_secret_file", str, None))
    secret = _get(t, f"facade.tenants.{name}", "webhook_secret", str, None)
    if secret_file is not None and secret is not None:
        raise ConfigError(f"{where}: webhook_secret_file or webhook_secret, not both")
    if url is None and (secret_file is not None or secret is not None):
        raise ConfigError(f"{where}: a webhook secret without webhook_url")
    if url is not None and secret_file is None and secret is None:
        raise ConfigError(f"{where}: webhook_url needs webhook_secret_file (whsec_...)")
    return TenantConfig(
        name=name,
        key_file=key_file,
        key_sha256=digest.lower() if digest else None,
        webhook_url=url,
        webhook_secret_file=secret_file,
        webhook_secret=secret,
    )


def _facade(t: Mapping[str, Any], base: Path) -> FacadeConfig:
    tenants = _get(t, "facade", "tenants", dict, {})
    max_file = _get(t, "facade", "max_file_bytes", int, FacadeConfig.max_file_bytes)
    max_upload = _get(t, "facade", "max_upload_bytes", int, FacadeConfig.max_upload_bytes)
    return FacadeConfig(
        tenants={name: _tenant(name, v, base) for name, v in tenants.items()},
        dedupe_window_seconds=_duration(t, "facade", "dedupe_window", 600.0),
        max_file_bytes=int(_positive("facade", "max_file_bytes", max_file)),
        max_upload_bytes=int(_positive("facade", "max_upload_bytes", max_upload)),
    )


def parse_since(text: str, now: float | None = None) -> float:
    """A point in time as unix seconds, for `batchd jobs --since` and `GET /v1/jobs?since=`.

    Accepts an age (`90s`, `30m`, `2h`, `7d` before `now`), epoch seconds, or an
    ISO-8601 time (`Z` or an offset; without one it is UTC). Raises ValueError.
    """
    text = text.strip()
    if text[:-1].isdigit() and text[-1:] in _SINCE_UNITS:
        return (time.time() if now is None else now) - int(text[:-1]) * _SINCE_UNITS[text[-1]]
    try:
        epoch = float(text)
    except ValueError:
        pass
    else:
        if math.isfinite(epoch):
            return epoch
        raise ValueError(f"expected a finite number of epoch seconds, got {text!r}")
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"expected an age (90s, 30m, 2h, 7d), epoch seconds or an ISO-8601 time, got {text!r}"
        ) from None
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()


def load(path: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None) -> Config:
    """Load the TOML file at `path` (or $BATCHD_CONFIG); raise ConfigError naming the key."""
    env = os.environ if env is None else env
    path = path or env.get("BATCHD_CONFIG")
    if not path:
        raise ConfigError("no config file: pass --config FILE or set BATCHD_CONFIG")
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read config: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from None
    cfg = parse(data, p.resolve().parent, env)
    return dataclasses.replace(cfg, source=p)
