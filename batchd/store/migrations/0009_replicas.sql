-- Several replicas on one database. Only PostgreSQL replicas use these tables (one
-- SQLite daemon holds its spool alone); SQLite has them too, so both keep one schema.

-- Who works on an item (`job:ID`, `attempt:ID`) or holds a role (`role:tracker`, ...),
-- until when: renewed while working, anyone's once it has run out.
CREATE TABLE leases (key TEXT PRIMARY KEY, owner TEXT NOT NULL, expires_at REAL NOT NULL);
CREATE INDEX leases_owner ON leases(owner);
-- Batch ids a webhook named, for whichever replica tracks (webhooks arrive at any).
CREATE TABLE pushed_batches (batch_id TEXT PRIMARY KEY, at REAL NOT NULL);
-- The tracker picks up the batches other replicas created: live attempts by last change.
CREATE INDEX attempts_live_changed ON attempts(updated_at) WHERE phase = 'live';
