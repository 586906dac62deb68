-- Jobs, leases, durable webhooks, fair turns between keys, worker reports and single-holder tasks. Every time is
-- seconds since the Unix epoch on the database's clock (pictor_now), so nodes' clocks never need to agree.
CREATE FUNCTION pictor_now() RETURNS DOUBLE PRECISION
    LANGUAGE SQL VOLATILE
    AS $$ SELECT EXTRACT(EPOCH FROM clock_timestamp())::DOUBLE PRECISION $$;

CREATE TABLE jobs (
    id BIGSERIAL PRIMARY KEY,
    owner TEXT NOT NULL,
    status TEXT NOT NULL,
    spec TEXT NOT NULL,
    model_id TEXT NOT NULL DEFAULT '',
    pinned_group TEXT,
    result TEXT,
    error TEXT,
    webhook_status TEXT NOT NULL DEFAULT '',
    webhook_due DOUBLE PRECISION,
    webhook_attempts INTEGER NOT NULL DEFAULT 0,
    created_at DOUBLE PRECISION NOT NULL,
    started_at DOUBLE PRECISION,
    finished_at DOUBLE PRECISION,
    attempt INTEGER NOT NULL DEFAULT 0,
    worker TEXT,
    lease_until DOUBLE PRECISION,
    step INTEGER NOT NULL DEFAULT 0,
    steps INTEGER NOT NULL DEFAULT 0,
    cancel_requested BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX jobs_status ON jobs (status, id);
CREATE INDEX jobs_owner ON jobs (owner, status);
CREATE INDEX jobs_webhook ON jobs (webhook_status, webhook_due);

CREATE TABLE key_turns (
    owner TEXT PRIMARY KEY,
    last_claim DOUBLE PRECISION NOT NULL
);

CREATE TABLE workers (
    name TEXT PRIMARY KEY,
    worker_group TEXT,
    models TEXT NOT NULL,
    running BIGINT NOT NULL,
    seconds_per_step DOUBLE PRECISION,
    seen_at DOUBLE PRECISION NOT NULL
);

CREATE TABLE leaders (
    task TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    until DOUBLE PRECISION NOT NULL
);

-- Every node LISTENs on pictor_jobs: a job queued (wakes idle workers), finished (wakes the API node a
-- synchronous request waits on), asked to stop (reaches the worker running it) or with a webhook due.
CREATE FUNCTION pictor_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status = 'queued' AND (TG_OP = 'INSERT' OR OLD.status <> 'queued') THEN
        PERFORM pg_notify('pictor_jobs', 'queued:' || NEW.id);
    ELSIF NEW.status IN ('success', 'failed') AND OLD.status <> NEW.status THEN
        PERFORM pg_notify('pictor_jobs', 'finished:' || NEW.id);
    ELSIF NEW.cancel_requested AND NOT OLD.cancel_requested THEN
        PERFORM pg_notify('pictor_jobs', 'cancel:' || NEW.id);
    END IF;
    IF NEW.webhook_status = 'pending' AND (TG_OP = 'INSERT' OR OLD.webhook_status <> 'pending') THEN
        PERFORM pg_notify('pictor_jobs', 'webhook:' || NEW.id);
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER jobs_notify AFTER INSERT OR UPDATE ON jobs FOR EACH ROW EXECUTE FUNCTION pictor_notify();
