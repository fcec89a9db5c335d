-- Several replicas on one database (see 0008 of SQLite): leases on items and roles,
-- webhooks handed to whichever replica tracks, live attempts by their last change.
CREATE TABLE leases (
    key TEXT COLLATE "C" PRIMARY KEY,
    owner TEXT COLLATE "C" NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX leases_owner ON leases(owner);
CREATE TABLE pushed_batches (batch_id TEXT COLLATE "C" PRIMARY KEY, at DOUBLE PRECISION NOT NULL);
CREATE INDEX attempts_live_changed ON attempts(updated_at) WHERE phase = 'live';
-- Lease times are the server's clock (unix seconds): replicas' clocks may differ.
CREATE FUNCTION batchd_now() RETURNS DOUBLE PRECISION LANGUAGE sql VOLATILE AS $$
    SELECT extract(epoch FROM clock_timestamp())::double precision
$$;
