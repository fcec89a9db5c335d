-- The OpenAI-compatible facade (see 0005 of SQLite).
CREATE TABLE facade_files (
    id TEXT COLLATE "C" PRIMARY KEY,
    tenant TEXT COLLATE "C" NOT NULL,
    filename TEXT NOT NULL,
    purpose TEXT COLLATE "C" NOT NULL,
    bytes BIGINT NOT NULL,
    path TEXT COLLATE "C" NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION,
    batch_id TEXT COLLATE "C"
);
CREATE INDEX facade_files_tenant ON facade_files(tenant, id);
CREATE INDEX facade_files_expiry ON facade_files(expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX facade_files_batch ON facade_files(batch_id) WHERE batch_id IS NOT NULL;

CREATE TABLE facade_uploads (
    id TEXT COLLATE "C" PRIMARY KEY,
    tenant TEXT COLLATE "C" NOT NULL,
    filename TEXT NOT NULL,
    purpose TEXT COLLATE "C" NOT NULL,
    bytes BIGINT NOT NULL,
    mime_type TEXT NOT NULL,
    file_expires_after DOUBLE PRECISION,
    created_at DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL,
    status TEXT COLLATE "C" NOT NULL,
    file_id TEXT COLLATE "C"
);
CREATE INDEX facade_uploads_pending ON facade_uploads(expires_at) WHERE status = 'pending';
CREATE TABLE facade_upload_parts (
    id TEXT COLLATE "C" PRIMARY KEY,
    upload_id TEXT COLLATE "C" NOT NULL,
    bytes BIGINT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX facade_upload_parts_upload ON facade_upload_parts(upload_id);

CREATE TABLE facade_batches (
    id TEXT COLLATE "C" PRIMARY KEY,
    tenant TEXT COLLATE "C" NOT NULL,
    job_id TEXT COLLATE "C" NOT NULL,
    input_file_id TEXT COLLATE "C" NOT NULL,
    endpoint TEXT COLLATE "C" NOT NULL,
    completion_window TEXT COLLATE "C" NOT NULL,
    metadata TEXT,
    output_expires_after DOUBLE PRECISION,
    dedupe_key TEXT COLLATE "C" NOT NULL,
    idempotency_key TEXT COLLATE "C",
    created_at DOUBLE PRECISION NOT NULL,
    status TEXT COLLATE "C",
    output_file_id TEXT COLLATE "C",
    error_file_id TEXT COLLATE "C",
    final TEXT,
    ended_at DOUBLE PRECISION
);
CREATE INDEX facade_batches_tenant ON facade_batches(tenant, id);
CREATE INDEX facade_batches_dedupe ON facade_batches(tenant, dedupe_key, created_at)
    WHERE idempotency_key IS NULL;
CREATE UNIQUE INDEX facade_batches_key ON facade_batches(tenant, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX facade_batches_live ON facade_batches(created_at) WHERE status IS NULL;
CREATE INDEX facade_batches_ended ON facade_batches(ended_at) WHERE ended_at IS NOT NULL;
CREATE INDEX facade_batches_job ON facade_batches(job_id);

CREATE TABLE facade_events (
    id TEXT COLLATE "C" PRIMARY KEY,
    tenant TEXT COLLATE "C" NOT NULL,
    batch_id TEXT COLLATE "C" NOT NULL,
    type TEXT COLLATE "C" NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    due_at DOUBLE PRECISION NOT NULL,
    tries INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX facade_events_due ON facade_events(due_at);
