-- Leases, attempts, progress, cancel flags, durable webhooks, fair turns between keys, worker reports and
-- single-holder tasks: the same columns and tables as the PostgreSQL store.
ALTER TABLE jobs ADD COLUMN model_id TEXT NOT NULL DEFAULT '';
ALTER TABLE jobs ADD COLUMN pinned_group TEXT;
ALTER TABLE jobs ADD COLUMN attempt INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN worker TEXT;
ALTER TABLE jobs ADD COLUMN lease_until REAL;
ALTER TABLE jobs ADD COLUMN step INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN steps INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN cancel_requested BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE jobs ADD COLUMN webhook_due REAL;
ALTER TABLE jobs ADD COLUMN webhook_attempts INTEGER NOT NULL DEFAULT 0;
UPDATE jobs SET model_id = COALESCE(json_extract(spec, '$.request.model_id'), '');
-- Jobs left running by the old versions ran once already.
UPDATE jobs SET attempt = 1 WHERE status = 'running';
CREATE INDEX jobs_webhook ON jobs (webhook_status, webhook_due);

CREATE TABLE key_turns (
    owner TEXT PRIMARY KEY,
    last_claim REAL NOT NULL
);

CREATE TABLE workers (
    name TEXT PRIMARY KEY,
    worker_group TEXT,
    models TEXT NOT NULL,
    running INTEGER NOT NULL,
    seconds_per_step REAL,
    seen_at REAL NOT NULL
);

CREATE TABLE leaders (
    task TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    until REAL NOT NULL
);
