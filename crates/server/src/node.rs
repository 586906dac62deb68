//! One node of a deployment: what its workers and its HTTP handlers both stand on — settings, the job service,
//! file storage, the generator, metrics and the node's name — with no HTTP state (keys, model loads and readiness
//! live in [`crate::app::App`]). Workers run on a `Node` alone.

use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex};

use crate::backend::Backend;
use crate::config::{Role, ServerConfig};
use crate::jobs::service::JobService;
use crate::metrics::Metrics;
use crate::net_guard::{Limits, UrlPolicy};
use crate::storage::{ObjectStorage, Storage, StorageLocation};
use crate::webhook::WebhookSettings;
use crate::worker::StepClock;

/// What every part of a node shares.
pub struct Node {
    /// Settings.
    pub config: ServerConfig,
    /// The image generator.
    pub backend: Arc<dyn Backend>,
    /// The job lifecycle (store and signals).
    pub jobs: Arc<JobService>,
    /// File storage (a folder or a bucket).
    pub storage: Arc<dyn Storage>,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// This process's name among the nodes (`--server-name` or the host name, then the process id).
    pub name: String,
    /// Jobs this process is generating now.
    pub busy: AtomicI64,
    /// Seconds per denoising step, for `eta`.
    pub clock: Mutex<StepClock>,
    /// When this node last pulled the shared models (one pull at a time).
    last_pull: tokio::sync::Mutex<Option<std::time::Instant>>,
    /// Pixels being decoded at once (init images, uploads), across requests.
    pub decode_budget: crate::init_image::DecodeBudget,
    /// Free space on the local disks the service writes to: new jobs are refused while one is nearly full.
    pub disk: crate::disk_space::DiskGuard,
}

/// How long a starting process waits for a job store that answers "not now" (locked by another process,
/// restarting, out of disk) before giving up.
const STORE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(120);

/// Runs `op` again while the job store answers "not now", up to [`STORE_PATIENCE`]; `what` names it in the log.
async fn patiently<T, F, Fut>(what: &str, mut op: F) -> crate::jobs::StoreResult<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = crate::jobs::StoreResult<T>>,
{
    let until = std::time::Instant::now() + STORE_PATIENCE;
    let mut pause = std::time::Duration::from_millis(250);
    loop {
        match op().await {
            Err(e) if e.is_transient() && std::time::Instant::now() < until => {
                tracing::warn!(error = %e, "cannot {what} yet; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(5));
            }
            other => return other,
        }
    }
}

/// How often a worker looks for models other nodes published, at most.
const PULL_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

impl Node {
    /// Opens the job store `config.database_url()` and the storage `config.storage` (default: `DATA/files`). On a
    /// store no other process shares, whatever it shows running was left by a process that died: it is queued
    /// again (or failed after its last attempt).
    pub async fn open(config: ServerConfig, backend: Arc<dyn Backend>) -> anyhow::Result<Node> {
        std::fs::create_dir_all(&config.data_dir)?;
        let url = config.database_url();
        let jobs = patiently("open the job store", || JobService::open(&url)).await?;
        if !jobs.is_shared() {
            if config.role != Role::All {
                anyhow::bail!(
                    "--role api and --role worker need a job store shared by every node: give --database-url \
                     postgres://..."
                );
            }
            let ended = patiently("end the previous process's leases", || {
                jobs.store().expire_leases()
            })
            .await?;
            let reaped =
                patiently("queue its jobs again", || jobs.reap(config.max_attempts)).await?;
            if ended > 0 {
                tracing::warn!(
                    requeued = reaped.requeued.len(),
                    abandoned = reaped.failed.len(),
                    "jobs left running by a previous process were queued again (or failed after their last attempt)"
                );
            }
        }
        let location = match &config.storage {
            Some(spec) => StorageLocation::parse(spec).map_err(anyhow::Error::msg)?,
            None => StorageLocation::Folder(config.data_dir.join("files")),
        };
        let storage =
            ObjectStorage::open(&location, &config.public_url).map_err(anyhow::Error::msg)?;
        let mut local_folders = vec![config.data_dir.clone()];
        local_folders.extend(crate::disk_space::sqlite_folder(&config.database_url()));
        if let StorageLocation::Folder(root) = &location {
            local_folders.push(root.clone());
        }
        let disk = crate::disk_space::DiskGuard::new(local_folders, config.min_free_disk_bytes);
        let name = format!(
            "{}-{}",
            config.server_name.clone().unwrap_or_else(host_name),
            std::process::id()
        );
        // Every image the size limit allows must fit the budget on its own.
        let decode_budget = crate::init_image::DecodeBudget::new(
            config.decode_budget_pixels.max(config.max_image_pixels),
            std::time::Duration::from_secs(30),
        );
        Ok(Node {
            config,
            backend,
            jobs: Arc::new(jobs),
            storage: Arc::new(storage),
            metrics: Metrics::new(),
            name,
            busy: AtomicI64::new(0),
            clock: Mutex::new(StepClock::default()),
            last_pull: tokio::sync::Mutex::new(None),
            decode_budget,
            disk,
        })
    }

    /// Whether models are shared through the file storage: on a shared job store, with a models folder.
    fn shares_models(&self) -> Option<std::path::PathBuf> {
        self.jobs
            .is_shared()
            .then(|| self.backend.models_root())
            .flatten()
    }

    /// Pulls the models other nodes published that this node lacks (at most every few seconds unless `now`);
    /// says whether anything arrived.
    pub async fn pull_models(&self, now: bool) -> bool {
        let Some(root) = self.shares_models() else {
            return false;
        };
        let mut last = self.last_pull.lock().await;
        if !now && last.is_some_and(|t| t.elapsed() < PULL_EVERY) {
            return false;
        }
        let pulled = crate::shared_models::pull(self.storage.as_ref(), &root).await;
        *last = Some(std::time::Instant::now());
        match pulled {
            Ok(synced) => !synced.files.is_empty(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot pull the shared models");
                false
            }
        }
    }

    /// Before a job for `model_id`: pulls what other nodes published since the last look, at once when this
    /// node does not have the model. Nothing (not even a look at the models folder) when models are not shared.
    pub async fn pull_models_for(&self, model_id: &str) {
        if self.shares_models().is_none() {
            return;
        }
        let backend = self.backend.clone();
        let wanted = model_id.to_string();
        let known = tokio::task::spawn_blocking(move || backend.models())
            .await
            .ok()
            .and_then(Result::ok)
            .is_some_and(|models| models.iter().any(|m| m.id == wanted));
        self.pull_models(!known).await;
    }

    /// Removes checkpoint `id` from the shared storage, when models are shared.
    pub async fn unpublish_model(&self, id: &str) -> Result<(), String> {
        if self.shares_models().is_some() {
            crate::shared_models::unpublish_checkpoint(self.storage.as_ref(), id).await?;
        }
        Ok(())
    }

    /// Publishes the models this node has that the storage lacks; `Ok(None)` when models are not shared.
    pub async fn publish_models(&self) -> Result<Option<crate::shared_models::Synced>, String> {
        match self.shares_models() {
            Some(root) => crate::shared_models::publish(self.storage.as_ref(), &root)
                .await
                .map(Some),
            None => Ok(None),
        }
    }

    /// The address policy for `init_image`, webhook and bucket URLs.
    pub fn url_policy(&self) -> UrlPolicy {
        UrlPolicy {
            allow_private: self.config.allow_private_urls,
        }
    }

    /// Bounds for downloading an init image.
    pub fn download_limits(&self) -> Limits {
        Limits {
            timeout: std::time::Duration::from_secs(30),
            max_bytes: self.config.max_download_bytes,
            max_redirects: 3,
        }
    }

    /// How webhooks are sent.
    pub fn webhook_settings(&self) -> WebhookSettings {
        WebhookSettings {
            attempts: self.config.webhook_attempts,
            backoff: self.config.webhook_backoff,
            timeout: self.config.webhook_timeout,
            policy: self.url_policy(),
        }
    }
}

/// The machine's host name, or "pictor".
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "pictor".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Connection as _;

    /// A restart while another process holds the job database's write lock (a backup, an operator's shell, the
    /// load and fault run's `--lock-db`) used to end the new process at once with "database is locked"; it now
    /// waits for the lock.
    #[tokio::test]
    async fn a_starting_process_waits_for_a_locked_job_store() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.db");
        let url = format!("sqlite:{}", path.display());
        let jobs = JobService::open(&url).await.unwrap();

        let mut other = sqlx::SqliteConnection::connect(&url).await.unwrap();
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut other)
            .await
            .unwrap();
        let held = std::time::Duration::from_secs(12);
        let release = tokio::spawn(async move {
            tokio::time::sleep(held).await;
            sqlx::query("COMMIT").execute(&mut other).await.unwrap();
        });

        // The store's own busy wait (10 s) is shorter than the lock: one try fails, and says "not now".
        let started = std::time::Instant::now();
        let once = jobs.store().expire_leases().await.unwrap_err();
        assert!(once.is_transient(), "{once}");
        // Trying patiently gets through once the lock is released.
        patiently("end leases", || jobs.store().expire_leases())
            .await
            .unwrap();
        assert!(started.elapsed() >= held);
        release.await.unwrap();
    }
}
