-- Names actually used, duplicates and retries, progress, due-work indexes, retention
-- (see 0004 of SQLite; a PostgreSQL store starts at this batchd, so there are no older
-- rows to carry over).
ALTER TABLE jobs ADD COLUMN stem TEXT COLLATE "C";
CREATE UNIQUE INDEX jobs_name ON jobs(name);
CREATE INDEX jobs_stem ON jobs(stem, created_at);

ALTER TABLE jobs ADD COLUMN retry_of TEXT COLLATE "C";
CREATE INDEX jobs_retry_of ON jobs(retry_of, created_at) WHERE retry_of IS NOT NULL;
CREATE UNIQUE INDEX jobs_one_retry ON jobs(retry_of)
    WHERE retry_of IS NOT NULL AND state NOT IN ('failed', 'cancelled');
ALTER TABLE jobs ADD COLUMN allow_duplicate INTEGER NOT NULL DEFAULT 0;
CREATE INDEX jobs_sha256 ON jobs(sha256, created_at) WHERE sha256 IS NOT NULL;
ALTER TABLE jobs ADD COLUMN results_deleted_at DOUBLE PRECISION;
ALTER TABLE jobs ADD COLUMN input_fp TEXT COLLATE "C";

DROP INDEX jobs_state;
CREATE INDEX jobs_state ON jobs(state, created_at, id);
CREATE INDEX jobs_created ON jobs(created_at, id);
CREATE INDEX jobs_finished ON jobs(finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX jobs_failing ON jobs(created_at) WHERE reason IS NOT NULL AND finished_at IS NULL;
CREATE INDEX jobs_cancelling ON jobs(created_at)
    WHERE cancel_requested = 1 AND finished_at IS NULL;
CREATE INDEX jobs_result_dir ON jobs(result_dir) WHERE result_dir IS NOT NULL;
CREATE INDEX jobs_results_kept ON jobs(finished_at)
    WHERE result_dir IS NOT NULL AND results_deleted_at IS NULL;

ALTER TABLE attempts ADD COLUMN completed BIGINT NOT NULL DEFAULT 0;
ALTER TABLE attempts ADD COLUMN failed BIGINT NOT NULL DEFAULT 0;
ALTER TABLE attempts ADD COLUMN total BIGINT NOT NULL DEFAULT 0;
ALTER TABLE attempts ADD COLUMN batch_created_at DOUBLE PRECISION;
-- Where an attempt is, derived (STORED: PostgreSQL has no virtual generated columns).
ALTER TABLE attempts ADD COLUMN phase TEXT COLLATE "C" GENERATED ALWAYS AS (
    CASE
        WHEN collected = 1 OR abandoned = 1 THEN 'settled'
        WHEN batch_id IS NULL THEN 'pending'
        WHEN status IN ('failed', 'completed', 'expired', 'cancelled') THEN 'ended'
        ELSE 'live'
    END
) STORED;
CREATE INDEX attempts_pending ON attempts(not_before, created_at) WHERE phase = 'pending';
CREATE INDEX attempts_live ON attempts(model) WHERE phase = 'live';
CREATE INDEX attempts_ended ON attempts(updated_at) WHERE phase = 'ended';

-- Jobs per state, kept exact by a trigger: a gauge costs one small read, not a scan.
CREATE TABLE job_counts (state TEXT COLLATE "C" PRIMARY KEY, n BIGINT NOT NULL);
CREATE FUNCTION batchd_job_counts() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        UPDATE job_counts SET n = n - 1 WHERE state = OLD.state;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        INSERT INTO job_counts (state, n) VALUES (NEW.state, 1)
            ON CONFLICT (state) DO UPDATE SET n = job_counts.n + 1;
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER jobs_count_insert AFTER INSERT ON jobs
    FOR EACH ROW EXECUTE FUNCTION batchd_job_counts();
CREATE TRIGGER jobs_count_update AFTER UPDATE OF state ON jobs
    FOR EACH ROW WHEN (OLD.state <> NEW.state) EXECUTE FUNCTION batchd_job_counts();
CREATE TRIGGER jobs_count_delete AFTER DELETE ON jobs
    FOR EACH ROW EXECUTE FUNCTION batchd_job_counts();

CREATE TABLE settings (
    key TEXT COLLATE "C" PRIMARY KEY,
    value TEXT NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL
);

CREATE TABLE remote_files (
    file_id TEXT COLLATE "C" PRIMARY KEY,
    job_id TEXT COLLATE "C" NOT NULL,
    kind TEXT COLLATE "C" NOT NULL,
    due_at DOUBLE PRECISION NOT NULL,
    tries INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX remote_files_due ON remote_files(due_at);
