-- PostgreSQL's version of migrations/0008_sources.sql (see there): a queue source's
-- message id with each job (a redelivery is recognised, never a second job) and when the
-- job's outcome was published back (NULL: not yet).
ALTER TABLE jobs ADD COLUMN source_msg TEXT COLLATE "C";
ALTER TABLE jobs ADD COLUMN announced_at DOUBLE PRECISION;
CREATE UNIQUE INDEX jobs_source_msg ON jobs(source, source_msg) WHERE source_msg IS NOT NULL;
CREATE INDEX jobs_source_live ON jobs(source)
    WHERE source_msg IS NOT NULL AND finished_at IS NULL;
CREATE INDEX jobs_unannounced ON jobs(source, finished_at)
    WHERE source_msg IS NOT NULL AND announced_at IS NULL AND finished_at IS NOT NULL;
