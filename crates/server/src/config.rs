//! The service's settings (filled from `pictor serve`'s flags).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// What one `pictor serve` process does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    /// HTTP API and workers in one process (one machine).
    #[default]
    All,
    /// HTTP API only: stateless front end over the shared job store.
    Api,
    /// Workers only: generates queued jobs; listens for `/health` and `/metrics`.
    Worker,
}

impl Role {
    /// Whether the process serves the API routes.
    pub fn serves_api(self) -> bool {
        self != Role::Worker
    }

    /// Whether the process runs generations.
    pub fn runs_jobs(self) -> bool {
        self != Role::Api
    }
}

/// Everything the service needs to know at start.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Base of every URL the service hands out (`http://127.0.0.1:8080` by default); no trailing slash.
    pub public_url: String,
    /// Where the job database, keys and stored files live.
    pub data_dir: PathBuf,
    /// Model used when a request names none (v3, realtime, and any request without `model_id`).
    pub default_model: Option<String>,
    /// Model used by v5 pix2pix when the request names none.
    pub pix2pix_model: Option<String>,
    /// How long a request waits for its result before answering `processing`; zero always queues.
    pub sync_timeout: Duration,
    /// API keys given on the command line, in the environment or in a keys file (plain; hashed at start).
    pub api_keys: Vec<String>,
    /// Keys bound to a worker group: (key, `--server-name` of the workers its jobs stay on).
    pub bound_keys: Vec<(String, String)>,
    /// Keys allowed to use the enterprise management routes (they can also generate).
    pub admin_keys: Vec<String>,
    /// Most jobs one key may have queued or running; more are refused with 429.
    pub max_queued_per_key: usize,
    /// Let `init_image` and webhook URLs reach loopback and private networks (never cloud metadata).
    pub allow_private_urls: bool,
    /// Largest request body in bytes.
    pub max_body_bytes: usize,
    /// How long a client may take to send a request's headers, and how long an idle keep-alive connection is
    /// kept, before the connection is closed.
    pub header_timeout: Duration,
    /// How long a client may take to send a request's body.
    pub body_timeout: Duration,
    /// Most client connections open at once; more are closed as they arrive (keep it below the process's
    /// file-descriptor limit).
    pub max_connections: usize,
    /// Largest init image in pixels (decompression-bomb guard).
    pub max_image_pixels: u64,
    /// Pixels this process decodes at once across requests (at least `max_image_pixels`); more wait.
    pub decode_budget_pixels: u64,
    /// Largest init image download in bytes.
    pub max_download_bytes: u64,
    /// Bytes that must stay free on each local disk the service writes to (data folder, SQLite file, folder
    /// storage) for new jobs to be accepted and started; below it job-making routes answer 503 and workers wait.
    /// Zero turns the check off.
    pub min_free_disk_bytes: u64,
    /// Largest single-file checkpoint `load_model` downloads, in bytes.
    pub max_model_download_bytes: u64,
    /// How long `temp: yes` outputs live.
    pub temp_ttl: Duration,
    /// How long finished jobs stay fetchable.
    pub retention: Duration,
    /// How often expired temp files and old jobs are swept.
    pub sweep_interval: Duration,
    /// Webhook attempts (first try included).
    pub webhook_attempts: u32,
    /// Delay before the first webhook retry; doubles each time.
    pub webhook_backoff: Duration,
    /// Timeout of one webhook POST.
    pub webhook_timeout: Duration,
    /// Generations run at once.
    pub workers: usize,
    /// What this process does.
    pub role: Role,
    /// The job store: `sqlite:PATH` or `postgres://…`; `None` is `sqlite:DATA/jobs.db`.
    pub database_url: Option<String>,
    /// Where files live: a folder or `s3://BUCKET[/PREFIX]`; `None` is `DATA/files`.
    pub storage: Option<String>,
    /// This node's worker group (jobs of keys bound to it, and unpinned ones, run here) and the start of its
    /// name in `system_details`.
    pub server_name: Option<String>,
    /// How long a worker's hold on a job lasts without a heartbeat (heartbeats come every third of it).
    pub lease: Duration,
    /// Claims of one job before it is failed as abandoned (its worker died each time).
    pub max_attempts: i32,
    /// Fault injection for tests: a pause after every denoising step, so that a job is reliably caught
    /// mid-run by a kill or a cancel. Zero (the default) in real use.
    pub step_delay: Duration,
}

impl ServerConfig {
    /// The job store's URL, the embedded SQLite file in the data folder unless one was given.
    pub fn database_url(&self) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite:{}", self.data_dir.join("jobs.db").display()))
    }

    /// Defaults for a service on `listen` keeping its data in `data_dir`.
    pub fn new(listen: SocketAddr, data_dir: PathBuf) -> Self {
        ServerConfig {
            listen,
            public_url: format!("http://{listen}"),
            data_dir,
            default_model: None,
            pix2pix_model: None,
            sync_timeout: Duration::from_secs(60),
            api_keys: Vec::new(),
            admin_keys: Vec::new(),
            bound_keys: Vec::new(),
            max_queued_per_key: 10,
            allow_private_urls: false,
            max_body_bytes: 32 * 1024 * 1024,
            max_image_pixels: 64 * 1024 * 1024,
            decode_budget_pixels: 128 * 1024 * 1024,
            header_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(120),
            max_connections: 1000,
            max_download_bytes: 25 * 1024 * 1024,
            min_free_disk_bytes: 64 * 1024 * 1024,
            max_model_download_bytes: 16 * 1024 * 1024 * 1024,
            temp_ttl: Duration::from_secs(24 * 3600),
            retention: Duration::from_secs(7 * 24 * 3600),
            sweep_interval: Duration::from_secs(600),
            webhook_attempts: 4,
            webhook_backoff: Duration::from_secs(2),
            webhook_timeout: Duration::from_secs(30),
            workers: 1,
            role: Role::All,
            database_url: None,
            storage: None,
            server_name: None,
            lease: Duration::from_secs(15),
            max_attempts: 3,
            step_delay: Duration::ZERO,
        }
    }
}
