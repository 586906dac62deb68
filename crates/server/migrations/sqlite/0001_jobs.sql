-- The job table as the first versions created it (kept as is so that their databases upgrade in place).
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    owner TEXT NOT NULL,
    status TEXT NOT NULL,
    spec TEXT NOT NULL,
    result TEXT,
    error TEXT,
    webhook_status TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, id);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, status);
