//! The job service: the one way the HTTP handlers and the workers change jobs. It wraps a [`JobStore`] with the
//! [`Signals`] that make waiting cheap (a worker waking for a queued job, a synchronous request waking when its
//! job finishes, a worker stopping a cancelled job), whether the change was made in this process or, through
//! PostgreSQL's notifications, on another machine. Every wait also polls, so a lost signal only costs latency.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, Notify};

use super::postgres::PostgresJobs;
use super::sqlite::SqliteJobs;
use super::{
    Cancelled, Inserted, Job, JobSpec, JobStore, Lease, Outcome, Reaped, StoreError, StoreResult,
};

/// How often a waiter looks at the store when no signal came.
pub const POLL: Duration = Duration::from_secs(1);

/// In-process announcements of job changes.
pub struct Signals {
    queued: Notify,
    webhook: Notify,
    finished: broadcast::Sender<i64>,
    cancel: broadcast::Sender<i64>,
}

impl Default for Signals {
    fn default() -> Self {
        Signals {
            queued: Notify::new(),
            webhook: Notify::new(),
            finished: broadcast::channel(1024).0,
            cancel: broadcast::channel(256).0,
        }
    }
}

impl Signals {
    /// A job was queued: wake idle workers.
    pub fn queued(&self) {
        self.queued.notify_waiters();
        self.queued.notify_one();
    }

    /// A webhook became due.
    pub fn webhook_due(&self) {
        self.webhook.notify_waiters();
        self.webhook.notify_one();
    }

    /// Job `id` finished.
    pub fn finished(&self, id: i64) {
        let _ = self.finished.send(id);
    }

    /// Job `id` was asked to stop.
    pub fn cancel(&self, id: i64) {
        let _ = self.cancel.send(id);
    }

    /// Applies a notification from the database (`queued:ID`, `finished:ID`, `cancel:ID`, `webhook:ID`).
    pub fn announce(&self, payload: &str) {
        let Some((what, id)) = payload.split_once(':') else {
            return;
        };
        let Ok(id) = id.parse::<i64>() else {
            return;
        };
        match what {
            "queued" => self.queued(),
            "finished" => self.finished(id),
            "cancel" => self.cancel(id),
            "webhook" => self.webhook_due(),
            _ => {}
        }
    }

    /// Notifications may have been lost: wake everyone who can look for themselves.
    pub fn announce_all(&self) {
        self.queued();
        self.webhook_due();
    }

    /// Resolves when a job may have been queued, or after `POLL` × 2.
    pub async fn next_queued(&self) {
        let _ = tokio::time::timeout(POLL * 2, self.queued.notified()).await;
    }

    /// Resolves when a webhook may be due, or after `POLL` × 2.
    pub async fn next_webhook(&self) {
        let _ = tokio::time::timeout(POLL * 2, self.webhook.notified()).await;
    }

    /// Cancels announced from now on.
    pub fn cancels(&self) -> broadcast::Receiver<i64> {
        self.cancel.subscribe()
    }
}

/// The job lifecycle over a store, for handlers and workers alike.
pub struct JobService {
    store: Arc<dyn JobStore>,
    signals: Arc<Signals>,
    shared: bool,
}

impl JobService {
    /// Opens the store a `--database-url` names: `sqlite:PATH` or `postgres://…` (`postgresql://` too), running
    /// its migrations, and on PostgreSQL starts listening for other nodes' changes.
    pub async fn open(url: &str) -> StoreResult<Self> {
        let signals = Arc::new(Signals::default());
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let store = PostgresJobs::connect(url).await?;
            store.listen(signals.clone());
            Ok(JobService {
                store: Arc::new(store),
                signals,
                shared: true,
            })
        } else if let Some(path) = url.strip_prefix("sqlite:") {
            let path = path.trim_start_matches("//");
            let store = SqliteJobs::open(std::path::Path::new(path)).await?;
            Ok(JobService {
                store: Arc::new(store),
                signals,
                shared: false,
            })
        } else {
            Err(StoreError::UnsupportedUrl(url.to_string()))
        }
    }

    /// Whether other processes share the store (PostgreSQL), so that only lease expiry may free a running job.
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    /// The store, for reads and the worker's lease calls.
    pub fn store(&self) -> &dyn JobStore {
        self.store.as_ref()
    }

    /// The signals of this process.
    pub fn signals(&self) -> &Arc<Signals> {
        &self.signals
    }

    /// Queues a job unless `owner` already has `limit` queued or running or a job with the spec's idempotency
    /// key (see [`JobStore::insert_within`]), and wakes a worker.
    pub async fn submit(
        &self,
        owner: &str,
        spec: &JobSpec,
        group: Option<&str>,
        limit: usize,
    ) -> StoreResult<Inserted> {
        let inserted = self
            .store
            .insert_within(owner, spec, group, limit as i64)
            .await?;
        if matches!(inserted, Inserted::New(_)) {
            self.signals.queued();
        }
        Ok(inserted)
    }

    /// The job once it has finished, or as it is after `timeout`; `None` if it does not exist.
    pub async fn wait_final(&self, id: i64, timeout: Duration) -> StoreResult<Option<Job>> {
        let mut finished = self.signals.finished.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let job = self.store.get(id).await?;
            match &job {
                Some(j) if !j.status.is_final() => {}
                _ => return Ok(job),
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(job);
            }
            let wake = (deadline - now).min(POLL);
            let _ = tokio::time::timeout(wake, async {
                loop {
                    match finished.recv().await {
                        Ok(done) if done == id => break,
                        Ok(_) => {}
                        Err(broadcast::error::RecvError::Lagged(_)) => break,
                        Err(broadcast::error::RecvError::Closed) => {
                            std::future::pending::<()>().await
                        }
                    }
                }
            })
            .await;
        }
    }

    /// Cancels one job (see [`JobStore::cancel`]) and tells whoever waits on it.
    pub async fn cancel(&self, id: i64, message: &str) -> StoreResult<Cancelled> {
        let outcome = self.store.cancel(id, message).await?;
        match outcome {
            Cancelled::Dequeued => self.ended(&[id]),
            Cancelled::Stopping => self.signals.cancel(id),
            Cancelled::NotFound | Cancelled::AlreadyFinished => {}
        }
        Ok(outcome)
    }

    /// Cancels every job; returns (dequeued ids, running ids asked to stop).
    pub async fn cancel_all(&self, message: &str) -> StoreResult<(Vec<i64>, Vec<i64>)> {
        let (dequeued, stopping) = self.store.cancel_all(message).await?;
        self.ended(&dequeued);
        for id in &stopping {
            self.signals.cancel(*id);
        }
        Ok((dequeued, stopping))
    }

    /// Records a worker's outcome (only from the lease's current attempt) and tells the waiters.
    pub async fn finish(&self, lease: Lease, outcome: &Outcome) -> StoreResult<bool> {
        let accepted = self.store.finish(lease, outcome).await?;
        if accepted {
            self.ended(&[lease.id]);
        }
        Ok(accepted)
    }

    /// Re-queues (or, after `max_attempts`, fails) the jobs whose lease expired, and tells workers and waiters.
    pub async fn reap(&self, max_attempts: i32) -> StoreResult<Reaped> {
        let reaped = self.store.reap(max_attempts).await?;
        if !reaped.requeued.is_empty() {
            self.signals.queued();
        }
        self.ended(&reaped.failed);
        Ok(reaped)
    }

    /// Jobs that just reached their end: wake whoever waits on them, and the webhook dispatcher.
    fn ended(&self, ids: &[i64]) {
        for id in ids {
            self.signals.finished(*id);
        }
        if !ids.is_empty() {
            self.signals.webhook_due();
        }
    }
}
