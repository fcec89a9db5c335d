-- jobs (one input file), attempts (one remote batch each), events (append-only history)
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    source TEXT NOT NULL,
    input_path TEXT NOT NULL,
    sha256 TEXT,
    endpoint TEXT,
    model TEXT,
    requests INTEGER,
    bytes INTEGER,
    est_tokens INTEGER,
    completed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    usage TEXT,
    reason TEXT,
    result_dir TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    finished_at REAL
);
CREATE INDEX jobs_state ON jobs(state);
CREATE TABLE attempts (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL REFERENCES jobs(id),
    piece INTEGER NOT NULL,
    input_path TEXT NOT NULL,
    file_id TEXT,
    batch_id TEXT UNIQUE,
    create_sent_at REAL,
    status TEXT,
    batch TEXT,
    collected INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX attempts_job ON attempts(job_id);
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    old_state TEXT,
    new_state TEXT,
    detail TEXT
);
CREATE INDEX events_job ON events(job_id, id);
