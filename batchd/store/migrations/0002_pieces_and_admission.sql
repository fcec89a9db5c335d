-- pieces, per-attempt admission data, learned per-model token limits
CREATE TABLE pieces (
    job_id TEXT NOT NULL REFERENCES jobs(id),
    idx INTEGER NOT NULL,
    input_path TEXT NOT NULL,
    requests INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    est_tokens INTEGER NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, idx)
);
ALTER TABLE attempts ADD COLUMN model TEXT;
ALTER TABLE attempts ADD COLUMN requests INTEGER;
ALTER TABLE attempts ADD COLUMN est_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE attempts ADD COLUMN not_before REAL NOT NULL DEFAULT 0;
ALTER TABLE attempts ADD COLUMN abandoned INTEGER NOT NULL DEFAULT 0;
ALTER TABLE attempts ADD COLUMN outcome TEXT;
CREATE TABLE model_limits (
    model TEXT PRIMARY KEY,
    token_limit INTEGER NOT NULL,
    learned_at REAL NOT NULL
);
