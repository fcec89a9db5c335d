-- Every statement batchd runs, by name (batchd/store/queries.py loads them).
-- Parameters are :named. Live jobs have finished_at NULL; live states are listed
-- explicitly so that reads go through jobs_state, never over finished rows.
-- tests/test_store_plans.py checks with EXPLAIN QUERY PLAN that the recurring ones
-- (marked "hot") never scan jobs, attempts or events.

-- name: insert_job
INSERT INTO jobs (id, name, stem, state, source, input_path, retry_of, allow_duplicate,
                  created_at, updated_at)
VALUES (:id, :name, :stem, 'queued', :source, :input_path, :retry_of, :allow_duplicate,
        :now, :now);

-- name: insert_event
INSERT INTO events (job_id, at, kind, old_state, new_state, detail)
VALUES (:job_id, :at, :kind, :old_state, :new_state, :detail);

-- name: job_by_id
SELECT * FROM jobs WHERE id = :id;

-- name: job_by_name
SELECT * FROM jobs WHERE name = :name;

-- name: name_taken
SELECT 1 FROM jobs WHERE name = :name;

-- name: jobs_by_stem_newest
SELECT * FROM jobs WHERE stem = :stem ORDER BY created_at DESC, id DESC LIMIT 1;

-- name: jobs_by_id_prefix
SELECT * FROM jobs WHERE id >= :lo AND id < :hi ORDER BY id LIMIT 6;

-- name: jobs_newest
SELECT * FROM jobs
WHERE (created_at, id) < (:before, :before_id) AND created_at >= :since
ORDER BY created_at DESC, id DESC LIMIT :limit;

-- name: jobs_newest_in_state
SELECT * FROM jobs
WHERE state = :state AND (created_at, id) < (:before, :before_id) AND created_at >= :since
ORDER BY created_at DESC, id DESC LIMIT :limit;

-- name: oldest_job_created_at
SELECT MIN(created_at) FROM jobs;

-- name: job_counts  (hot: gauges)
SELECT state, n FROM job_counts;

-- name: oldest_live_created_at  (hot: gauges)
SELECT MIN(created_at) FROM jobs WHERE state = :state;

-- name: due_new_jobs  (hot: submit)
SELECT id FROM jobs WHERE state = :state ORDER BY created_at, id LIMIT :limit;

-- name: live_job_ids
SELECT id FROM jobs WHERE state = :state ORDER BY created_at, id;

-- name: failing_jobs  (hot: collect)
SELECT * FROM jobs WHERE reason IS NOT NULL AND finished_at IS NULL
ORDER BY created_at LIMIT :limit;

-- name: cancelling_jobs  (hot: collect)
SELECT * FROM jobs WHERE cancel_requested = 1 AND finished_at IS NULL
ORDER BY created_at LIMIT :limit;

-- name: collecting_jobs  (hot: collect)
SELECT * FROM jobs WHERE state = 'collecting' AND reason IS NULL
ORDER BY created_at LIMIT :limit;

-- name: settled_jobs
SELECT j.* FROM jobs j WHERE j.state = :state
AND EXISTS (SELECT 1 FROM pieces p WHERE p.job_id = j.id)
AND NOT EXISTS (SELECT 1 FROM pieces p WHERE p.job_id = j.id AND p.done = 0);

-- name: duplicate_of  (hot: submit)
SELECT * FROM jobs
WHERE sha256 = :sha256 AND created_at >= :since AND id <> :id
AND state NOT IN ('failed', 'cancelled')
ORDER BY created_at LIMIT 1;

-- name: retries_of
SELECT * FROM jobs WHERE retry_of = :job_id ORDER BY created_at DESC;

-- name: result_dir_taken
SELECT 1 FROM jobs WHERE result_dir = :result_dir;

-- name: set_cancel_requested
UPDATE jobs SET cancel_requested = 1, updated_at = :now WHERE id = :id;

-- name: set_job_reason
UPDATE jobs SET reason = :reason, updated_at = :now WHERE id = :id;

-- name: job_progress
UPDATE jobs SET
    completed = (SELECT COALESCE(SUM(completed), 0) FROM attempts
                 WHERE job_id = :id AND (outcome IS NULL OR outcome NOT IN ('resubmit', 'requeue'))
                 AND abandoned = 0),
    failed = (SELECT COALESCE(SUM(failed), 0) FROM attempts
              WHERE job_id = :id AND (outcome IS NULL OR outcome NOT IN ('resubmit', 'requeue'))
              AND abandoned = 0),
    updated_at = :now
WHERE id = :id;

-- name: set_source_msg
UPDATE jobs SET source_msg = :source_msg, reason = :reason WHERE id = :id;

-- name: job_by_source_msg  (hot: sources)
SELECT * FROM jobs WHERE source = :source AND source_msg = :source_msg;

-- name: source_live_count  (hot: sources)
SELECT COUNT(*) FROM jobs
WHERE source = :source AND source_msg IS NOT NULL AND finished_at IS NULL;

-- name: unannounced_jobs  (hot: sources)
SELECT * FROM jobs
WHERE source = :source AND source_msg IS NOT NULL AND announced_at IS NULL
AND finished_at IS NOT NULL
ORDER BY finished_at LIMIT :limit;

-- name: set_announced
UPDATE jobs SET announced_at = :now WHERE id = :id;

-- name: events_of
SELECT * FROM events WHERE job_id = :job_id ORDER BY id;

-- name: delete_pieces
DELETE FROM pieces WHERE job_id = :job_id;

-- name: insert_piece
INSERT INTO pieces (job_id, idx, input_path, requests, bytes, est_tokens)
VALUES (:job_id, :idx, :input_path, :requests, :bytes, :est_tokens);

-- name: pieces_of
SELECT * FROM pieces WHERE job_id = :job_id ORDER BY idx;

-- name: piece_done
UPDATE pieces SET done = 1 WHERE job_id = :job_id AND idx = :idx;

-- name: insert_attempt
INSERT INTO attempts (id, job_id, piece, input_path, model, requests, est_tokens, not_before,
                      upload_started_at, created_at, updated_at)
VALUES (:id, :job_id, :piece, :input_path, :model, :requests, :est_tokens, :not_before,
        :upload_started_at, :now, :now);

-- name: abandon_open_attempts
UPDATE attempts SET abandoned = 1, updated_at = :now
WHERE job_id = :job_id AND collected = 0 AND abandoned = 0;

-- name: attempt_by_id
SELECT * FROM attempts WHERE id = :id;

-- name: attempts_of
SELECT * FROM attempts WHERE job_id = :job_id ORDER BY created_at, id;

-- name: settle_attempt
UPDATE attempts SET collected = 1, outcome = :outcome, batch = COALESCE(:batch, batch),
    updated_at = :now
WHERE id = :id;

-- name: due_pending  (hot: submit)
SELECT a.id, COALESCE(a.model, '') AS model, a.est_tokens, a.created_at, a.not_before,
       COALESCE(a.requests, 0) AS requests, a.job_id
FROM attempts a CROSS JOIN jobs j ON j.id = a.job_id  -- CROSS: the pending attempts drive
WHERE a.phase = 'pending' AND a.not_before <= :now
AND j.state IN ('submitting', 'tracking') AND j.cancel_requested = 0
ORDER BY a.not_before, a.created_at LIMIT :limit;

-- name: next_pending_at  (hot: submit)
SELECT MIN(a.not_before) FROM attempts a
WHERE a.phase = 'pending' AND a.not_before > :now;

-- name: live_in_flight  (hot: submit)
SELECT COALESCE(model, '') AS model, SUM(est_tokens), SUM(COALESCE(requests, 0))
FROM attempts WHERE phase = 'live' GROUP BY model;

-- name: live_batches  (hot: track)
SELECT id, job_id, batch_id, status, completed, failed, total,
       COALESCE(batch_created_at, created_at) AS created
FROM attempts WHERE phase = 'live';

-- name: ended_attempts  (hot: collect)
SELECT a.* FROM attempts a JOIN jobs j ON j.id = a.job_id
WHERE a.phase = 'ended' AND j.finished_at IS NULL
ORDER BY a.updated_at LIMIT :limit;

-- name: jobs_missing_attempts
SELECT DISTINCT j.id, j.created_at FROM jobs j JOIN pieces p ON p.job_id = j.id
WHERE j.state = 'submitting' AND j.cancel_requested = 0 AND p.done = 0
AND NOT EXISTS (SELECT 1 FROM attempts a WHERE a.job_id = p.job_id
                AND a.piece = p.idx AND a.collected = 0 AND a.abandoned = 0)
ORDER BY j.created_at, j.id;

-- name: learn_limit
INSERT INTO model_limits (model, token_limit, learned_at) VALUES (:model, :limit, :now)
ON CONFLICT (model) DO UPDATE SET token_limit = excluded.token_limit,
    learned_at = excluded.learned_at;

-- name: learned_limits
SELECT model, token_limit FROM model_limits;

-- name: get_setting
SELECT value, updated_at FROM settings WHERE key = :key;

-- name: set_setting
INSERT INTO settings (key, value, updated_at) VALUES (:key, :value, :now)
ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at;

-- name: delete_setting
DELETE FROM settings WHERE key = :key;

-- name: add_remote_file
INSERT INTO remote_files (file_id, job_id, kind, due_at) VALUES (:file_id, :job_id, :kind, :due_at)
ON CONFLICT (file_id) DO NOTHING;

-- name: due_remote_files  (hot: retention)
SELECT file_id, job_id, kind, tries FROM remote_files WHERE due_at <= :now
ORDER BY due_at LIMIT :limit;

-- name: next_remote_file_at  (hot: retention)
SELECT MIN(due_at) FROM remote_files;

-- name: remote_file_done
DELETE FROM remote_files WHERE file_id = :file_id;

-- name: remote_file_later
UPDATE remote_files SET due_at = :due_at, tries = tries + 1 WHERE file_id = :file_id;

-- name: expired_jobs  (hot: retention)
SELECT id FROM jobs WHERE finished_at IS NOT NULL AND finished_at < :before
ORDER BY finished_at LIMIT :limit;

-- name: expired_results  (hot: retention)
SELECT id, result_dir FROM jobs
WHERE result_dir IS NOT NULL AND results_deleted_at IS NULL AND finished_at < :before
ORDER BY finished_at LIMIT :limit;

-- name: results_deleted
UPDATE jobs SET results_deleted_at = :now WHERE id = :id;

-- name: delete_job_events
DELETE FROM events WHERE job_id = :id;

-- name: delete_job_attempts
DELETE FROM attempts WHERE job_id = :id;

-- name: delete_job_pieces
DELETE FROM pieces WHERE job_id = :id;

-- name: delete_job
DELETE FROM jobs WHERE id = :id;
