-- pieces, per-attempt admission data, learned per-model token limits (see 0002 of SQLite)
CREATE TABLE pieces (
    job_id TEXT COLLATE "C" NOT NULL REFERENCES jobs(id),
    idx INTEGER NOT NULL,
    input_path TEXT COLLATE "C" NOT NULL,
    requests BIGINT NOT NULL,
    bytes BIGINT NOT NULL,
    est_tokens BIGINT NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, idx)
);
ALTER TABLE attempts ADD COLUMN model TEXT COLLATE "C";
ALTER TABLE attempts ADD COLUMN requests BIGINT;
ALTER TABLE attempts ADD COLUMN est_tokens BIGINT NOT NULL DEFAULT 0;
ALTER TABLE attempts ADD COLUMN not_before DOUBLE PRECISION NOT NULL DEFAULT 0;
ALTER TABLE attempts ADD COLUMN abandoned INTEGER NOT NULL DEFAULT 0;
ALTER TABLE attempts ADD COLUMN outcome TEXT COLLATE "C";
CREATE TABLE model_limits (
    model TEXT COLLATE "C" PRIMARY KEY,
    token_limit BIGINT NOT NULL,
    learned_at DOUBLE PRECISION NOT NULL
);
