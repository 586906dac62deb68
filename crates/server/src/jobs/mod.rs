//! The job store: every accepted request is a job row before it is answered, so nothing accepted is lost when the
//! process dies. The embedded implementation is SQLite ([`sqlite::SqliteJobs`]); the trait is what a PostgreSQL
//! store for several machines implements.

pub mod sqlite;

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
    /// Storage key of the stored init image.
    pub init_key: String,
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
    /// What it produced, once successful.
    pub result: Option<JobResult>,
    /// Why it failed.
    pub error: Option<String>,
    /// Webhook delivery outcome ("" when none was asked for or not yet sent).
    pub webhook_status: String,
    /// Seconds since the Unix epoch.
    pub created_at: f64,
    /// When it finished.
    pub finished_at: Option<f64>,
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
pub type StoreResult<T> = Result<T, String>;

/// Persistent job queue and record.
#[async_trait]
pub trait JobStore: Send + Sync + 'static {
    /// Stores a new queued job and returns its id.
    async fn insert(&self, owner: &str, spec: &JobSpec) -> StoreResult<i64>;
    /// One job.
    async fn get(&self, id: i64) -> StoreResult<Option<Job>>;
    /// Takes the oldest queued job and marks it running.
    async fn claim_next(&self) -> StoreResult<Option<Job>>;
    /// Records how a running job ended (ignored if the job is no longer running, e.g. cancelled).
    async fn finish(&self, id: i64, outcome: &Outcome) -> StoreResult<bool>;
    /// Records the webhook outcome.
    async fn set_webhook_status(&self, id: i64, status: &str) -> StoreResult<()>;
    /// Puts jobs left running by a dead process back in the queue; returns how many.
    async fn requeue_running(&self) -> StoreResult<u64>;
    /// Jobs of `owner` queued or running.
    async fn active_for_owner(&self, owner: &str) -> StoreResult<i64>;
    /// (queued, running) counts.
    async fn depth(&self) -> StoreResult<(i64, i64)>;
    /// Queued jobs older than `id`.
    async fn ahead_of(&self, id: i64) -> StoreResult<i64>;
    /// Fails every queued job with `message`; returns their ids.
    async fn fail_queued(&self, message: &str) -> StoreResult<Vec<i64>>;
    /// Deletes jobs that finished before `before` (epoch seconds); returns how many.
    async fn delete_finished_before(&self, before: f64) -> StoreResult<u64>;
}

/// Seconds since the Unix epoch.
pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}
