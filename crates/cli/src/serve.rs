//! `pictor serve`: wires the engine into the HTTP service.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use pictor_engine::model_store::ModelsDir;
use pictor_engine::Runtime;
use pictor_server::config::Role;
use pictor_server::keys::read_keys_file;
use pictor_server::ServerConfig;

use crate::args::{RoleArg, ServeArgs};
use crate::engine_backend::EngineBackend;

/// Builds the service's settings from the flags (and PICTOR_API_KEYS).
pub fn config(args: &ServeArgs) -> Result<ServerConfig> {
    let mut config = ServerConfig::new(args.listen, args.data_dir.clone());
    if let Some(url) = &args.public_url {
        config.public_url = url.trim_end_matches('/').to_string();
    }
    config.default_model = args.default_model.clone();
    config.pix2pix_model = args.pix2pix_model.clone();
    config.sync_timeout = Duration::from_secs_f64(args.sync_timeout.max(0.0));
    config.api_keys = args.api_keys.clone();
    if let Ok(env) = std::env::var("PICTOR_API_KEYS") {
        config.api_keys.extend(
            env.split(',')
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .map(String::from),
        );
    }
    if let Some(file) = &args.keys_file {
        for line in
            read_keys_file(file).with_context(|| format!("cannot read {}", file.display()))?
        {
            if let Some(group) = line.group {
                config.bound_keys.push((line.key.clone(), group));
            }
            config.api_keys.push(line.key);
        }
    }
    config.admin_keys = args.admin_keys.clone();
    config.max_queued_per_key = args.max_queued_per_key.max(1);
    config.allow_private_urls = args.allow_private_urls;
    config.max_body_bytes = args.max_body_mib.max(1) << 20;
    config.decode_budget_pixels = args.decode_budget_mpx << 20;
    config.min_free_disk_bytes = args.min_free_disk_mib << 20;
    config.header_timeout = Duration::from_secs(args.header_timeout_secs.max(1));
    config.body_timeout = Duration::from_secs(args.body_timeout_secs.max(1));
    config.max_connections = args.max_connections.max(1);
    config.temp_ttl = Duration::from_secs(args.temp_ttl);
    config.retention = Duration::from_secs(args.retention_hours * 3600);
    config.sweep_interval = Duration::from_secs(args.sweep_interval.max(1));
    config.webhook_attempts = args.webhook_attempts.max(1);
    config.webhook_backoff = Duration::from_secs_f64(args.webhook_backoff.max(0.0));
    config.workers = args.workers.max(1);
    config.role = match args.role {
        RoleArg::All => Role::All,
        RoleArg::Api => Role::Api,
        RoleArg::Worker => Role::Worker,
    };
    config.database_url = args.database_url.clone();
    config.server_name = args.server_name.clone();
    config.storage = args.storage.clone();
    config.step_delay = Duration::from_millis(args.debug_step_delay_ms);
    if !(args.lease_seconds >= 0.3 && args.lease_seconds <= 3600.0) {
        anyhow::bail!("--lease-seconds must be between 0.3 and 3600");
    }
    config.lease = Duration::from_secs_f64(args.lease_seconds);
    config.max_attempts = args.max_attempts.clamp(1, 1000) as i32;
    Ok(config)
}

/// Runs the service until Ctrl-C / SIGTERM.
pub fn serve(args: ServeArgs) -> Result<()> {
    let config = config(&args)?;
    let models = ModelsDir::new(&args.models_dir);
    if models.list()?.is_empty() && !args.no_demo {
        let path = models.checkpoints().join("demo");
        pictor_engine::demo::make_demo_model(&path, false, 0)?;
        tracing::warn!(
            path = %path.display(),
            "the models folder was empty: created a RANDOM demo model (it draws noise-like pictures); \
             put real models in {} or run `pictor models pull`",
            models.checkpoints().display()
        );
    }
    args.precision.apply()?;
    let runtime = Runtime::default_for_this_machine()?;
    let backend = EngineBackend::new(models, runtime, args.model_cache_mib << 20)
        .with_safety_checker(args.safety_checker.clone());
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(pictor_server::serve(config, Arc::new(backend)))
}
