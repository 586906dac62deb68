//! The running service: the API's state over a [`Node`], start-up (node, keys, workers, reaper, webhooks,
//! sweeper) by role, and the HTTP server with graceful shutdown.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use crate::backend::Backend;
use crate::config::ServerConfig;
use crate::keys::KeyStore;
use crate::model_loads::ModelLoads;
use crate::node::Node;
use crate::worker;

/// What the HTTP handlers share: the node, plus the state only the API needs.
pub struct App {
    /// The node (settings, jobs, storage, generator, metrics).
    pub node: Arc<Node>,
    /// Accepted keys.
    pub keys: RwLock<KeyStore>,
    /// `load_model` / `load_vae` downloads in flight or failed.
    pub model_loads: Arc<ModelLoads>,
    /// Set once the service accepts requests.
    pub ready: AtomicBool,
    /// The AUTOMATIC1111 dialect's per-key state (current model, requests in flight).
    pub a1111: crate::a1111::Sessions,
}

impl App {
    /// Whether the service has finished starting.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Builds the API's state over `node`: its keys (configured, or generated at first start). Returns the key
    /// generated now, if any.
    pub async fn open(node: Arc<Node>) -> anyhow::Result<(Arc<App>, Option<String>)> {
        let config = &node.config;
        let shared = node.jobs.is_shared();
        let (mut keys, mut generated) = KeyStore::load(
            &config.api_keys,
            &config.admin_keys,
            &config.data_dir,
            !shared,
        )?;
        if keys.is_empty() && shared {
            // The first node to start generates the deployment's admin key; the others adopt its hash.
            let (key, sha256) = crate::keys::new_key();
            let stored = node.jobs.store().adopt_admin_key(&sha256).await?;
            keys.add_admin_hash(&stored);
            if stored == sha256 {
                generated = Some(key);
            }
        }
        for (key, group) in &config.bound_keys {
            keys.bind(key, group);
        }
        let app = Arc::new(App {
            node,
            keys: RwLock::new(keys),
            model_loads: Arc::new(ModelLoads::default()),
            ready: AtomicBool::new(false),
            a1111: Default::default(),
        });
        Ok((app, generated))
    }
}

/// Runs the service until Ctrl-C or SIGTERM: workers, sweeper and HTTP server. A job running at shutdown is
/// queued again at the next start.
pub async fn serve(config: ServerConfig, backend: Arc<dyn Backend>) -> anyhow::Result<()> {
    let listen = config.listen;
    let node = Arc::new(Node::open(config, backend).await?);
    let (app, generated) = App::open(node.clone()).await?;
    if let Some(key) = generated {
        println!(
            "No API key was configured: generated this admin key (shown once, stored hashed in {}):\n\n    {key}\n",
            if node.jobs.is_shared() {
                "the job database".to_string()
            } else {
                node.config.data_dir.join("keys.json").display().to_string()
            }
        );
    }
    let role = node.config.role;
    if role.runs_jobs() {
        for n in 0..node.config.workers.max(1) {
            tokio::spawn(worker::work(node.clone(), n));
        }
        tokio::spawn(worker::report(node.clone()));
    }
    tokio::spawn(worker::reap(node.clone()));
    tokio::spawn(worker::dispatch_webhooks(node.clone()));
    tokio::spawn(worker::sweep(node.clone()));
    let router = if role.serves_api() {
        crate::routes::router(app.clone())
    } else {
        crate::routes::worker_router(app.clone())
    };
    let router = router.layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
        node.config.body_timeout,
    ));
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    app.ready.store(true, Ordering::Relaxed);
    tracing::info!(address = %listen, public_url = %node.config.public_url, role = ?role, node = %node.name,
        "Pictor is listening");
    serve_connections(listener, router, &node.config).await;
    tracing::info!("shut down");
    Ok(())
}

/// Serves HTTP/1.1 connections until Ctrl-C or SIGTERM, then lets the open ones finish. Written out instead of
/// `axum::serve` for the limits that one does not offer: a header timeout (which also closes idle keep-alive
/// connections), and a cap on open connections — over it, new connections are closed at once, so a crowd of
/// idle or slow clients cannot use up the process's file descriptors and starve `/health`.
async fn serve_connections(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    config: &crate::config::ServerConfig,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let open = Arc::new(tokio::sync::Semaphore::new(config.max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_timeout)
        .keep_alive(true);
    let mut shutdown = std::pin::pin!(shutdown_signal());
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = &mut shutdown => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, or a connection reset before it was accepted: wait a little.
                tracing::warn!(error = %e, "cannot accept a connection");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            tracing::warn!(
                limit = config.max_connections,
                "too many open connections; closing a new one"
            );
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let _ = connection.await;
            drop(permit);
        });
    }
    // Stop accepting; give open requests a while to finish (a running job is queued again at the next start).
    if tokio::time::timeout(std::time::Duration::from_secs(10), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after 10 s; closing them");
    }
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
