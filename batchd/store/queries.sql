-- Every statement batchd runs, by name (batchd/store/queries.py loads them).
-- Parameters are :named. Live jobs have finished_at NULL; live states are listed
-- explicitly so that reads go through jobs_state, never over finished rows.
-- tests/test_store_plans.py checks with EXPLAIN QUERY PLAN that the recurring ones
-- (marked "hot") never scan jobs, attempts or events.

-- name: insert_job
INSERT INTO jobs (id, name, stem, state, source, input_path, retry_of, allow_duplicate,
                  provider, created_at, updated_at)
VALUES (:id, :name, :stem, 'queued', :source, :input_path, :retry_of, :allow_duplicate,
        :provider, :now, :now);

-- name: insert_event
INSERT INTO events (job_id, at, kind, old_state, new_state, detail)
VALUES (:job_id, :at, :kind, :old_state, :new_state, :detail);

-- name: job_by_id
SELECT * FROM jobs WHERE id = :id;

-- name: job_by_name
SELECT * FROM jobs WHERE name = :name;

-- name: name_taken
SELECT 1 FROM jobs WHERE name = :name;

-- name: job_names_in
SELECT name FROM jobs WHERE name IN (SELECT value FROM json_each(:names));

-- name: job_name_family
SELECT name FROM jobs WHERE name = :stem OR (name >= :lo AND name < :hi);

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

-- name: live_providers
SELECT DISTINCT provider FROM jobs WHERE state = :state;

-- name: due_new_jobs  (hot: submit)
SELECT id FROM jobs WHERE state = :state ORDER BY created_at, id LIMIT :limit;

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
                      upload_started_at, provider, created_at, updated_at)
VALUES (:id, :job_id, :piece, :input_path, :model, :requests, :est_tokens, :not_before,
        :upload_started_at, (SELECT provider FROM jobs WHERE id = :job_id), :now, :now);

-- name: abandon_open_attempts
UPDATE attempts SET abandoned = 1, updated_at = :now
WHERE job_id = :job_id AND collected = 0 AND abandoned = 0;

-- name: attempt_by_id
SELECT * FROM attempts WHERE id = :id;

-- name: batch_owned
SELECT 1 FROM attempts WHERE batch_id = :batch_id;

-- name: attempts_of
SELECT * FROM attempts WHERE job_id = :job_id ORDER BY created_at, id;

-- name: settle_attempt
UPDATE attempts SET collected = 1, outcome = :outcome, batch = COALESCE(:batch, batch),
    usage = COALESCE(:usage, usage), updated_at = :now
WHERE id = :id;

-- name: due_pending  (hot: submit)
SELECT a.id, COALESCE(a.model, '') AS model, a.est_tokens, a.created_at, a.not_before,
       COALESCE(a.requests, 0) AS requests, a.job_id, a.provider
FROM attempts a CROSS JOIN jobs j ON j.id = a.job_id  -- CROSS: the pending attempts drive
WHERE a.phase = 'pending' AND a.not_before <= :now
AND j.state IN ('submitting', 'tracking') AND j.cancel_requested = 0
AND j.admitted_at IS NOT NULL  -- a job waiting for its budget keeps its attempts back
ORDER BY a.not_before, a.created_at LIMIT :limit;

-- name: next_pending_at  (hot: submit)
SELECT MIN(a.not_before) FROM attempts a
WHERE a.phase = 'pending' AND a.not_before > :now;

-- name: live_in_flight  (hot: submit)
SELECT COALESCE(model, '') AS model, SUM(est_tokens), SUM(COALESCE(requests, 0))
FROM attempts WHERE phase = 'live' GROUP BY model;

-- name: live_batches  (hot: track)
SELECT id, job_id, batch_id, status, completed, failed, total,
       COALESCE(batch_created_at, created_at) AS created, provider
FROM attempts WHERE phase = 'live';

-- name: live_batches_changed  (hot: track)
SELECT id, job_id, batch_id, status, completed, failed, total,
       COALESCE(batch_created_at, created_at) AS created, provider
FROM attempts WHERE phase = 'live' AND updated_at >= :since;

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
SELECT model, token_limit FROM model_limits WHERE token_limit IS NOT NULL;

-- name: get_setting
SELECT value, updated_at FROM settings WHERE key = :key;

-- name: hold_settings
SELECT key, value FROM settings WHERE key = 'api_hold' OR key LIKE 'api_hold:%';

-- name: set_setting
INSERT INTO settings (key, value, updated_at) VALUES (:key, :value, :now)
ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at;

-- name: delete_setting
DELETE FROM settings WHERE key = :key;

-- name: add_remote_file
INSERT INTO remote_files (file_id, job_id, kind, due_at, provider)
VALUES (:file_id, :job_id, :kind, :due_at, (SELECT provider FROM jobs WHERE id = :job_id))
ON CONFLICT (file_id) DO NOTHING;

-- name: due_remote_files  (hot: retention)
SELECT file_id, job_id, kind, tries, provider FROM remote_files WHERE due_at <= :now
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

-- --- the OpenAI-compatible facade (batchd/store/objects.py) ---------------------------

-- name: facade_insert_file
INSERT INTO facade_files (id, tenant, filename, purpose, bytes, path, created_at, expires_at,
                          batch_id)
VALUES (:id, :tenant, :filename, :purpose, :bytes, :path, :created_at, :expires_at, :batch_id);

-- name: facade_file
SELECT * FROM facade_files WHERE id = :id;

-- name: facade_files_desc
SELECT * FROM facade_files
WHERE tenant = :tenant AND id < :cursor AND (:purpose IS NULL OR purpose = :purpose)
ORDER BY id DESC LIMIT :limit;

-- name: facade_files_asc
SELECT * FROM facade_files
WHERE tenant = :tenant AND id > :cursor AND (:purpose IS NULL OR purpose = :purpose)
ORDER BY id LIMIT :limit;

-- name: facade_delete_file
DELETE FROM facade_files WHERE id = :id;

-- name: facade_expired_files  (hot: facade)
SELECT * FROM facade_files WHERE expires_at <= :now ORDER BY expires_at LIMIT :limit;

-- name: facade_next_file_expiry  (hot: facade)
SELECT MIN(expires_at) FROM facade_files WHERE expires_at IS NOT NULL;

-- name: facade_files_of_batch
SELECT * FROM facade_files WHERE batch_id = :batch_id;

-- name: facade_insert_upload
INSERT INTO facade_uploads (id, tenant, filename, purpose, bytes, mime_type,
                            file_expires_after, created_at, expires_at, status)
VALUES (:id, :tenant, :filename, :purpose, :bytes, :mime_type, :file_expires_after,
        :created_at, :expires_at, 'pending');

-- name: facade_upload
SELECT * FROM facade_uploads WHERE id = :id;

-- name: facade_insert_part
INSERT INTO facade_upload_parts (id, upload_id, bytes, created_at)
VALUES (:id, :upload_id, :bytes, :created_at);

-- name: facade_parts_of
SELECT * FROM facade_upload_parts WHERE upload_id = :upload_id;

-- name: facade_upload_ended
UPDATE facade_uploads SET status = :status, file_id = :file_id
WHERE id = :id AND status = 'pending';

-- name: facade_delete_parts
DELETE FROM facade_upload_parts WHERE upload_id = :upload_id;

-- name: facade_expired_uploads  (hot: facade)
SELECT * FROM facade_uploads WHERE status = 'pending' AND expires_at <= :now
ORDER BY expires_at LIMIT :limit;

-- name: facade_next_upload_expiry  (hot: facade)
SELECT MIN(expires_at) FROM facade_uploads WHERE status = 'pending';

-- name: facade_insert_batch
INSERT INTO facade_batches (id, tenant, job_id, input_file_id, endpoint, completion_window,
                            metadata, output_expires_after, dedupe_key, idempotency_key,
                            created_at)
VALUES (:id, :tenant, :job_id, :input_file_id, :endpoint, :completion_window, :metadata,
        :output_expires_after, :dedupe_key, :idempotency_key, :created_at);

-- name: facade_batch
SELECT * FROM facade_batches WHERE id = :id;

-- name: facade_batches_desc
SELECT * FROM facade_batches WHERE tenant = :tenant AND id < :cursor
ORDER BY id DESC LIMIT :limit;

-- name: facade_batch_by_dedupe
SELECT * FROM facade_batches
WHERE tenant = :tenant AND dedupe_key = :dedupe_key AND created_at >= :since
AND idempotency_key IS NULL AND (status IS NULL OR status NOT IN ('failed', 'cancelled'))
ORDER BY created_at DESC LIMIT 1;

-- name: facade_batch_by_key
SELECT * FROM facade_batches WHERE tenant = :tenant AND idempotency_key = :key;

-- name: facade_batches_to_settle
SELECT b.* FROM facade_batches b CROSS JOIN jobs j ON j.id = b.job_id  -- CROSS: live drive
WHERE b.status IS NULL AND j.finished_at IS NOT NULL
ORDER BY b.created_at LIMIT :limit;

-- name: facade_batches_ended_since  (hot: facade)
SELECT b.*, j.finished_at AS job_finished_at
FROM jobs j CROSS JOIN facade_batches b ON b.job_id = j.id  -- CROSS: recent ends drive
WHERE j.finished_at >= :since AND b.status IS NULL
ORDER BY j.finished_at LIMIT :limit;

-- name: facade_batches_without_job
SELECT b.* FROM facade_batches b
WHERE b.status IS NULL AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = b.job_id);

-- name: facade_settle_batch
UPDATE facade_batches SET status = :status, output_file_id = :output_file_id,
    error_file_id = :error_file_id, final = :final, ended_at = :ended_at
WHERE id = :id AND status IS NULL;

-- name: facade_expired_batches  (hot: facade)
SELECT id FROM facade_batches WHERE ended_at < :before ORDER BY ended_at LIMIT :limit;

-- name: facade_delete_batch
DELETE FROM facade_batches WHERE id = :id;

-- name: facade_delete_batch_files
DELETE FROM facade_files WHERE batch_id = :id;

-- name: facade_insert_event
INSERT INTO facade_events (id, tenant, batch_id, type, created_at, due_at)
VALUES (:id, :tenant, :batch_id, :type, :created_at, :created_at);

-- name: facade_due_events  (hot: facade)
SELECT * FROM facade_events WHERE due_at <= :now ORDER BY due_at LIMIT :limit;

-- name: facade_next_event_at  (hot: facade)
SELECT MIN(due_at) FROM facade_events;

-- name: facade_event_done
DELETE FROM facade_events WHERE id = :id;

-- name: facade_event_later
UPDATE facade_events SET due_at = :due_at, tries = tries + 1 WHERE id = :id;

-- --- cost: estimates, charges, budget admission, request limits ------------------------

-- name: unadmitted_jobs  (hot: submit)
-- INDEXED BY: jobs_state would walk every submitting job (a burst: thousands) for none.
SELECT * FROM jobs INDEXED BY jobs_unadmitted
WHERE admitted_at IS NULL AND state = 'submitting'
ORDER BY created_at, id LIMIT :limit;

-- name: budget_waiting_count  (hot: gauges)
SELECT COUNT(*) FROM jobs INDEXED BY jobs_unadmitted
WHERE admitted_at IS NULL AND state = 'submitting' AND budget_wait IS NOT NULL;

-- name: admit_job
UPDATE jobs SET admitted_at = :now, reserved_nanos = :reserved, budget_wait = NULL,
    updated_at = :now
WHERE id = :id AND admitted_at IS NULL;

-- name: set_budget_wait
UPDATE jobs SET budget_wait = :reason, updated_at = :now
WHERE id = :id AND admitted_at IS NULL;

-- name: budget_committed  (hot: submit)
-- Money the jobs admitted since :month0 hold: a job's actual cost once it ended, else
-- its reservation (its high estimate); split at :day0 for the daily limits.
SELECT COALESCE(model, '') AS model, source, admitted_at >= :day0 AS today,
       SUM(CASE WHEN finished_at IS NOT NULL THEN COALESCE(cost_nanos, reserved_nanos, 0)
                ELSE COALESCE(reserved_nanos, 0) END) AS nanos
FROM jobs WHERE admitted_at >= :month0
GROUP BY 1, 2, 3;

-- name: put_charge
INSERT OR REPLACE INTO charges (attempt_id, job_id, at, provider, model, source, requests,
    input_tokens, cached_tokens, cache_write_tokens, output_tokens, reasoning_tokens,
    cost_nanos, cost_unknown)
VALUES (:attempt_id, :job_id, :at, :provider, :model, :source, :requests, :input_tokens,
    :cached_tokens, :cache_write_tokens, :output_tokens, :reasoning_tokens, :cost_nanos,
    :cost_unknown);

-- name: job_cost
SELECT COUNT(*), COALESCE(SUM(requests), 0), COALESCE(SUM(input_tokens), 0),
       COALESCE(SUM(cached_tokens), 0), COALESCE(SUM(cache_write_tokens), 0),
       COALESCE(SUM(output_tokens), 0), COALESCE(SUM(reasoning_tokens), 0),
       COALESCE(SUM(cost_nanos), 0), MAX(cost_unknown)
FROM charges WHERE job_id = :job_id;

-- name: charges_since
SELECT at, model, source, requests, input_tokens, cached_tokens, output_tokens,
       cost_nanos, cost_unknown
FROM charges WHERE at >= :since ORDER BY at;

-- name: delete_job_charges
DELETE FROM charges WHERE job_id = :id;

-- name: learn_request_limit
INSERT INTO model_limits (model, request_limit, learned_at) VALUES (:model, :limit, :now)
ON CONFLICT (model) DO UPDATE SET request_limit = excluded.request_limit,
    learned_at = excluded.learned_at;

-- name: learned_request_limits
SELECT model, request_limit FROM model_limits WHERE request_limit IS NOT NULL;
