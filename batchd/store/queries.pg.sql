-- PostgreSQL's statements (batchd/store/queries.py loads them; :named parameters).
--
-- 1. Variants: a statement of queries.sql whose SQLite text PostgreSQL does not take
--    has its PostgreSQL text here, under the same name (the backend swaps it in).
--    tests/test_store_backends.py runs every statement of queries.sql on both engines
--    and names any that lacks the variant it needs.
-- 2. Leases and claims, which only PostgreSQL replicas use (batchd/leases.py): an item
--    (`job:ID`, `attempt:ID`) or a role (`role:tracker`, ...) belongs to one owner
--    (host:pid:ulid) until `expires_at` (the server's clock: batchd_now()); the owner
--    renews it while working; a lease that has run out is anyone's.

-- --- variants -----------------------------------------------------------------------

-- name: job_names_in
SELECT name FROM jobs WHERE name IN (SELECT jsonb_array_elements_text(:names::jsonb));

-- name: due_pending
SELECT a.id, COALESCE(a.model, '') AS model, a.est_tokens, a.created_at, a.not_before,
       COALESCE(a.requests, 0) AS requests, a.job_id, a.provider
FROM attempts a JOIN jobs j ON j.id = a.job_id
WHERE a.phase = 'pending' AND a.not_before <= :now
AND j.state IN ('submitting', 'tracking') AND j.cancel_requested = 0
AND j.admitted_at IS NOT NULL
ORDER BY a.not_before, a.created_at LIMIT :limit;

-- name: facade_batches_to_settle
SELECT b.* FROM facade_batches b JOIN jobs j ON j.id = b.job_id
WHERE b.status IS NULL AND j.finished_at IS NOT NULL
ORDER BY b.created_at LIMIT :limit;

-- name: facade_batches_ended_since
SELECT b.*, j.finished_at AS job_finished_at
FROM jobs j JOIN facade_batches b ON b.job_id = j.id
WHERE j.finished_at >= :since AND b.status IS NULL
ORDER BY j.finished_at LIMIT :limit;

-- name: facade_files_desc
SELECT * FROM facade_files
WHERE tenant = :tenant AND id < :cursor AND (:purpose::text IS NULL OR purpose = :purpose)
ORDER BY id DESC LIMIT :limit;

-- name: facade_files_asc
SELECT * FROM facade_files
WHERE tenant = :tenant AND id > :cursor AND (:purpose::text IS NULL OR purpose = :purpose)
ORDER BY id LIMIT :limit;

-- --- variants: cost (0006_cost) ------------------------------------------------------
-- SUM of BIGINT is NUMERIC in PostgreSQL (a Decimal in Python): cast back to BIGINT.

-- name: unadmitted_jobs
SELECT * FROM jobs
WHERE admitted_at IS NULL AND state = 'submitting'
ORDER BY created_at, id LIMIT :limit;

-- name: budget_waiting_count
SELECT COUNT(*) FROM jobs
WHERE admitted_at IS NULL AND state = 'submitting' AND budget_wait IS NOT NULL;

-- name: budget_committed
SELECT COALESCE(model, '') AS model, source, (admitted_at >= :day0)::int AS today,
       SUM(CASE WHEN finished_at IS NOT NULL THEN COALESCE(cost_nanos, reserved_nanos, 0)
                ELSE COALESCE(reserved_nanos, 0) END)::bigint AS nanos
FROM jobs WHERE admitted_at >= :month0
GROUP BY 1, 2, 3;

-- name: put_charge
INSERT INTO charges (attempt_id, job_id, at, provider, model, source, requests,
    input_tokens, cached_tokens, cache_write_tokens, output_tokens, reasoning_tokens,
    cost_nanos, cost_unknown)
VALUES (:attempt_id, :job_id, :at, :provider, :model, :source, :requests, :input_tokens,
    :cached_tokens, :cache_write_tokens, :output_tokens, :reasoning_tokens, :cost_nanos,
    :cost_unknown)
ON CONFLICT (attempt_id) DO UPDATE SET job_id = excluded.job_id, at = excluded.at,
    provider = excluded.provider, model = excluded.model, source = excluded.source,
    requests = excluded.requests, input_tokens = excluded.input_tokens,
    cached_tokens = excluded.cached_tokens, cache_write_tokens = excluded.cache_write_tokens,
    output_tokens = excluded.output_tokens, reasoning_tokens = excluded.reasoning_tokens,
    cost_nanos = excluded.cost_nanos, cost_unknown = excluded.cost_unknown;

-- name: job_cost
SELECT COUNT(*), COALESCE(SUM(requests), 0)::bigint, COALESCE(SUM(input_tokens), 0)::bigint,
       COALESCE(SUM(cached_tokens), 0)::bigint, COALESCE(SUM(cache_write_tokens), 0)::bigint,
       COALESCE(SUM(output_tokens), 0)::bigint, COALESCE(SUM(reasoning_tokens), 0)::bigint,
       COALESCE(SUM(cost_nanos), 0)::bigint, MAX(cost_unknown)
FROM charges WHERE job_id = :job_id;

-- --- leases (PostgreSQL only) ---------------------------------------------------------

-- name: lease_take
INSERT INTO leases (key, owner, expires_at) VALUES (:key, :owner, batchd_now() + :ttl)
ON CONFLICT (key) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at
WHERE leases.owner = excluded.owner OR leases.expires_at < batchd_now();

-- name: lease_renew
UPDATE leases SET expires_at = batchd_now() + :ttl
WHERE owner = :owner AND key = ANY(:keys::text[])
RETURNING key;

-- name: lease_release
DELETE FROM leases WHERE owner = :owner AND key = ANY(:keys::text[]);

-- name: lease_release_all
DELETE FROM leases WHERE owner = :owner;

-- name: lease_holders
SELECT key, owner, expires_at - batchd_now() AS seconds_left FROM leases
WHERE key = ANY(:keys::text[]);

-- name: lease_counts
SELECT owner, split_part(key, ':', 1) AS kind, COUNT(*) AS n FROM leases
WHERE expires_at >= batchd_now() GROUP BY 1, 2 ORDER BY 1, 2;

-- name: lease_sweep
DELETE FROM leases WHERE expires_at < batchd_now() - 3600;

-- name: claim_new_jobs
-- Queued or validating jobs (one state) that no replica works on, oldest first, leased
-- to :owner. SKIP LOCKED: replicas claiming at the same instant take different jobs.
-- A job another replica leased after this statement's snapshot is lost to the lease's
-- ON CONFLICT: `found` - the ids taken says how many, and the caller claims again.
WITH due AS (
    SELECT j.id FROM jobs j
    WHERE j.state = :state
    AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.key = 'job:' || j.id
                    AND l.expires_at >= batchd_now())
    ORDER BY j.created_at, j.id LIMIT :limit
    FOR UPDATE OF j SKIP LOCKED
), taken AS (
    INSERT INTO leases (key, owner, expires_at)
    SELECT 'job:' || id, :owner, batchd_now() + :ttl FROM due
    ON CONFLICT (key) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at
    WHERE leases.owner = excluded.owner OR leases.expires_at < batchd_now()
    RETURNING substr(key, 5) AS id
)
SELECT (SELECT COUNT(*) FROM due) AS found,
       COALESCE((SELECT array_agg(id ORDER BY id) FROM taken), '{}') AS ids;

-- name: admission_lock
-- Admission is decided by one replica at a time, in the transaction of its claim.
SELECT pg_advisory_xact_lock(1650553702);

-- name: claimed_in_flight
-- Tokens and requests of the pending attempts some replica is submitting now (leased):
-- admission counts them as in flight, beside the live batches.
SELECT COALESCE(a.model, '') AS model, SUM(a.est_tokens), SUM(COALESCE(a.requests, 0))
FROM leases l JOIN attempts a ON a.id = substr(l.key, 9)
WHERE l.key LIKE 'attempt:%' AND l.expires_at >= batchd_now() AND a.phase = 'pending'
GROUP BY 1;

-- name: due_pending_unclaimed
SELECT a.id, COALESCE(a.model, '') AS model, a.est_tokens, a.created_at, a.not_before,
       COALESCE(a.requests, 0) AS requests, a.job_id, a.provider
FROM attempts a JOIN jobs j ON j.id = a.job_id
WHERE a.phase = 'pending' AND a.not_before <= :now
AND j.state IN ('submitting', 'tracking') AND j.cancel_requested = 0
AND j.admitted_at IS NOT NULL  -- a job waiting for its budget keeps its attempts back
AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.key = 'attempt:' || a.id
                AND l.expires_at >= batchd_now())
ORDER BY a.not_before, a.created_at LIMIT :limit;

-- --- webhooks for the tracking replica (PostgreSQL only) -------------------------------

-- name: push_batch
INSERT INTO pushed_batches (batch_id, at) VALUES (:batch_id, :at)
ON CONFLICT (batch_id) DO NOTHING;

-- name: take_pushed
DELETE FROM pushed_batches RETURNING batch_id;
