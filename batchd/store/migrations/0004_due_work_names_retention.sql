-- Names actually used, duplicates and retries, progress, due-work indexes, retention.

-- `name` is the name actually used (unique: nightly, nightly-2, ...); `stem` is the NAME
-- as dropped. Older rows: the result dir tells the name actually used; any name still
-- shared keeps it on the newest row and gets a suffix on the older ones.
ALTER TABLE jobs ADD COLUMN stem TEXT;
UPDATE jobs SET stem = name;
UPDATE jobs SET name = substr(result_dir, instr(result_dir, '/') + 1) WHERE result_dir IS NOT NULL;
UPDATE jobs SET name = name || '~' || lower(substr(id, -6))
    WHERE rowid NOT IN (SELECT MAX(rowid) FROM jobs GROUP BY name);
CREATE UNIQUE INDEX jobs_name ON jobs(name);
CREATE INDEX jobs_stem ON jobs(stem, created_at);

ALTER TABLE jobs ADD COLUMN retry_of TEXT;
CREATE INDEX jobs_retry_of ON jobs(retry_of, created_at) WHERE retry_of IS NOT NULL;
-- `batchd retry JOB` twice must not pay twice: one retry per job unless it failed.
CREATE UNIQUE INDEX jobs_one_retry ON jobs(retry_of)
    WHERE retry_of IS NOT NULL AND state NOT IN ('failed', 'cancelled');
ALTER TABLE jobs ADD COLUMN allow_duplicate INTEGER NOT NULL DEFAULT 0;
CREATE INDEX jobs_sha256 ON jobs(sha256, created_at) WHERE sha256 IS NOT NULL;
ALTER TABLE jobs ADD COLUMN results_deleted_at REAL;
-- size:mtime_ns:inode of the input as validated: a change after that is noticed
ALTER TABLE jobs ADD COLUMN input_fp TEXT;

-- Every recurring query reads through one of these (live jobs have finished_at NULL).
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

-- request_counts of the batch as last seen (progress while it runs)
ALTER TABLE attempts ADD COLUMN completed INTEGER NOT NULL DEFAULT 0;
ALTER TABLE attempts ADD COLUMN failed INTEGER NOT NULL DEFAULT 0;
ALTER TABLE attempts ADD COLUMN total INTEGER NOT NULL DEFAULT 0;
-- the remote batch's created_at (unix seconds), for paging the list only as far as needed
ALTER TABLE attempts ADD COLUMN batch_created_at REAL;
UPDATE attempts SET batch_created_at = json_extract(batch, '$.created_at') WHERE batch IS NOT NULL;
-- Where an attempt is, derived (never out of step): pending (no batch yet), live,
-- ended (terminal status, results not collected), settled (collected or given up).
ALTER TABLE attempts ADD COLUMN phase TEXT GENERATED ALWAYS AS (
    CASE
        WHEN collected = 1 OR abandoned = 1 THEN 'settled'
        WHEN batch_id IS NULL THEN 'pending'
        WHEN status IN ('failed', 'completed', 'expired', 'cancelled') THEN 'ended'
        ELSE 'live'
    END
) VIRTUAL;
CREATE INDEX attempts_pending ON attempts(not_before, created_at) WHERE phase = 'pending';
CREATE INDEX attempts_live ON attempts(model) WHERE phase = 'live';
CREATE INDEX attempts_ended ON attempts(updated_at) WHERE phase = 'ended';

-- Jobs per state, kept exact by triggers: a gauge costs one small read, not a scan.
CREATE TABLE job_counts (state TEXT PRIMARY KEY, n INTEGER NOT NULL);
INSERT INTO job_counts (state, n) SELECT state, COUNT(*) FROM jobs GROUP BY state;
CREATE TRIGGER jobs_count_insert AFTER INSERT ON jobs BEGIN
    INSERT INTO job_counts (state, n) VALUES (NEW.state, 1)
        ON CONFLICT (state) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER jobs_count_update AFTER UPDATE OF state ON jobs
    WHEN OLD.state <> NEW.state BEGIN
    UPDATE job_counts SET n = n - 1 WHERE state = OLD.state;
    INSERT INTO job_counts (state, n) VALUES (NEW.state, 1)
        ON CONFLICT (state) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER jobs_count_delete AFTER DELETE ON jobs BEGIN
    UPDATE job_counts SET n = n - 1 WHERE state = OLD.state;
END;

-- Daemon-wide facts other processes read (e.g. an API hold: the key was rejected).
CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL, updated_at REAL NOT NULL);

-- The provider's copies (input, output, error files) still to be deleted.
CREATE TABLE remote_files (
    file_id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    due_at REAL NOT NULL,
    tries INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX remote_files_due ON remote_files(due_at);
