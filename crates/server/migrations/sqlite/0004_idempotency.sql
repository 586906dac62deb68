-- A client's retry of a request it sent (same Idempotency-Key header, or same track_id) answers the first job
-- instead of making a second: the key per owner is unique while it is set (keys older than the window are
-- cleared before a new job takes them).
ALTER TABLE jobs ADD COLUMN idempotency_key TEXT;
CREATE UNIQUE INDEX jobs_idempotency ON jobs (owner, idempotency_key) WHERE idempotency_key IS NOT NULL;
