-- The OpenAI-compatible facade: tenants' files, uploads, batches, and webhook deliveries.
-- Ids are opaque, sortable (ULID-based), <= 64 characters; never a provider's id.

-- A file a tenant uploaded (spool/files/ID) or a batch's output/error file (the job's
-- result dir). `path` is spool-relative.
CREATE TABLE facade_files (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    path TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL,
    batch_id TEXT  -- the batch whose output or errors this is
);
CREATE INDEX facade_files_tenant ON facade_files(tenant, id);
CREATE INDEX facade_files_expiry ON facade_files(expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX facade_files_batch ON facade_files(batch_id) WHERE batch_id IS NOT NULL;

-- A multi-part upload in progress (parts under spool/uploads/ID/).
CREATE TABLE facade_uploads (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    mime_type TEXT NOT NULL,
    file_expires_after REAL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    status TEXT NOT NULL,  -- pending | completed | cancelled | expired
    file_id TEXT
);
CREATE INDEX facade_uploads_pending ON facade_uploads(expires_at) WHERE status = 'pending';
CREATE TABLE facade_upload_parts (
    id TEXT PRIMARY KEY,
    upload_id TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX facade_upload_parts_upload ON facade_upload_parts(upload_id);

-- One logical batch = one ordinary job (job_id). Written before the job row exists, so a
-- crash in between is finished at start-up. `status` stays NULL while the job runs; when
-- it has ended, the batch object is frozen in `final` (job rows have their own retention).
CREATE TABLE facade_batches (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    job_id TEXT NOT NULL,
    input_file_id TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    completion_window TEXT NOT NULL,
    metadata TEXT,
    output_expires_after REAL,
    dedupe_key TEXT NOT NULL,
    idempotency_key TEXT,
    created_at REAL NOT NULL,
    status TEXT,
    output_file_id TEXT,
    error_file_id TEXT,
    final TEXT,
    ended_at REAL
);
CREATE INDEX facade_batches_tenant ON facade_batches(tenant, id);
CREATE INDEX facade_batches_dedupe ON facade_batches(tenant, dedupe_key, created_at)
    WHERE idempotency_key IS NULL;
CREATE UNIQUE INDEX facade_batches_key ON facade_batches(tenant, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX facade_batches_live ON facade_batches(created_at) WHERE status IS NULL;
CREATE INDEX facade_batches_ended ON facade_batches(ended_at) WHERE ended_at IS NOT NULL;
CREATE INDEX facade_batches_job ON facade_batches(job_id);

-- Webhook deliveries still owed (level-triggered: a crash re-sends, never forgets).
CREATE TABLE facade_events (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    batch_id TEXT NOT NULL,
    type TEXT NOT NULL,
    created_at REAL NOT NULL,
    due_at REAL NOT NULL,
    tries INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX facade_events_due ON facade_events(due_at);
