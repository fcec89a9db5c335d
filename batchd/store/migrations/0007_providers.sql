-- Providers: the configured provider (NAME) a job goes to, copied onto its attempts and
-- the provider's copies to delete (NULL: the default provider, [api], "openai"); the
-- status a provider reported beside batchd's own; usage tallied from result lines where
-- a batch reports none; quota refusals at create (Azure's token_limit_exceeded).
ALTER TABLE jobs ADD COLUMN provider TEXT;
ALTER TABLE attempts ADD COLUMN provider TEXT;
ALTER TABLE attempts ADD COLUMN raw_status TEXT;
ALTER TABLE attempts ADD COLUMN usage TEXT;
ALTER TABLE attempts ADD COLUMN refusals INTEGER NOT NULL DEFAULT 0;
ALTER TABLE remote_files ADD COLUMN provider TEXT;
