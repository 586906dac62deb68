//! `load_model` and `load_vae` downloads, run in the background: a Hugging Face repository or a `.safetensors`
//! URL (through the address guard, bounded in size) handed to the backend, then published to the shared storage
//! (so every worker of a deployment gets it), with the outcome kept for `verify_model` and posted to the call's
//! webhook.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;

use crate::backend::ModelSource;
use crate::net_guard::{self, Limits};
use crate::node::Node;

/// What a download adds to the models folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Load {
    /// A checkpoint (`load_model`).
    Model,
    /// A VAE (`load_vae`).
    Vae,
}

/// One download asked for.
#[derive(Debug, Clone)]
pub struct ModelLoad {
    /// Checkpoint or VAE.
    pub what: Load,
    /// The id it will have.
    pub id: String,
    /// Where it comes from (a file URL, or the repository's page).
    pub url: String,
    /// The Hugging Face repository, when `url` names one.
    pub repo: Option<String>,
    /// The repository's revision (branch) to take.
    pub revision: Option<String>,
    /// Where to post the outcome.
    pub webhook: Option<String>,
}

/// Where a download stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadState {
    /// Downloading or converting.
    Loading,
    /// Failed with this message.
    Failed(String),
}

/// The downloads of this node in flight or failed, by key (model id, or `vae:<id>`).
#[derive(Debug, Default)]
pub struct ModelLoads {
    states: Mutex<HashMap<String, LoadState>>,
}

impl ModelLoads {
    /// The state of model `id`'s download, if one is in flight or failed.
    pub fn state(&self, id: &str) -> Option<LoadState> {
        self.states.lock().expect("loads").get(id).cloned()
    }

    /// Starts `load` in the background on `node`; `false` when the same one is already in flight.
    pub fn start(self: &Arc<Self>, node: &Arc<Node>, load: ModelLoad) -> bool {
        let key = match load.what {
            Load::Model => load.id.clone(),
            Load::Vae => format!("vae:{}", load.id),
        };
        {
            let mut states = self.states.lock().expect("loads");
            if states.get(&key) == Some(&LoadState::Loading) {
                return false;
            }
            states.insert(key.clone(), LoadState::Loading);
        }
        let loads = self.clone();
        let node = node.clone();
        tokio::spawn(async move {
            let result = run(&node, &load).await;
            let (id_field, ready) = match load.what {
                Load::Model => ("model_id", "model_ready"),
                Load::Vae => ("vae_id", "vae_ready"),
            };
            let payload = match &result {
                Ok(()) => {
                    loads.states.lock().expect("loads").remove(&key);
                    tracing::info!(%key, "download added to the models folder");
                    json!({"status": "success", id_field: load.id, "message": ready})
                }
                Err(why) => {
                    tracing::warn!(%key, error = %why, "download failed");
                    loads
                        .states
                        .lock()
                        .expect("loads")
                        .insert(key.clone(), LoadState::Failed(why.clone()));
                    json!({"status": "failed", id_field: load.id, "message": why})
                }
            };
            if let Some(hook) = &load.webhook {
                crate::webhook::deliver(hook, &payload, node.webhook_settings()).await;
            }
        });
        true
    }
}

/// Downloads, hands to the backend, publishes.
async fn run(node: &Node, load: &ModelLoad) -> Result<(), String> {
    let source = match &load.repo {
        Some(repo) => ModelSource::HuggingFace {
            repo: repo.clone(),
            revision: load.revision.clone(),
        },
        None => {
            let limits = Limits {
                timeout: Duration::from_secs(3600),
                max_bytes: node.config.max_model_download_bytes,
                max_redirects: 5,
            };
            let bytes = net_guard::get_bytes(&load.url, node.url_policy(), limits)
                .await
                .map_err(|e| format!("download of {} failed: {e}", load.url))?;
            ModelSource::SingleFile { bytes }
        }
    };
    let backend = node.backend.clone();
    let (what, name) = (load.what, load.id.clone());
    tokio::task::spawn_blocking(move || match what {
        Load::Model => backend.add_model(&name, source),
        Load::Vae => backend.add_vae(&name, source),
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    // Every worker gets what was added: publish it before saying it is ready.
    node.publish_models().await.map(|_| ())
}
