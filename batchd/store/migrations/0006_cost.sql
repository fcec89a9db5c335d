-- Cost: the estimate made at intake, what each attempt was charged, budget admission,
-- and enqueued-request limits learned beside the token limits.

-- estimate: estimate.Estimate.as_dict() of the validated input. cost_nanos: the actual
-- cost (nano-dollars) once the job ended, the sum of its charges; cost_unknown says why
-- some of it could not be priced (cost_nanos then sums only what could).
ALTER TABLE jobs ADD COLUMN estimate TEXT;
ALTER TABLE jobs ADD COLUMN cost_nanos INTEGER;
ALTER TABLE jobs ADD COLUMN cost_unknown TEXT;
-- Budgets decide per job, never per attempt: no batch of a job is created before the
-- job is admitted (admitted_at), which reserves its high estimate (reserved_nanos) in
-- the day and month of admitted_at until its actual cost replaces it. budget_wait:
-- why a job not admitted yet waits (NULL while nothing holds it back).
ALTER TABLE jobs ADD COLUMN admitted_at REAL;
ALTER TABLE jobs ADD COLUMN reserved_nanos INTEGER;
ALTER TABLE jobs ADD COLUMN budget_wait TEXT;
-- Jobs validated by an older batchd were submitted without a budget: admitted.
UPDATE jobs SET admitted_at = updated_at WHERE state NOT IN ('queued', 'validating');
-- What the jobs admitted this month hold, read through the index alone.
CREATE INDEX jobs_admitted ON jobs(
    admitted_at, model, source, finished_at, cost_nanos, reserved_nanos
) WHERE admitted_at IS NOT NULL;
-- Submitting jobs that wait for admission (few: the index holds only them).
CREATE INDEX jobs_unadmitted ON jobs(created_at, id)
    WHERE admitted_at IS NULL AND state = 'submitting';

-- What each attempt (one remote batch) was charged: the billed usage of its result
-- lines, each custom_id once. Keyed by attempt and written in the transaction that
-- settles the attempt, so reading its results again after a crash replaces the row
-- and can never add to it.
CREATE TABLE charges (
    attempt_id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    at REAL NOT NULL,  -- when the results were collected
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    source TEXT NOT NULL,
    requests INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL,
    cache_write_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    reasoning_tokens INTEGER NOT NULL,
    cost_nanos INTEGER,  -- NULL: not priced (cost_unknown says why)
    cost_unknown TEXT
);
CREATE INDEX charges_job ON charges(job_id);
CREATE INDEX charges_at ON charges(at);

-- The enqueued-request limit (e.g. 1,000,000 for embeddings) is learned like the token
-- limit; a model may have either, so both columns may be NULL.
CREATE TABLE model_limits_new (
    model TEXT PRIMARY KEY,
    token_limit INTEGER,
    request_limit INTEGER,
    learned_at REAL NOT NULL
);
INSERT INTO model_limits_new (model, token_limit, learned_at)
    SELECT model, token_limit, learned_at FROM model_limits;
DROP TABLE model_limits;
ALTER TABLE model_limits_new RENAME TO model_limits;
