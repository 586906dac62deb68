//! The job store: every accepted request is a job row before it is answered, so nothing accepted is lost when a
//! process dies. Two implementations share one contract: SQLite ([`sqlite::SqliteJobs`], one machine, the default)
//! and PostgreSQL ([`postgres::PostgresJobs`], any number of API and worker nodes).
//!
//! Workers hold a job under a **lease**: [`JobStore::claim`] hands out the job with a new attempt number,
//! [`JobStore::heartbeat`] extends the lease and carries progress and the cancel flag, [`JobStore::reap`] puts jobs
//! whose lease expired back in the queue (then fails them after too many attempts), and [`JobStore::finish`] is
//! accepted only from the current attempt, so a worker that lost its lease can never overwrite a result.

pub mod postgres;
pub mod service;
mod sql;
pub mod sqlite;

#[cfg(test)]
mod contract;

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::backend::GenerationRequest;
use crate::family::Family;
use crate::request::{Delivery, Echo};
/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Waiting for a worker.
    Queued,
    /// A worker is generating it.
    Running,
    /// Outputs are stored.
    Success,
    /// It failed; `error` says why.
    Failed,
}

impl JobStatus {
    /// The text stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Success => "success",
            JobStatus::Failed => "failed",
        }
    }

    /// Parses the stored text.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => JobStatus::Queued,
            "running" => JobStatus::Running,
            "success" => JobStatus::Success,
            "failed" => JobStatus::Failed,
            _ => return None,
        })
    }

    /// Finished one way or the other.
    pub fn is_final(self) -> bool {
        matches!(self, JobStatus::Success | JobStatus::Failed)
    }
}

/// What a job asks for: fixed at accept time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    /// The family whose shapes the answers use.
    pub family: Family,
    /// The generation.
    pub request: GenerationRequest,
    /// How results are delivered.
    pub delivery: Delivery,
    /// Values echoed in `meta`.
    pub echo: Echo,
    /// The uuid every output file name carries.
    pub file_prefix: String,
    /// Storage key of the stored init image (none for text-to-image).
    #[serde(default)]
    pub init_key: Option<String>,
    /// Storage keys the outputs will have (known in advance for `future_links`).
    pub output_keys: Vec<String>,
}

/// What a finished job produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobResult {
    /// Seconds spent generating.
    pub generation_time: f64,
    /// The scheduler that ran.
    pub scheduler: String,
    /// Per image, whether the safety checker flagged it; empty when no check ran.
    #[serde(default)]
    pub nsfw_content_detected: Vec<bool>,
    /// What the backend said about how it served the request (shown as `warnings`).
    #[serde(default)]
    pub notes: Vec<String>,
    /// URLs of the outputs in the key's own bucket (`update_s3`), one per output, when they were written there.
    #[serde(default)]
    pub external_urls: Vec<String>,
}

/// One job as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// The integer id the API hands out.
    pub id: i64,
    /// SHA-256 (hex) of the key that submitted it.
    pub owner: String,
    /// Its state.
    pub status: JobStatus,
    /// What it asks for.
    pub spec: JobSpec,
    /// The worker group it must run on (`None`: any worker).
    pub pinned_group: Option<String>,
    /// What it produced, once successful.
    pub result: Option<JobResult>,
    /// Why it failed.
    pub error: Option<String>,
    /// Webhook delivery state: "" (none asked for), "pending", "success" or "failed".
    pub webhook_status: String,
    /// Seconds since the Unix epoch.
    pub created_at: f64,
    /// When it finished.
    pub finished_at: Option<f64>,
    /// How many times a worker has claimed it (the current lease's attempt number while running).
    pub attempt: i32,
    /// The worker running it (or that ran it last).
    pub worker: Option<String>,
    /// Denoising steps done, as the worker last reported.
    pub step: i32,
    /// Denoising steps in all, as the worker last reported (0 until it starts).
    pub steps: i32,
    /// A cancel was asked for while it ran.
    pub cancel_requested: bool,
    /// Webhook delivery attempts made so far (including one in progress).
    pub webhook_attempts: i32,
}

/// The lease a worker holds on a running job: a write with an older attempt is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// The job.
    pub id: i64,
    /// The attempt the lease belongs to.
    pub attempt: i32,
}

impl Job {
    /// The lease of the attempt this job row describes.
    pub fn lease(&self) -> Lease {
        Lease {
            id: self.id,
            attempt: self.attempt,
        }
    }
}

/// A worker as the store sees it: what it may run and what it has loaded.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkerInfo {
    /// Unique name of the worker process (`--server-name`, or host and pid).
    pub name: String,
    /// The group jobs pinned with `loadbalancer: no` must match (`--server-name`); `None` takes only unpinned
    /// jobs.
    pub group: Option<String>,
    /// Models it has in memory now (jobs for them are preferred).
    pub loaded_models: Vec<String>,
}

/// A live worker's last report, for `system_details`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerRecord {
    /// Its name.
    pub name: String,
    /// Its group.
    pub group: Option<String>,
    /// Models loaded.
    pub models: Vec<String>,
    /// Jobs it is running.
    pub running: i64,
    /// Its measured seconds per denoising step, if it has run one.
    pub seconds_per_step: Option<f64>,
    /// When it last reported (epoch seconds).
    pub seen_at: f64,
}

/// What a heartbeat learnt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beat {
    /// The lease was extended; `cancel` says whether someone asked the job to stop.
    Held {
        /// Stop at the next step.
        cancel: bool,
    },
    /// The lease is gone (expired and reaped, or the job was finished elsewhere): stop and write nothing.
    Lost,
}

/// What a cancel did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancelled {
    /// No such job.
    NotFound,
    /// It had already finished; nothing changed.
    AlreadyFinished,
    /// It was queued and is now failed; it will never run.
    Dequeued,
    /// It is running; its worker stops at the next step (learnt through the heartbeat or a notification).
    Stopping,
}

/// What a reaper pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reaped {
    /// Jobs whose lease expired, queued again.
    pub requeued: Vec<i64>,
    /// Jobs whose lease expired for the last allowed attempt, now failed.
    pub failed: Vec<i64>,
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Outputs stored.
    Success(JobResult),
    /// Failed with this message.
    Failed(String),
}

/// Errors of the job store (always the service's fault, never the requester's).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or refused the statement.
    #[error("job database: {0}")]
    Database(#[from] sqlx::Error),
    /// The embedded migrations could not be applied.
    #[error("job database migration: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    /// A stored row could not be read back (written by an incompatible version, or damaged).
    #[error("job {id} is unreadable: {reason}")]
    Corrupt {
        /// The job.
        id: i64,
        /// What was wrong.
        reason: String,
    },
    /// A value could not be encoded for storage.
    #[error("cannot encode a job: {0}")]
    Encode(#[from] serde_json::Error),
    /// The database URL names no supported store.
    #[error("unsupported job database URL {0:?}: use sqlite:PATH or postgres://...")]
    UnsupportedUrl(String),
}

impl StoreError {
    /// Whether the same call may well succeed later: the database is unreachable, busy, locked, restarting or
    /// out of disk (SQLite's BUSY, LOCKED, FULL and I/O errors; PostgreSQL's connection, insufficient-resources
    /// and shutdown classes). Anything else (a bad statement, a damaged row) will fail again.
    pub fn is_transient(&self) -> bool {
        let e = match self {
            StoreError::Database(e)
            | StoreError::Migration(sqlx::migrate::MigrateError::Execute(e)) => e,
            _ => return false,
        };
        match e {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => true,
            sqlx::Error::Database(db) => {
                let postgres = db
                    .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                    .is_some();
                db.code()
                    .is_some_and(|code| transient_code(&code, postgres))
            }
            _ => false,
        }
    }
}

/// A database error code (PostgreSQL's SQLSTATE when `postgres`, else SQLite's extended result code as a
/// number) that says "not now" rather than "never".
fn transient_code(code: &str, postgres: bool) -> bool {
    if !postgres {
        // The primary code is the low byte: 5 BUSY, 6 LOCKED, 10 IOERR, 13 FULL.
        return code
            .parse::<i64>()
            .is_ok_and(|sqlite| matches!(sqlite & 0xff, 5 | 6 | 10 | 13));
    }
    // PostgreSQL: 08 connection exception, 53 insufficient resources (disk full, out of memory, too many
    // connections), 57P01-57P03 shutting down / cannot connect now, 40001/40P01 serialization and deadlock.
    code.starts_with("08")
        || code.starts_with("53")
        || matches!(code, "57P01" | "57P02" | "57P03" | "40001" | "40P01")
}

/// Result of a job store call.
pub type StoreResult<T> = Result<T, StoreError>;

/// Persistent job queue and record, shared by every node of a deployment.
#[async_trait]
pub trait JobStore: Send + Sync + 'static {
    /// Stores a new queued job (pinned to `group` when given) and returns its id.
    async fn insert(&self, owner: &str, spec: &JobSpec, group: Option<&str>) -> StoreResult<i64>;
    /// Like [`JobStore::insert`], unless `owner` already has `limit` jobs queued or running (`Full`), or a job
    /// with the spec's idempotency key from within [`IDEMPOTENCY_WINDOW`] (`Existing`, that job): the checks and
    /// the insert are one step, so concurrent requests cannot pass the limit, or both take one key, together.
    async fn insert_within(
        &self,
        owner: &str,
        spec: &JobSpec,
        group: Option<&str>,
        limit: i64,
    ) -> StoreResult<Inserted>;
    /// One job.
    async fn get(&self, id: i64) -> StoreResult<Option<Job>>;
    /// Takes the next job `worker` may run and leases it for `lease`: keys take turns (the key served longest
    /// ago first), then jobs for a model the worker has loaded, then the oldest. The job comes back running,
    /// with its new attempt number.
    async fn claim(&self, worker: &WorkerInfo, lease: Duration) -> StoreResult<Option<Job>>;
    /// Extends `lease` by `extend` and records progress; says whether a cancel was asked for.
    async fn heartbeat(
        &self,
        lease: Lease,
        step: i32,
        steps: i32,
        extend: Duration,
    ) -> StoreResult<Beat>;
    /// Records how the leased attempt ended; `false` (and nothing written) when the lease is no longer current.
    /// A job that asked for a webhook becomes due for delivery in the same write.
    async fn finish(&self, lease: Lease, outcome: &Outcome) -> StoreResult<bool>;
    /// Cancels one job: a queued one fails with `message` at once, a running one is flagged for its worker.
    async fn cancel(&self, id: i64, message: &str) -> StoreResult<Cancelled>;
    /// Cancels every job: queued ones fail with `message` (their ids are returned), running ones are flagged
    /// (their ids are returned second).
    async fn cancel_all(&self, message: &str) -> StoreResult<(Vec<i64>, Vec<i64>)>;
    /// Puts running jobs whose lease expired back in the queue, or fails them (with the reason) once they have
    /// been claimed `max_attempts` times.
    async fn reap(&self, max_attempts: i32) -> StoreResult<Reaped>;
    /// Ends every lease and webhook hold now: for a single-process store at start, where whatever is running or
    /// being sent was left by a dead process. Returns how many leases ended.
    async fn expire_leases(&self) -> StoreResult<u64>;
    /// Jobs of `owner` queued or running.
    async fn active_for_owner(&self, owner: &str) -> StoreResult<i64>;
    /// (queued, running) counts.
    async fn depth(&self) -> StoreResult<(i64, i64)>;
    /// Queued jobs older than `id`.
    async fn ahead_of(&self, id: i64) -> StoreResult<i64>;
    /// Deletes jobs that finished before `before` (epoch seconds); returns how many.
    async fn delete_finished_before(&self, before: f64) -> StoreResult<u64>;
    /// Takes a finished job whose webhook is due and holds the delivery for `lease`, counting one more attempt
    /// (a node that dies while sending leaves it to be sent again when the hold ends: at least once).
    async fn claim_webhook(&self, lease: Duration) -> StoreResult<Option<Job>>;
    /// Makes a held webhook due again after `after` (its attempt failed and more are allowed).
    async fn retry_webhook(&self, id: i64, after: Duration) -> StoreResult<()>;
    /// Records the webhook outcome ("success" or "failed").
    async fn set_webhook_status(&self, id: i64, status: &str) -> StoreResult<()>;
    /// Records that `worker` is alive, running `running` jobs at `seconds_per_step`.
    async fn worker_seen(
        &self,
        worker: &WorkerInfo,
        running: i64,
        seconds_per_step: Option<f64>,
    ) -> StoreResult<()>;
    /// Workers seen within `within`.
    async fn live_workers(&self, within: Duration) -> StoreResult<Vec<WorkerRecord>>;
    /// Makes `holder` the one node running `task` for `term` (renewing its own term); `false` while another
    /// holder's term lasts. Used so that one sweeper runs at a time.
    async fn lead(&self, task: &str, holder: &str, term: Duration) -> StoreResult<bool>;
    /// Stores `sha256` as the deployment's generated admin key unless one is stored already; returns the stored
    /// one (so every node starting without keys accepts the same key).
    async fn adopt_admin_key(&self, sha256: &str) -> StoreResult<String>;
    /// Stores (or, with `None`, removes) `owner`'s destination for `deploy_type` (JSON text).
    async fn set_destination(
        &self,
        owner: &str,
        deploy_type: &str,
        settings: Option<&str>,
    ) -> StoreResult<()>;
    /// `owner`'s destination for `deploy_type`, if set.
    async fn destination(&self, owner: &str, deploy_type: &str) -> StoreResult<Option<String>>;
}

/// A job row as both databases return it (same column names and compatible types).
#[derive(sqlx::FromRow)]
struct JobRow {
    id: i64,
    owner: String,
    status: String,
    spec: String,
    pinned_group: Option<String>,
    result: Option<String>,
    error: Option<String>,
    webhook_status: String,
    created_at: f64,
    finished_at: Option<f64>,
    attempt: i32,
    worker: Option<String>,
    step: i32,
    steps: i32,
    cancel_requested: bool,
    webhook_attempts: i32,
}

impl JobRow {
    fn into_job(self) -> StoreResult<Job> {
        let id = self.id;
        let corrupt = |reason: String| StoreError::Corrupt { id, reason };
        Ok(Job {
            id,
            owner: self.owner,
            status: JobStatus::parse(&self.status)
                .ok_or_else(|| corrupt(format!("unknown status {:?}", self.status)))?,
            spec: serde_json::from_str(&self.spec).map_err(|e| corrupt(format!("spec: {e}")))?,
            pinned_group: self.pinned_group,
            result: self
                .result
                .map(|r| serde_json::from_str(&r))
                .transpose()
                .map_err(|e| corrupt(format!("result: {e}")))?,
            error: self.error,
            webhook_status: self.webhook_status,
            created_at: self.created_at,
            finished_at: self.finished_at,
            attempt: self.attempt,
            worker: self.worker,
            step: self.step,
            steps: self.steps,
            cancel_requested: self.cancel_requested,
            webhook_attempts: self.webhook_attempts,
        })
    }
}

/// The columns a finish writes: (status, result JSON, error).
fn outcome_columns(
    outcome: &Outcome,
) -> StoreResult<(&'static str, Option<String>, Option<String>)> {
    Ok(match outcome {
        Outcome::Success(r) => ("success", Some(serde_json::to_string(r)?), None),
        Outcome::Failed(m) => ("failed", None, Some(m.clone())),
    })
}

/// The error a job gets when its lease expired for the last allowed time.
fn abandoned_message(attempts: i32) -> String {
    format!(
        "the job was abandoned: its worker stopped answering {attempts} times (crashed or lost), so it is not \
         tried again"
    )
}

/// Webhook state of a new job: "" when it asked for none; a finish turns "waiting" into "pending".
fn webhook_state(spec: &JobSpec) -> &'static str {
    if spec.delivery.webhook.is_some() {
        WEBHOOK_WAITING
    } else {
        ""
    }
}

/// How long a request's idempotency key answers with its first job.
pub const IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// What [`JobStore::insert_within`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    /// A new job, queued.
    New(i64),
    /// Nothing: the owner's job with the same idempotency key (a retry of the request that made it).
    Existing(i64),
    /// Nothing: the owner's queue is full.
    Full,
}

/// The failure message of a job stopped at its owner's request (or the admin's).
pub const CANCELLED: &str = "Cancelled";

/// How a failure message says the request itself was at fault (found only when the job ran, e.g. a model
/// loaded after the request was accepted cannot run its mode): the prefix, then `field: message`.
const INVALID_REQUEST: &str = "Invalid request: ";

/// The failure message of a job whose request was at fault in `field`.
pub fn invalid_request_failure(field: &str, message: &str) -> String {
    format!("{INVALID_REQUEST}{field}: {message}")
}

/// The field and message of a failure made by [`invalid_request_failure`]; `None` for other failures.
pub fn invalid_request_of(failure: &str) -> Option<(&str, &str)> {
    failure.strip_prefix(INVALID_REQUEST)?.split_once(": ")
}

/// The error a synchronous dialect answers for a failed job: the request's fault as a field error, anything
/// else as the service's.
pub fn failure(error: Option<&str>) -> crate::responses::ApiError {
    let error = error.unwrap_or("the generation failed");
    match invalid_request_of(error) {
        Some((field, message)) => crate::responses::ApiError::field(field, message),
        None => crate::responses::ApiError::Internal(error.to_string()),
    }
}

/// A job that will want its webhook sent once it finishes.
const WEBHOOK_WAITING: &str = "waiting";

/// Seconds since the Unix epoch.
pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::transient_code;

    #[test]
    fn busy_locked_full_and_unreachable_databases_are_worth_a_retry() {
        // SQLite: BUSY, LOCKED, IOERR, FULL and their extended codes (BUSY_SNAPSHOT 517, IOERR_WRITE 778).
        for code in ["5", "6", "10", "13", "517", "778"] {
            assert!(transient_code(code, false), "{code}");
        }
        // SQLite: CONSTRAINT (2067 = CONSTRAINT_UNIQUE), CORRUPT, ERROR.
        for code in ["2067", "11", "1"] {
            assert!(!transient_code(code, false), "{code}");
        }
        // PostgreSQL: disk full, too many connections, connection failure, shutting down, deadlock.
        for code in ["53100", "53300", "08006", "57P01", "40P01"] {
            assert!(transient_code(code, true), "{code}");
        }
        // PostgreSQL: unique violation, syntax error, undefined table.
        for code in ["23505", "42601", "42P01"] {
            assert!(!transient_code(code, true), "{code}");
        }
    }
}
