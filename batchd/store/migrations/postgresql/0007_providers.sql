-- PostgreSQL's version of migrations/0007_providers.sql (see there for what each column
-- means): the provider NAME of jobs, attempts and the provider's copies to delete, the
-- status as the provider wrote it, usage tallied from result lines, quota refusals.
ALTER TABLE jobs ADD COLUMN provider TEXT COLLATE "C";
ALTER TABLE attempts ADD COLUMN provider TEXT COLLATE "C";
ALTER TABLE attempts ADD COLUMN raw_status TEXT COLLATE "C";
ALTER TABLE attempts ADD COLUMN usage TEXT;
ALTER TABLE attempts ADD COLUMN refusals BIGINT NOT NULL DEFAULT 0;
ALTER TABLE remote_files ADD COLUMN provider TEXT COLLATE "C";
