-- Jobs taken from a queue source ([sources.NAME]): the broker's message id, recorded with
-- the job so a redelivered message is recognised (never a second job), and when the
-- job's outcome was published back (NULL: not yet).
ALTER TABLE jobs ADD COLUMN source_msg TEXT;
ALTER TABLE jobs ADD COLUMN announced_at REAL;
CREATE UNIQUE INDEX jobs_source_msg ON jobs(source, source_msg) WHERE source_msg IS NOT NULL;
-- Back-pressure counts a source's live jobs; the announcer reads its ended, unannounced
-- ones. Both indexes hold only those rows, so neither grows with finished history.
CREATE INDEX jobs_source_live ON jobs(source)
    WHERE source_msg IS NOT NULL AND finished_at IS NULL;
CREATE INDEX jobs_unannounced ON jobs(source, finished_at)
    WHERE source_msg IS NOT NULL AND announced_at IS NULL AND finished_at IS NOT NULL;
