-- PostgreSQL's version of migrations/0006_cost.sql (see there for what each column
-- means): the estimate made at intake, what each attempt was charged, budget admission,
-- and enqueued-request limits learned beside the token limits.
ALTER TABLE jobs ADD COLUMN estimate TEXT;
ALTER TABLE jobs ADD COLUMN cost_nanos BIGINT;
ALTER TABLE jobs ADD COLUMN cost_unknown TEXT;
ALTER TABLE jobs ADD COLUMN admitted_at DOUBLE PRECISION;
ALTER TABLE jobs ADD COLUMN reserved_nanos BIGINT;
ALTER TABLE jobs ADD COLUMN budget_wait TEXT;
UPDATE jobs SET admitted_at = updated_at WHERE state NOT IN ('queued', 'validating');
CREATE INDEX jobs_admitted ON jobs(
    admitted_at, model, source, finished_at, cost_nanos, reserved_nanos
) WHERE admitted_at IS NOT NULL;
CREATE INDEX jobs_unadmitted ON jobs(created_at, id)
    WHERE admitted_at IS NULL AND state = 'submitting';

CREATE TABLE charges (
    attempt_id TEXT COLLATE "C" PRIMARY KEY,
    job_id TEXT COLLATE "C" NOT NULL,
    at DOUBLE PRECISION NOT NULL,
    provider TEXT COLLATE "C" NOT NULL,
    model TEXT COLLATE "C" NOT NULL,
    source TEXT COLLATE "C" NOT NULL,
    requests BIGINT NOT NULL,
    input_tokens BIGINT NOT NULL,
    cached_tokens BIGINT NOT NULL,
    cache_write_tokens BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    reasoning_tokens BIGINT NOT NULL,
    cost_nanos BIGINT,
    cost_unknown TEXT
);
CREATE INDEX charges_job ON charges(job_id);
CREATE INDEX charges_at ON charges(at);

-- PostgreSQL can drop NOT NULL in place (SQLite rebuilds the table).
ALTER TABLE model_limits ALTER COLUMN token_limit DROP NOT NULL;
ALTER TABLE model_limits ADD COLUMN request_limit BIGINT;
