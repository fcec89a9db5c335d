"""Every Prometheus metric batchd exports, defined once on the daemon's own registry.

Labels are low-cardinality only: never a job id, batch id or file name.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
)

from batchd import __version__
from batchd.states import BatchStatus, JobState

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_E2E_BUCKETS = (0.05, 0.25, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 24 * 3600, 48 * 3600)


class Metrics:
    """The daemon's metrics; a fresh registry per instance so tests can run many daemons.

    `providers`: the configured provider NAMEs, whose `provider` label values are
    created up front (so a dashboard shows 0, not nothing, for a quiet provider)."""

    def __init__(self, providers: Sequence[str] = ("openai",)) -> None:
        r = self.registry = CollectorRegistry()
        self.build_info = Info("batchd_build", "batchd version", registry=r)
        self.build_info.info({"version": __version__})
        self.jobs = Gauge("batchd_jobs", "Jobs by state", ["state"], registry=r)
        for s in JobState:
            self.jobs.labels(s.value)
        self.jobs_finished = Counter(
            "batchd_jobs_finished",
            "Jobs that reached an end, by outcome and provider",
            ["outcome", "provider"],
            registry=r,
        )
        self.batches_created = Counter(
            "batchd_batches_created",
            "Remote batches created, by provider",
            ["provider"],
            registry=r,
        )
        self.batches = Gauge(
            "batchd_batches", "Tracked batches by remote status", ["status"], registry=r
        )
        for st in BatchStatus:
            self.batches.labels(st.value)
        self.batches_ended = Counter(
            "batchd_batches_ended",
            "Batches seen ending, by final status (batchd's vocabulary) and provider",
            ["status", "provider"],
            registry=r,
        )
        self.requests_completed = Counter(
            "batchd_requests_completed", "Requests that succeeded inside batches", registry=r
        )
        self.requests_failed = Counter(
            "batchd_requests_failed", "Requests that failed inside batches", registry=r
        )
        self.tokens = Counter(
            "batchd_tokens",
            "Tokens reported in batch usage, by kind and provider",
            ["kind", "provider"],
            registry=r,
        )
        self.uploaded_bytes = Counter(
            "batchd_uploaded_bytes", "Bytes of input uploaded", registry=r
        )
        self.downloaded_bytes = Counter(
            "batchd_downloaded_bytes", "Bytes of results downloaded", registry=r
        )
        self.api_requests = Counter(
            "batchd_api_requests",
            "Batch API calls by operation, HTTP status code (0 = no response) and provider",
            ["operation", "code", "provider"],
            registry=r,
        )
        self.api_duration = Histogram(
            "batchd_api_request_duration_seconds",
            "Batch API call latency by operation",
            ["operation"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.retries = Counter("batchd_retries", "Retries by reason", ["reason"], registry=r)
        for reason in (
            "rate_limited",
            "transient",
            "create_unknown",
            "token_limit",
            "request_limit",
            "expired",
            "request_failed",
            "short_download",
        ):
            self.retries.labels(reason)
        self.token_budget = Gauge(
            "batchd_token_budget_tokens",
            "Enqueued-token budget per model (configured or learned from a refusal)",
            ["model"],
            registry=r,
        )
        self.tokens_in_flight = Gauge(
            "batchd_tokens_in_flight",
            "Estimated prompt tokens of batches in flight, per model",
            ["model"],
            registry=r,
        )
        ProcessCollector(registry=r)
        self.drop_to_created = Histogram(
            "batchd_drop_to_created_seconds",
            "Time from a file being claimed to its batch being created",
            buckets=_E2E_BUCKETS,
            registry=r,
        )
        self.created_to_results = Histogram(
            "batchd_created_to_results_seconds",
            "Time from batch creation to results on disk",
            buckets=_E2E_BUCKETS,
            registry=r,
        )
        self.inbox_files = Gauge("batchd_inbox_files", "Files waiting in inbox/", registry=r)
        self.oldest_job_age = Gauge(
            "batchd_oldest_unfinished_job_age_seconds",
            "Age of the oldest job not yet done/failed/cancelled (0 when none)",
            registry=r,
        )
        self.last_poll = Gauge(
            "batchd_last_successful_poll_timestamp_seconds",
            "Unix time of the last poll cycle that reached the API",
            registry=r,
        )
        self.stage_restarts = Counter(
            "batchd_stage_restarts",
            "Stages restarted after an unexpected error (disk full, database locked, ...)",
            ["stage"],
            registry=r,
        )
        for stage in ("intake", "submit", "track", "collect", "retention", "health"):
            self.stage_restarts.labels(stage)
        self.validation_failures = Counter(
            "batchd_validation_failures", "Input files rejected by local validation", registry=r
        )
        self.api_access_denied = Gauge(
            "batchd_api_access_denied",
            "1 while the API refuses access (api_key: missing, wrong or revoked key; "
            "endpoint: [api] base_url is not the API); jobs wait meanwhile",
            ["reason"],
            registry=r,
        )
        for reason in ("api_key", "endpoint"):
            self.api_access_denied.labels(reason)
        self.inbox_ignored = Gauge(
            "batchd_inbox_ignored_files",
            "Entries in inbox/ that will never be taken (wrong suffix, directories)",
            registry=r,
        )
        self.requests_in_flight = Gauge(
            "batchd_requests_in_flight",
            "Requests of batches in flight by progress (request_counts as last polled)",
            ["progress"],
            registry=r,
        )
        for progress in ("completed", "failed", "pending"):
            self.requests_in_flight.labels(progress)
        self.duplicates = Counter(
            "batchd_duplicate_inputs",
            "Inputs held in failed/ because the same content was submitted recently",
            registry=r,
        )
        self.remote_files_deleted = Counter(
            "batchd_remote_files_deleted",
            "Provider copies deleted by retention, by kind (input, output, error, batch)",
            ["kind"],
            registry=r,
        )
        for kind in ("input", "output", "error", "batch"):
            self.remote_files_deleted.labels(kind)
        self.retention_deleted = Counter(
            "batchd_retention_deleted",
            "Local data removed by retention, by what (job rows, result dirs)",
            ["what"],
            registry=r,
        )
        for what in ("jobs", "results"):
            self.retention_deleted.labels(what)
        # Queue sources ([sources.NAME]); the label is the configured source name.
        self.source_up = Gauge(
            "batchd_source_up",
            "1 while the queue source's broker is connected, 0 while it is retried",
            ["source"],
            registry=r,
        )
        self.source_paused = Gauge(
            "batchd_source_paused",
            "1 while the source is not read: it has max_pending_jobs live jobs",
            ["source"],
            registry=r,
        )
        self.source_consumed = Counter(
            "batchd_source_messages_consumed",
            "Messages read from the source (redeliveries included)",
            ["source"],
            registry=r,
        )
        self.source_acked = Counter(
            "batchd_source_messages_acked",
            "Messages acknowledged (their job durably recorded)",
            ["source"],
            registry=r,
        )
        self.source_redelivered = Counter(
            "batchd_source_messages_redelivered",
            "Messages delivered again whose job was already recorded (no second job)",
            ["source"],
            registry=r,
        )
        self.source_dead_lettered = Counter(
            "batchd_source_messages_dead_lettered",
            "Invalid messages copied to the dead-letter stream/exchange (their job failed)",
            ["source"],
            registry=r,
        )
        self.source_published = Counter(
            "batchd_source_outcomes_published",
            "Job outcomes published to the source's results",
            ["source"],
            registry=r,
        )
        # The OpenAI-compatible facade (batchd/facade/); its batches are jobs as well.
        self.facade_batches_ended = Counter(
            "batchd_facade_batches_ended",
            "Facade batches that reached a final status, by status",
            ["status"],
            registry=r,
        )
        for end in ("completed", "failed", "expired", "cancelled"):
            self.facade_batches_ended.labels(end)
        self.facade_deduplicated = Counter(
            "batchd_facade_deduplicated_creates",
            "Batch creates answered with the batch an identical create already made",
            registry=r,
        )
        self.facade_webhooks = Counter(
            "batchd_facade_webhooks",
            "Webhook deliveries to tenants, by outcome (delivered, failed, dropped)",
            ["outcome"],
            registry=r,
        )
        for outcome in ("delivered", "failed", "dropped"):
            self.facade_webhooks.labels(outcome)
        # --- cost ---------------------------------------------------------------------
        self.cost = Counter(
            "batchd_cost_usd",
            "Money in USD by provider, model and job source: kind=estimated is the high "
            "estimate of each job when it is admitted, kind=actual what its results billed",
            ["provider", "model", "source", "kind"],
            registry=r,
        )
        self.cost_unpriced = Counter(
            "batchd_cost_unpriced_requests",
            "Billed requests whose cost is unknown (a model without a price)",
            ["provider", "model"],
            registry=r,
        )
        self.estimate_ratio = Histogram(
            "batchd_cost_estimate_ratio",
            "Per finished job: actual cost / high estimate (above 1: the estimate was low)",
            buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0, 1.1, 1.5, 2.0, 5.0),
            registry=r,
        )
        self.budget_waiting = Gauge(
            "batchd_budget_waiting_jobs",
            "Jobs whose high estimate does not fit what is left of a [budget] limit; they "
            "wait (nothing of them is submitted) for the period to roll over or a raise",
            registry=r,
        )
        self.request_limit = Gauge(
            "batchd_request_limit_requests",
            "Enqueued-request limit per model (configured or learned from a refusal)",
            ["model"],
            registry=r,
        )
        self.enqueued_requests = Gauge(
            "batchd_requests_enqueued",
            "Requests of batches in flight, per model with an enqueued-request limit",
            ["model"],
            registry=r,
        )
        for p in providers:
            self.add_provider(p)
        self._replicas(r)

    def _replicas(self, r: CollectorRegistry) -> None:
        """Replicas sharing a PostgreSQL store (batchd/leases.py); Prometheus's `instance`
        label tells the replicas apart."""
        self.replica_leases = Gauge(
            "batchd_replica_leases",
            "Leases this replica holds, by kind (job, attempt: work under way; role)",
            ["kind"],
            registry=r,
        )
        for kind in ("job", "attempt", "role"):
            self.replica_leases.labels(kind)
        self.replica_role = Gauge(
            "batchd_replica_role",
            "1 while this replica holds the role (tracker, retention, facade, budget)",
            ["role"],
            registry=r,
        )
        for role in ("tracker", "retention", "facade", "budget"):
            self.replica_role.labels(role)
        self.replica_lease_lost = Counter(
            "batchd_replica_leases_lost",
            "Leases this replica found taken over when renewing (it was too slow)",
            registry=r,
        )

    def add_provider(self, name: str) -> None:
        """Create the `provider` label values of one provider (its series start at 0)."""
        for o in ("done", "failed", "cancelled"):
            self.jobs_finished.labels(o, name)
        self.batches_created.labels(name)
        for end in ("completed", "failed", "expired", "cancelled"):
            self.batches_ended.labels(end, name)
        for k in ("input", "cached", "output", "reasoning"):
            self.tokens.labels(k, name)
