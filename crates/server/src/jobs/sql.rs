//! The job store's statements, written once for both databases. They differ in three places only, which each
//! store names in its [`Dialect`]: the clock, the row lock a claim takes, and how a JSON list is matched. The
//! [`job_store!`] macro implements [`JobStore`](super::JobStore) over a store's concrete pool with these
//! statements (a macro rather than generics over `sqlx::Database`, whose bounds would outweigh the code).

/// How one database spells the parts that differ.
pub struct Dialect {
    /// Seconds since the Unix epoch, as a SQL expression on the database's clock.
    pub now: &'static str,
    /// Appended to the claim's row selection: takes the row lock, skipping rows other workers hold.
    pub lock: &'static str,
    /// `model_id IN (…)` over a JSON array bound as `$2` in the claim.
    pub in_json_list: &'static str,
    /// A statement that serialises one owner's inserts until the transaction ends (`$1` the owner), where
    /// concurrent writers could otherwise both pass the per-key limit; `None` where writes are serial already.
    pub owner_lock: Option<&'static str>,
}

/// What a job that just ended sets: its webhook, if it asked for one, becomes due now.
const WEBHOOK_DUE: &str = "webhook_status = CASE WHEN webhook_status = 'waiting' THEN 'pending' \
    ELSE webhook_status END, webhook_due = NOW()";

impl Dialect {
    /// `statement` with the shared fragment and the dialect's parts written in: `/*WEBHOOK_DUE*/`, the clock
    /// (`NOW()`), the claim's lock (`/*LOCK*/`) and the loaded-model match (`/*MODEL_LOADED*/`).
    pub fn sql(&self, statement: &str) -> String {
        statement
            .replace("/*WEBHOOK_DUE*/", WEBHOOK_DUE)
            .replace("NOW()", self.now)
            .replace("/*LOCK*/", self.lock)
            .replace("/*MODEL_LOADED*/", self.in_json_list)
    }
}

/// Queues a job unless its owner already has `$6` queued or running, or a job with idempotency key `$7`.
/// `$1` owner, `$2` spec, `$3` model, `$4` group, `$5` webhook state, `$7` idempotency key (or NULL).
pub const INSERT_WITHIN: &str = "
INSERT INTO jobs (owner, status, spec, model_id, pinned_group, webhook_status, created_at, idempotency_key)
SELECT $1, 'queued', $2, $3, $4, $5, NOW(), $7
WHERE (SELECT COUNT(*) FROM jobs WHERE owner = $1 AND status IN ('queued', 'running')) < $6
    AND NOT EXISTS (SELECT 1 FROM jobs WHERE owner = $1 AND idempotency_key = $7)
RETURNING id";

/// Frees idempotency key `$2` of owner `$1` from a job older than `$3` seconds (the key's window).
pub const EXPIRE_IDEMPOTENCY: &str = "
UPDATE jobs SET idempotency_key = NULL WHERE owner = $1 AND idempotency_key = $2 AND created_at < NOW() - $3";

/// The job holding idempotency key `$2` of owner `$1`.
pub const BY_IDEMPOTENCY: &str = "SELECT id FROM jobs WHERE owner = $1 AND idempotency_key = $2";

/// Puts the next job a worker may run under its lease: keys take turns, then loaded models, then age.
/// `$1` worker group, `$2` loaded models (JSON), `$3` worker name, `$4` lease seconds.
pub const CLAIM: &str = "
UPDATE jobs SET status = 'running', attempt = attempt + 1, worker = $3, lease_until = NOW() + $4,
    started_at = NOW(), step = 0, steps = 0, cancel_requested = FALSE
WHERE id = (
    SELECT j.id FROM jobs j LEFT JOIN key_turns t ON t.owner = j.owner
    WHERE j.status = 'queued' AND (j.pinned_group IS NULL OR j.pinned_group = $1)
    ORDER BY COALESCE(t.last_claim, 0), CASE WHEN /*MODEL_LOADED*/ THEN 0 ELSE 1 END, j.id
    LIMIT 1 /*LOCK*/
) AND status = 'queued'
RETURNING *";

/// The claimed job's key had its turn: it goes to the back of the line (a counter, not the clock, so that two
/// claims in the same millisecond still take turns). `$1` owner.
pub const TAKE_TURN: &str = "
INSERT INTO key_turns (owner, last_claim) VALUES ($1, (SELECT COALESCE(MAX(last_claim), 0) + 1 FROM key_turns))
ON CONFLICT (owner) DO UPDATE SET last_claim = excluded.last_claim";

/// Extends a lease and records progress. `$1` id, `$2` attempt, `$3` step, `$4` steps, `$5` lease seconds.
pub const HEARTBEAT: &str = "
UPDATE jobs SET lease_until = NOW() + $5, step = $3, steps = $4
WHERE id = $1 AND attempt = $2 AND status = 'running'
RETURNING cancel_requested";

/// Records an outcome from the current attempt only; a failure after a cancel keeps the cancel's message.
/// `$1` id, `$2` attempt, `$3` status, `$4` result, `$5` error.
pub const FINISH: &str = "
UPDATE jobs SET status = $3, result = $4,
    error = CASE WHEN $3 = 'failed' AND cancel_requested AND error IS NOT NULL THEN error ELSE $5 END,
    finished_at = NOW(), lease_until = NULL,
    /*WEBHOOK_DUE*/
WHERE id = $1 AND attempt = $2 AND status = 'running'";

/// Fails a queued job at once. `$1` id, `$2` message.
pub const DEQUEUE: &str = "
UPDATE jobs SET status = 'failed', error = $2, finished_at = NOW(),
    /*WEBHOOK_DUE*/
WHERE id = $1 AND status = 'queued'";

/// Flags a running job for its worker; the message becomes its error. `$1` id, `$2` message.
pub const FLAG_CANCEL: &str = "
UPDATE jobs SET cancel_requested = TRUE, error = $2 WHERE id = $1 AND status = 'running'";

/// Fails every queued job. `$1` message.
pub const DEQUEUE_ALL: &str = "
UPDATE jobs SET status = 'failed', error = $1, finished_at = NOW(),
    /*WEBHOOK_DUE*/
WHERE status = 'queued'
RETURNING id";

/// Flags every running job. `$1` message.
pub const FLAG_CANCEL_ALL: &str = "
UPDATE jobs SET cancel_requested = TRUE, error = $1 WHERE status = 'running' RETURNING id";

/// Jobs whose lease expired: back to the queue, or failed after the last attempt or a cancel.
/// `$1` max attempts, `$2` message for abandoned jobs.
pub const REAP: &str = "
UPDATE jobs SET
    status = CASE WHEN attempt >= $1 OR cancel_requested THEN 'failed' ELSE 'queued' END,
    error = CASE WHEN cancel_requested THEN error WHEN attempt >= $1 THEN $2 ELSE NULL END,
    finished_at = CASE WHEN attempt >= $1 OR cancel_requested THEN NOW() ELSE NULL END,
    webhook_status = CASE WHEN (attempt >= $1 OR cancel_requested) AND webhook_status = 'waiting'
        THEN 'pending' ELSE webhook_status END,
    webhook_due = NOW(),
    lease_until = NULL, started_at = NULL
WHERE status = 'running' AND lease_until < NOW()
RETURNING id, status";

/// Ends every lease (single-process start).
pub const EXPIRE_LEASES: &str = "UPDATE jobs SET lease_until = 0 WHERE status = 'running'";

/// Jobs of one owner still to finish. `$1` owner.
pub const ACTIVE_FOR_OWNER: &str =
    "SELECT COUNT(*) FROM jobs WHERE owner = $1 AND status IN ('queued', 'running')";

/// (queued, running).
pub const DEPTH: &str = "
SELECT COUNT(*) FILTER (WHERE status = 'queued'), COUNT(*) FILTER (WHERE status = 'running')
FROM jobs WHERE status IN ('queued', 'running')";

/// Queued jobs older than `$1`.
pub const AHEAD_OF: &str = "SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND id < $1";

/// Jobs finished before `$1`, their webhooks settled.
pub const DELETE_FINISHED: &str = "
DELETE FROM jobs WHERE status IN ('success', 'failed') AND finished_at < $1
    AND webhook_status NOT IN ('waiting', 'pending')";

/// Holds the oldest due webhook for `$1` seconds, for one more attempt.
pub const CLAIM_WEBHOOK: &str = "
UPDATE jobs SET webhook_due = NOW() + $1, webhook_attempts = webhook_attempts + 1
WHERE id = (
    SELECT j.id FROM jobs j WHERE j.webhook_status = 'pending' AND j.webhook_due <= NOW()
    ORDER BY j.webhook_due LIMIT 1 /*LOCK*/
) AND webhook_status = 'pending'
RETURNING *";

/// Schedules the next webhook attempt in `$2` seconds. `$1` id.
pub const RETRY_WEBHOOK: &str =
    "UPDATE jobs SET webhook_due = NOW() + $2 WHERE id = $1 AND webhook_status = 'pending'";

/// Ends every webhook hold (single-process start).
pub const RELEASE_WEBHOOKS: &str =
    "UPDATE jobs SET webhook_due = NOW() WHERE webhook_status = 'pending'";

/// Records a webhook outcome. `$1` id, `$2` status.
pub const SET_WEBHOOK: &str =
    "UPDATE jobs SET webhook_status = $2, webhook_due = NULL WHERE id = $1";

/// A worker's report. `$1` name, `$2` group, `$3` models (JSON), `$4` running, `$5` seconds per step.
pub const WORKER_SEEN: &str = "
INSERT INTO workers (name, worker_group, models, running, seconds_per_step, seen_at)
VALUES ($1, $2, $3, $4, $5, NOW())
ON CONFLICT (name) DO UPDATE SET worker_group = excluded.worker_group, models = excluded.models,
    running = excluded.running, seconds_per_step = excluded.seconds_per_step, seen_at = excluded.seen_at";

/// Workers seen in the last `$1` seconds.
pub const LIVE_WORKERS: &str = "
SELECT name, worker_group, models, running, seconds_per_step, seen_at FROM workers
WHERE seen_at >= NOW() - $1 ORDER BY name";

/// Takes or renews a task's term. `$1` task, `$2` holder, `$3` seconds.
pub const LEAD: &str = "
INSERT INTO leaders (task, holder, until) VALUES ($1, $2, NOW() + $3)
ON CONFLICT (task) DO UPDATE SET holder = excluded.holder, until = excluded.until
WHERE leaders.until < NOW() OR leaders.holder = excluded.holder";

/// Stores the generated admin key's hash unless one is stored. `$1` hex SHA-256.
pub const ADOPT_KEY: &str =
    "INSERT INTO generated_keys (slot, sha256) VALUES (1, $1) ON CONFLICT (slot) DO NOTHING";

/// The stored generated admin key's hash.
pub const GENERATED_KEY: &str = "SELECT sha256 FROM generated_keys WHERE slot = 1";

/// Sets a destination. `$1` owner, `$2` deploy type, `$3` settings.
pub const SET_DESTINATION: &str = "
INSERT INTO destinations (owner, deploy_type, settings) VALUES ($1, $2, $3)
ON CONFLICT (owner, deploy_type) DO UPDATE SET settings = excluded.settings";

/// Removes a destination. `$1` owner, `$2` deploy type.
pub const RESET_DESTINATION: &str =
    "DELETE FROM destinations WHERE owner = $1 AND deploy_type = $2";

/// A destination. `$1` owner, `$2` deploy type.
pub const DESTINATION: &str =
    "SELECT settings FROM destinations WHERE owner = $1 AND deploy_type = $2";

/// Implements [`JobStore`](super::JobStore) for `$store`, whose field `pool` is a `sqlx::Pool<$db>` and whose
/// constant `DIALECT` is its [`Dialect`].
macro_rules! job_store {
    ($store:ty, $row:ty) => {
        #[async_trait::async_trait]
        impl $crate::jobs::JobStore for $store {
            async fn insert(
                &self,
                owner: &str,
                spec: &$crate::jobs::JobSpec,
                group: Option<&str>,
            ) -> $crate::jobs::StoreResult<i64> {
                match self.insert_within(owner, spec, group, i64::MAX).await? {
                    $crate::jobs::Inserted::New(id) | $crate::jobs::Inserted::Existing(id) => {
                        Ok(id)
                    }
                    $crate::jobs::Inserted::Full => unreachable!("no limit"),
                }
            }

            async fn insert_within(
                &self,
                owner: &str,
                spec: &$crate::jobs::JobSpec,
                group: Option<&str>,
                limit: i64,
            ) -> $crate::jobs::StoreResult<$crate::jobs::Inserted> {
                let text = serde_json::to_string(spec)?;
                let key = spec.delivery.idempotency_key.as_deref();
                let mut tx = self.pool.begin().await?;
                if let Some(lock) = Self::DIALECT.owner_lock {
                    sqlx::query(lock).bind(owner).execute(&mut *tx).await?;
                }
                if let Some(key) = key {
                    sqlx::query(&Self::DIALECT.sql($crate::jobs::sql::EXPIRE_IDEMPOTENCY))
                        .bind(owner)
                        .bind(key)
                        .bind($crate::jobs::IDEMPOTENCY_WINDOW.as_secs_f64())
                        .execute(&mut *tx)
                        .await?;
                }
                let row = sqlx::query(&Self::DIALECT.sql($crate::jobs::sql::INSERT_WITHIN))
                    .bind(owner)
                    .bind(text)
                    .bind(&spec.request.model_id)
                    .bind(group)
                    .bind($crate::jobs::webhook_state(spec))
                    .bind(limit)
                    .bind(key)
                    .fetch_optional(&mut *tx)
                    .await?;
                let inserted = match (row, key) {
                    (Some(row), _) => $crate::jobs::Inserted::New(sqlx::Row::try_get(&row, 0)?),
                    (None, Some(key)) => {
                        let existing =
                            sqlx::query(&Self::DIALECT.sql($crate::jobs::sql::BY_IDEMPOTENCY))
                                .bind(owner)
                                .bind(key)
                                .fetch_optional(&mut *tx)
                                .await?;
                        match existing {
                            Some(row) => {
                                $crate::jobs::Inserted::Existing(sqlx::Row::try_get(&row, 0)?)
                            }
                            None => $crate::jobs::Inserted::Full,
                        }
                    }
                    (None, None) => $crate::jobs::Inserted::Full,
                };
                tx.commit().await?;
                Ok(inserted)
            }

            async fn get(&self, id: i64) -> $crate::jobs::StoreResult<Option<$crate::jobs::Job>> {
                sqlx::query_as::<_, $crate::jobs::JobRow>("SELECT * FROM jobs WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await?
                    .map($crate::jobs::JobRow::into_job)
                    .transpose()
            }

            async fn claim(
                &self,
                worker: &$crate::jobs::WorkerInfo,
                lease: std::time::Duration,
            ) -> $crate::jobs::StoreResult<Option<$crate::jobs::Job>> {
                let models = serde_json::to_string(&worker.loaded_models)?;
                let mut tx = self.pool.begin().await?;
                let row = sqlx::query_as::<_, $crate::jobs::JobRow>(
                    &Self::DIALECT.sql($crate::jobs::sql::CLAIM),
                )
                .bind(worker.group.as_deref())
                .bind(models)
                .bind(&worker.name)
                .bind(lease.as_secs_f64())
                .fetch_optional(&mut *tx)
                .await?;
                let Some(row) = row else {
                    tx.rollback().await?;
                    return Ok(None);
                };
                sqlx::query(&Self::DIALECT.sql($crate::jobs::sql::TAKE_TURN))
                    .bind(&row.owner)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                row.into_job().map(Some)
            }

            async fn heartbeat(
                &self,
                lease: $crate::jobs::Lease,
                step: i32,
                steps: i32,
                extend: std::time::Duration,
            ) -> $crate::jobs::StoreResult<$crate::jobs::Beat> {
                let row = sqlx::query(&Self::DIALECT.sql($crate::jobs::sql::HEARTBEAT))
                    .bind(lease.id)
                    .bind(lease.attempt)
                    .bind(step)
                    .bind(steps)
                    .bind(extend.as_secs_f64())
                    .fetch_optional(&self.pool)
                    .await?;
                Ok(match row {
                    Some(row) => $crate::jobs::Beat::Held {
                        cancel: sqlx::Row::try_get(&row, 0)?,
                    },
                    None => $crate::jobs::Beat::Lost,
                })
            }

            async fn finish(
                &self,
                lease: $crate::jobs::Lease,
                outcome: &$crate::jobs::Outcome,
            ) -> $crate::jobs::StoreResult<bool> {
                let (status, result, error) = $crate::jobs::outcome_columns(outcome)?;
                let done = sqlx::query(&Self::DIALECT.sql($crate::jobs::sql::FINISH))
                    .bind(lease.id)
                    .bind(lease.attempt)
                    .bind(status)
                    .bind(result)
                    .bind(error)
                    .execute(&self.pool)
                    .await?;
                Ok(done.rows_affected() == 1)
            }

            async fn cancel(
                &self,
                id: i64,
                message: &str,
            ) -> $crate::jobs::StoreResult<$crate::jobs::Cancelled> {
                let dequeued = sqlx::query(&Self::DIALECT.sql($crate::jobs::sql::DEQUEUE))
                    .bind(id)
                    .bind(message)
                    .execute(&self.pool)
                    .await?;
                if dequeued.rows_affected() == 1 {
                    return Ok($crate::jobs::Cancelled::Dequeued);
                }
                let flagged = sqlx::query($crate::jobs::sql::FLAG_CANCEL)
                    .bind(id)
                    .bind(message)
                    .execute(&self.pool)
                    .await?;
                if flagged.rows_affected() == 1 {
                    return Ok($crate::jobs::Cancelled::Stopping);
                }
                Ok(match self.get(id).await? {
                    None => $crate::jobs::Cancelled::NotFound,
                    // Claimed between the two statements: flag it now that it runs.
                    Some(job) if !job.status.is_final() => {
                        sqlx::query($crate::jobs::sql::FLAG_CANCEL)
                            .bind(id)
                            .bind(message)
                            .execute(&self.pool)
                            .await?;
                        $crate::jobs::Cancelled::Stopping
                    }
                    Some(_) => $crate::jobs::Cancelled::AlreadyFinished,
                })
            }

            async fn cancel_all(
                &self,
                message: &str,
            ) -> $crate::jobs::StoreResult<(Vec<i64>, Vec<i64>)> {
                let ids = |rows: Vec<$row>| -> $crate::jobs::StoreResult<Vec<i64>> {
                    rows.iter()
                        .map(|r| sqlx::Row::try_get(r, 0).map_err(Into::into))
                        .collect()
                };
                let dequeued = sqlx::query(&Self::DIALECT.sql($crate::jobs::sql::DEQUEUE_ALL))
                    .bind(message)
                    .fetch_all(&self.pool)
                    .await?;
                let stopping = sqlx::query($crate::jobs::sql::FLAG_CANCEL_ALL)
                    .bind(message)
                    .fetch_all(&self.pool)
                    .await?;
                Ok((ids(dequeued)?, ids(stopping)?))
            }

            async fn reap(
                &self,
                max_attempts: i32,
            ) -> $crate::jobs::StoreResult<$crate::jobs::Reaped> {
                let rows = sqlx::query(&Self::DIALECT.sql($crate::jobs::sql::REAP))
                    .bind(max_attempts)
                    .bind($crate::jobs::abandoned_message(max_attempts))
                    .fetch_all(&self.pool)
                    .await?;
                let mut reaped = $crate::jobs::Reaped::default();
                for row in rows {
                    let id: i64 = sqlx::Row::try_get(&row, 0)?;
                    let status: String = sqlx::Row::try_get(&row, 1)?;
                    if status == "queued" {
                        reaped.requeued.push(id);
                    } else {
                        reaped.failed.push(id);
                    }
                }
                reaped.requeued.sort_unstable();
                reaped.failed.sort_unstable();
                Ok(reaped)
            }

            async fn expire_leases(&self) -> $crate::jobs::StoreResult<u64> {
                let done = sqlx::query($crate::jobs::sql::EXPIRE_LEASES)
                    .execute(&self.pool)
                    .await?;
                sqlx::query(&Self::DIALECT.sql($crate::jobs::sql::RELEASE_WEBHOOKS))
                    .execute(&self.pool)
                    .await?;
                Ok(done.rows_affected())
            }

            async fn active_for_owner(&self, owner: &str) -> $crate::jobs::StoreResult<i64> {
                let row = sqlx::query($crate::jobs::sql::ACTIVE_FOR_OWNER)
                    .bind(owner)
                    .fetch_one(&self.pool)
                    .await?;
                Ok(sqlx::Row::try_get(&row, 0)?)
            }

            async fn depth(&self) -> $crate::jobs::StoreResult<(i64, i64)> {
                let row = sqlx::query($crate::jobs::sql::DEPTH)
                    .fetch_one(&self.pool)
                    .await?;
                Ok((sqlx::Row::try_get(&row, 0)?, sqlx::Row::try_get(&row, 1)?))
            }

            async fn ahead_of(&self, id: i64) -> $crate::jobs::StoreResult<i64> {
                let row = sqlx::query($crate::jobs::sql::AHEAD_OF)
                    .bind(id)
                    .fetch_one(&self.pool)
                    .await?;
                Ok(sqlx::Row::try_get(&row, 0)?)
            }

            async fn delete_finished_before(&self, before: f64) -> $crate::jobs::StoreResult<u64> {
                let done = sqlx::query($crate::jobs::sql::DELETE_FINISHED)
                    .bind(before)
                    .execute(&self.pool)
                    .await?;
                Ok(done.rows_affected())
            }

            async fn claim_webhook(
                &self,
                lease: std::time::Duration,
            ) -> $crate::jobs::StoreResult<Option<$crate::jobs::Job>> {
                sqlx::query_as::<_, $crate::jobs::JobRow>(
                    &Self::DIALECT.sql($crate::jobs::sql::CLAIM_WEBHOOK),
                )
                .bind(lease.as_secs_f64())
                .fetch_optional(&self.pool)
                .await?
                .map($crate::jobs::JobRow::into_job)
                .transpose()
            }

            async fn retry_webhook(
                &self,
                id: i64,
                after: std::time::Duration,
            ) -> $crate::jobs::StoreResult<()> {
                sqlx::query(&Self::DIALECT.sql($crate::jobs::sql::RETRY_WEBHOOK))
                    .bind(id)
                    .bind(after.as_secs_f64())
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn set_webhook_status(
                &self,
                id: i64,
                status: &str,
            ) -> $crate::jobs::StoreResult<()> {
                sqlx::query($crate::jobs::sql::SET_WEBHOOK)
                    .bind(id)
                    .bind(status)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn worker_seen(
                &self,
                worker: &$crate::jobs::WorkerInfo,
                running: i64,
                seconds_per_step: Option<f64>,
            ) -> $crate::jobs::StoreResult<()> {
                sqlx::query(&Self::DIALECT.sql($crate::jobs::sql::WORKER_SEEN))
                    .bind(&worker.name)
                    .bind(worker.group.as_deref())
                    .bind(serde_json::to_string(&worker.loaded_models)?)
                    .bind(running)
                    .bind(seconds_per_step)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn live_workers(
                &self,
                within: std::time::Duration,
            ) -> $crate::jobs::StoreResult<Vec<$crate::jobs::WorkerRecord>> {
                let rows = sqlx::query(&Self::DIALECT.sql($crate::jobs::sql::LIVE_WORKERS))
                    .bind(within.as_secs_f64())
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter()
                    .map(|row| {
                        let models: String = sqlx::Row::try_get(row, 2)?;
                        Ok($crate::jobs::WorkerRecord {
                            name: sqlx::Row::try_get(row, 0)?,
                            group: sqlx::Row::try_get(row, 1)?,
                            models: serde_json::from_str(&models)?,
                            running: sqlx::Row::try_get(row, 3)?,
                            seconds_per_step: sqlx::Row::try_get(row, 4)?,
                            seen_at: sqlx::Row::try_get(row, 5)?,
                        })
                    })
                    .collect()
            }

            async fn lead(
                &self,
                task: &str,
                holder: &str,
                term: std::time::Duration,
            ) -> $crate::jobs::StoreResult<bool> {
                let done = sqlx::query(&Self::DIALECT.sql($crate::jobs::sql::LEAD))
                    .bind(task)
                    .bind(holder)
                    .bind(term.as_secs_f64())
                    .execute(&self.pool)
                    .await?;
                Ok(done.rows_affected() == 1)
            }

            async fn adopt_admin_key(&self, sha256: &str) -> $crate::jobs::StoreResult<String> {
                sqlx::query($crate::jobs::sql::ADOPT_KEY)
                    .bind(sha256)
                    .execute(&self.pool)
                    .await?;
                let row = sqlx::query($crate::jobs::sql::GENERATED_KEY)
                    .fetch_one(&self.pool)
                    .await?;
                Ok(sqlx::Row::try_get(&row, 0)?)
            }

            async fn set_destination(
                &self,
                owner: &str,
                deploy_type: &str,
                settings: Option<&str>,
            ) -> $crate::jobs::StoreResult<()> {
                match settings {
                    Some(settings) => {
                        sqlx::query($crate::jobs::sql::SET_DESTINATION)
                            .bind(owner)
                            .bind(deploy_type)
                            .bind(settings)
                            .execute(&self.pool)
                            .await?
                    }
                    None => {
                        sqlx::query($crate::jobs::sql::RESET_DESTINATION)
                            .bind(owner)
                            .bind(deploy_type)
                            .execute(&self.pool)
                            .await?
                    }
                };
                Ok(())
            }

            async fn destination(
                &self,
                owner: &str,
                deploy_type: &str,
            ) -> $crate::jobs::StoreResult<Option<String>> {
                let row = sqlx::query($crate::jobs::sql::DESTINATION)
                    .bind(owner)
                    .bind(deploy_type)
                    .fetch_optional(&self.pool)
                    .await?;
                Ok(match row {
                    Some(row) => Some(sqlx::Row::try_get(&row, 0)?),
                    None => None,
                })
            }
        }
    };
}
pub(crate) use job_store;
