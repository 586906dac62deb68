//! The running service: shared state, start-up (job store, storage, keys, workers, sweeper) and the HTTP server
//! with graceful shutdown.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::backend::Backend;
use crate::config::{Role, ServerConfig};
use crate::jobs::service::JobService;
use crate::keys::KeyStore;
use crate::metrics::Metrics;
use crate::net_guard::{Limits, UrlPolicy};
use crate::storage::{ObjectStorage, Storage, StorageLocation};
use crate::webhook::WebhookSettings;
use crate::worker::{self, StepClock};

/// State of a `load_model` started through the management API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelLoad {
    /// Downloading or converting.
    Loading,
    /// Failed with this message.
    Failed(String),
}

/// Everything the handlers and workers share.
pub struct App {
    /// Settings.
    pub config: ServerConfig,
    /// The image generator.
    pub backend: Arc<dyn Backend>,
    /// The job lifecycle (store and signals).
    pub jobs: Arc<JobService>,
    /// Output storage.
    pub storage: Arc<dyn Storage>,
    /// Accepted keys.
    pub keys: RwLock<KeyStore>,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// This process's name among the nodes (`--server-name` or the host name, then the process id).
    pub node: String,
    /// Jobs this process is generating now.
    pub busy: AtomicI64,
    /// Seconds per denoising step, for `eta`.
    pub clock: Mutex<StepClock>,
    /// `load_model` calls in flight or failed, by model id.
    pub model_loads: Mutex<HashMap<String, ModelLoad>>,
    /// Set once the service accepts requests.
    pub ready: AtomicBool,
}

impl App {
    /// The address policy for `init_image` and webhook URLs.
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

    /// Whether the service has finished starting.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Builds the state over the job store `config.database_url()` and local storage in `config.data_dir`.
    /// Returns the key generated at first start, if any.
    pub async fn open(
        config: ServerConfig,
        backend: Arc<dyn Backend>,
    ) -> anyhow::Result<(Arc<App>, Option<String>)> {
        std::fs::create_dir_all(&config.data_dir)?;
        let jobs = JobService::open(&config.database_url()).await?;
        if !jobs.is_shared() {
            if config.role != Role::All {
                anyhow::bail!(
                    "--role api and --role worker need a job store shared by every node: give --database-url \
                     postgres://..."
                );
            }
            // One process owns this store: whatever it shows running was left by a process that died.
            let ended = jobs.store().expire_leases().await?;
            let reaped = jobs.store().reap(config.max_attempts).await?;
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
        let (mut keys, mut generated) = KeyStore::load(
            &config.api_keys,
            &config.admin_keys,
            &config.data_dir,
            !jobs.is_shared(),
        )?;
        if keys.is_empty() && jobs.is_shared() {
            // The first node to start generates the deployment's admin key; the others adopt its hash.
            let (key, sha256) = crate::keys::new_key();
            let stored = jobs.store().adopt_admin_key(&sha256).await?;
            keys.add_admin_hash(&stored);
            if stored == sha256 {
                generated = Some(key);
            }
        }
        for (key, group) in &config.bound_keys {
            keys.bind(key, group);
        }
        let node = format!(
            "{}-{}",
            config.server_name.clone().unwrap_or_else(host_name),
            std::process::id()
        );
        let app = Arc::new(App {
            config,
            backend,
            jobs: Arc::new(jobs),
            storage: Arc::new(storage),
            keys: RwLock::new(keys),
            metrics: Metrics::new(),
            node,
            busy: AtomicI64::new(0),
            clock: Mutex::new(StepClock::default()),
            model_loads: Mutex::new(HashMap::new()),
            ready: AtomicBool::new(false),
        });
        Ok((app, generated))
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

/// Runs the service until Ctrl-C or SIGTERM: workers, sweeper and HTTP server. A job running at shutdown is
/// queued again at the next start.
pub async fn serve(config: ServerConfig, backend: Arc<dyn Backend>) -> anyhow::Result<()> {
    let listen = config.listen;
    let (app, generated) = App::open(config, backend).await?;
    if let Some(key) = generated {
        println!(
            "No API key was configured: generated this admin key (shown once, stored hashed in {}):\n\n    {key}\n",
            if app.jobs.is_shared() {
                "the job database".to_string()
            } else {
                app.config.data_dir.join("keys.json").display().to_string()
            }
        );
    }
    let role = app.config.role;
    if role.runs_jobs() {
        for n in 0..app.config.workers.max(1) {
            tokio::spawn(worker::work(app.clone(), n));
        }
        tokio::spawn(worker::report(app.clone()));
    }
    tokio::spawn(worker::reap(app.clone()));
    tokio::spawn(worker::dispatch_webhooks(app.clone()));
    tokio::spawn(worker::sweep(app.clone()));
    let router = if role.serves_api() {
        crate::routes::router(app.clone())
    } else {
        crate::routes::worker_router(app.clone())
    };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    app.ready.store(true, Ordering::Relaxed);
    tracing::info!(address = %listen, public_url = %app.config.public_url, role = ?role, node = %app.node,
        "Pictor is listening");
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    tracing::info!("shut down");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
