//! The enterprise management calls (`/api/v1/enterprise/<name>`), all behind an admin key.

use std::sync::Arc;

use axum::body::Body;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::app::App;
use crate::backend::BackendError;
use crate::init_image;
use crate::model_loads::{Load, LoadState, ModelLoad};
use crate::params;
use crate::responses::ApiError;

/// `POST /api/v1/enterprise/<name>`.
pub async fn handle(app: Arc<App>, name: &'static str, headers: HeaderMap, body: Body) -> Response {
    let result = async {
        let body = super::auth::read_body(&app, body).await?;
        let caller = super::auth::admin(&app, &body, &headers)?;
        dispatch(&app, name, &body, &caller).await
    }
    .await;
    match result {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `POST /api/v3/system_load`: queue length and estimated wait (no key needed, as on the hosted API).
pub async fn system_load(app: Arc<App>) -> Response {
    let (queued, running) = app.node.jobs.store().depth().await.unwrap_or((0, 0));
    let wait = crate::worker::queue_seconds(&app.node, queued + running).await;
    Json(json!({"queue_num": queued + running, "queue_time": wait, "status": "ok"})).into_response()
}

fn ok(message: impl Into<String>) -> Value {
    json!({"status": "success", "message": message.into()})
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))
}

fn model_id_field(body: &params::Body) -> Result<String, ApiError> {
    safe_id(body, "model_id")
}

/// A required id that becomes a file name: letters, digits, `-`, `_`, `.`, not starting with `.`.
fn safe_id(body: &params::Body, field: &'static str) -> Result<String, ApiError> {
    let id = body
        .string(&[field])?
        .ok_or_else(|| ApiError::required(field))?;
    let safe = !id.is_empty()
        && !id.starts_with('.')
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !safe {
        return Err(ApiError::field(
            field,
            "may only contain letters, digits, '-', '_' and '.', and may not start with '.'",
        ));
    }
    Ok(id)
}

fn backend_error(e: BackendError) -> ApiError {
    ApiError::from(e)
}

async fn dispatch(
    app: &Arc<App>,
    name: &str,
    body: &params::Body,
    caller: &crate::keys::Caller,
) -> Result<Value, ApiError> {
    match name {
        "system_details" => system_details(app).await,
        "schedulers_list" => {
            let backend = app.node.backend.clone();
            let list = blocking(move || backend.schedulers()).await?;
            Ok(json!({ "schedulers": list }))
        }
        "get_all_models" => {
            let backend = app.node.backend.clone();
            let models = blocking(move || backend.models())
                .await?
                .map_err(backend_error)?;
            let list: Vec<Value> = models
                .iter()
                .map(|m| {
                    json!({
                        "model_id": m.id,
                        "load_data": m.added_at.map(format_date).unwrap_or_default(),
                        "kind": m.kind,
                        "format": m.format,
                        "loaded": m.loaded,
                    })
                })
                .collect();
            Ok(json!({"status": "success", "models": list}))
        }
        "verify_model" => {
            let id = model_id_field(body)?;
            if let Some(state) = app.model_loads.state(&id) {
                return Ok(match state {
                    LoadState::Loading => {
                        json!({"status": "processing", "message": "Model is still loading"})
                    }
                    LoadState::Failed(why) => {
                        json!({"status": "error", "message": format!("Model load failed: {why}")})
                    }
                });
            }
            let backend = app.node.backend.clone();
            let models = blocking(move || backend.models())
                .await?
                .map_err(backend_error)?;
            if models.iter().any(|m| m.id == id) {
                Ok(ok("Model exists on server"))
            } else {
                Err(ApiError::message(format!("Model not found: {id}")))
            }
        }
        "load_model" => load_model(app, body).await,
        "delete_model" => {
            let id = model_id_field(body)?;
            let backend = app.node.backend.clone();
            let name = id.clone();
            blocking(move || backend.delete_model(&name))
                .await?
                .map_err(backend_error)?;
            app.node
                .unpublish_model(&id)
                .await
                .map_err(ApiError::Internal)?;
            Ok(ok("Model deleted on server"))
        }
        "sync_models" => {
            let synced = app
                .node
                .publish_models()
                .await
                .map_err(ApiError::Internal)?;
            let backend = app.node.backend.clone();
            let models = blocking(move || backend.models())
                .await?
                .map_err(backend_error)?;
            let ids: Vec<String> = models.into_iter().map(|m| m.id).collect();
            let message = match synced {
                Some(s) => format!(
                    "{} Models synced successfully ({} files, {} bytes sent to the shared storage; every worker \
                     pulls them before its next job)",
                    ids.len(),
                    s.files.len(),
                    s.bytes
                ),
                None => format!(
                    "{} Models synced successfully (one machine: its models folder is the only copy)",
                    ids.len()
                ),
            };
            Ok(json!({"status": "success", "message": message, "model_list": ids}))
        }
        "clear_cache" => {
            let backend = app.node.backend.clone();
            blocking(move || backend.clear_cache()).await?;
            Ok(ok("Cache cleared successfully"))
        }
        "clear_queue" => {
            let (dequeued, stopping) = app
                .node
                .jobs
                .cancel_all("Cancelled: the queue was cleared")
                .await?;
            Ok(ok(format!(
                "Queue cleared: {} queued jobs cancelled, {} running jobs stopping",
                dequeued.len(),
                stopping.len()
            )))
        }
        "upload_image" => {
            let text = body
                .string(&["base64_image", "image"])?
                .ok_or_else(|| ApiError::required("base64_image"))?;
            let bytes = init_image::decode_base64(&text)
                .ok_or_else(|| ApiError::field("base64_image", "is not valid base64"))?;
            let max = app.node.config.max_image_pixels;
            let image = app
                .node
                .decode_budget
                .decode(bytes, max)
                .await
                .map_err(|e| match e {
                    ApiError::Field { message, .. } => ApiError::field("base64_image", message),
                    other => other,
                })?;
            let key = format!(
                "generations/{}.{}",
                uuid::Uuid::new_v4(),
                if image.format == "jpeg" { "jpg" } else { image.format }
            );
            app.node.storage
                .put(&key, image.bytes)
                .await
                .map_err(ApiError::Internal)?;
            Ok(json!({"status": "success", "message": "image uploaded",
                      "image_url": app.node.storage.url(&key)}))
        }
        "restart_server" => {
            let backend = app.node.backend.clone();
            blocking(move || backend.clear_cache()).await?;
            Ok(ok(
                "server restarting: models were unloaded and will be read again from the models folder; \
                 queued jobs are kept",
            ))
        }
        "update_server" | "update" => Err(ApiError::message(
            "update_server does not apply to a self-hosted Pictor: install the new release and restart the \
             service (queued jobs survive a restart)",
        )),
        "update_s3" => {
            let (deploy, destination) =
                crate::destination::S3Destination::from_body(body, app.node.url_policy()).await?;
            let settings =
                serde_json::to_string(&destination).map_err(|e| ApiError::Internal(e.to_string()))?;
            app.node.jobs
                .store()
                .set_destination(&caller.id, &deploy, Some(&settings))
                .await?;
            Ok(ok(format!(
                "S3 details updated for {deploy}: results are also written to {}/<file>",
                destination.public_url.trim_end_matches('/')
            )))
        }
        "reset_s3" => {
            let deploy = crate::destination::deploy_type(body)?;
            app.node.jobs
                .store()
                .set_destination(&caller.id, &deploy, None)
                .await?;
            Ok(ok(format!(
                "S3 details removed for {deploy}: results are served by this server"
            )))
        }
        "load_vae" => load_vae(app, body).await,
        "nsfw_image_check" => nsfw_image_check(app, body).await,
        _ => Err(ApiError::message(format!("unknown management call {name}"))),
    }
}

async fn system_details(app: &Arc<App>) -> Result<Value, ApiError> {
    let (queued, running) = app.node.jobs.store().depth().await?;
    let backend = app.node.backend.clone();
    let (system, models) = blocking(move || (backend.system(), backend.models())).await?;
    let models = models.map_err(backend_error)?;
    let queue_time = crate::worker::queue_seconds(&app.node, queued + running).await;
    let servers = app
        .node
        .jobs
        .store()
        .live_workers(crate::worker::LIVE_WITHIN)
        .await?;
    Ok(json!({
        "status": "ok",
        "model_count": models.len(),
        "models_loaded": system.loaded_models,
        "queue_length": queued,
        "running": running,
        "queue_time": queue_time,
        "device": system.device,
        "dtype": system.dtype,
        "model_memory_bytes": system.model_memory_bytes,
        "model_memory_budget_bytes": system.model_memory_budget_bytes,
        "workers": app.node.config.workers,
        "servers": servers,
        "version": env!("CARGO_PKG_VERSION"),
    }))
}

/// Where `url` points: a Hugging Face repo (id or page URL) or a checkpoint file URL.
fn model_source_of(url: &str) -> Result<Option<String>, ApiError> {
    let trimmed = url.trim().trim_end_matches('/');
    let repo = trimmed
        .strip_prefix("https://huggingface.co/")
        .unwrap_or(trimmed);
    let parts: Vec<&str> = repo.split('/').collect();
    let looks_like_repo = !repo.contains("://")
        && parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        });
    if looks_like_repo {
        return Ok(Some(repo.to_string()));
    }
    if !(trimmed.starts_with("http://") || trimmed.starts_with("https://")) {
        return Err(ApiError::field(
            "url",
            "give a Hugging Face repo id (owner/name) or an http(s) URL of a .safetensors checkpoint",
        ));
    }
    let lower = trimmed.to_lowercase();
    if [".ckpt", ".pt", ".pth", ".bin", ".pkl"]
        .iter()
        .any(|e| lower.split('?').next().unwrap_or("").ends_with(e))
    {
        return Err(ApiError::field(
            "url",
            "pickled checkpoints are refused (loading them can run arbitrary code); use a .safetensors file",
        ));
    }
    Ok(None)
}

async fn load_model(app: &Arc<App>, body: &params::Body) -> Result<Value, ApiError> {
    let id = model_id_field(body)?;
    let url = body
        .string(&["url"])?
        .ok_or_else(|| ApiError::required("url"))?;
    let revision = body
        .string(&["revision"])?
        .filter(|r| r != "fp32" && r != "main");
    let repo = model_source_of(&url)?;
    let backend = app.node.backend.clone();
    let models = blocking(move || backend.models())
        .await?
        .map_err(backend_error)?;
    if models.iter().any(|m| m.id == id) {
        return Err(ApiError::field(
            "model_id",
            format!("a model {id} already exists; delete it first"),
        ));
    }
    let webhook = body.string(&["webhook"])?;
    let load = ModelLoad {
        what: Load::Model,
        id,
        url,
        repo,
        revision,
        webhook,
    };
    if !app.model_loads.start(&app.node, load) {
        return Err(ApiError::field("model_id", "this model is already loading"));
    }
    Ok(json!({"status": "success", "message": "model load started"}))
}

/// `load_vae`: `vae_id`, `vae_url` (a Hugging Face VAE repository or an http(s) URL of a `.safetensors`
/// file), `vae_type` (`diffusers` or `safetensors`; `pt` is refused), `webhook`.
async fn load_vae(app: &Arc<App>, body: &params::Body) -> Result<Value, ApiError> {
    let id = safe_id(body, "vae_id")?;
    let url = body
        .string(&["vae_url", "url"])?
        .ok_or_else(|| ApiError::required("vae_url"))?;
    if let Some(kind) = body.string(&["vae_type"])? {
        if !matches!(kind.as_str(), "diffusers" | "safetensors") {
            return Err(ApiError::field(
                "vae_type",
                "use diffusers or safetensors (pickled .pt/.ckpt VAEs are refused: loading them can run code)",
            ));
        }
    }
    let repo = model_source_of(&url).map_err(|e| match e {
        ApiError::Field { message, .. } => ApiError::field("vae_url", message),
        other => other,
    })?;
    let webhook = body.string(&["webhook"])?;
    let load = ModelLoad {
        what: Load::Vae,
        id,
        url,
        repo,
        revision: None,
        webhook,
    };
    if !app.model_loads.start(&app.node, load) {
        return Err(ApiError::field("vae_id", "this VAE is already loading"));
    }
    Ok(ok("VAE load started"))
}

/// `nsfw_image_check`: runs the safety checker on `init_image` (URL or base64).
async fn nsfw_image_check(app: &Arc<App>, body: &params::Body) -> Result<Value, ApiError> {
    let source = body
        .string(&["init_image", "image"])?
        .ok_or_else(|| ApiError::required("init_image"))?;
    let image = init_image::resolve(
        &source,
        app.node.url_policy(),
        app.node.download_limits(),
        app.node.config.max_image_pixels,
        &app.node.decode_budget,
    )
    .await?;
    let backend = app.node.backend.clone();
    let bytes = image.bytes.clone();
    let flagged = blocking(move || backend.check_image(&bytes)).await??;
    let shown = if source.starts_with("http://") || source.starts_with("https://") {
        source
    } else {
        "base64".into()
    };
    Ok(json!({"status": "success", "images": shown, "has_nsfw_concept": [flagged]}))
}

/// `MM/DD/YYYY HH:MM:SS` (UTC), the hosted API's `load_data` format.
fn format_date(epoch: u64) -> String {
    let days = (epoch / 86_400) as i64;
    let secs = epoch % 86_400;
    // Civil-from-days (proleptic Gregorian), valid for any date after 1970.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{month:02}/{day:02}/{year} {:02}:{:02}:{:02}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(format_date(0), "01/01/1970 00:00:00");
        assert_eq!(format_date(1_674_647_542), "01/25/2023 11:52:22");
    }

    #[test]
    fn model_sources() {
        assert_eq!(
            model_source_of("runwayml/stable-diffusion-v1-5").unwrap(),
            Some("runwayml/stable-diffusion-v1-5".into())
        );
        assert_eq!(
            model_source_of("https://huggingface.co/a/b/").unwrap(),
            Some("a/b".into())
        );
        assert_eq!(
            model_source_of("https://civitai.com/api/download/models/1.safetensors").unwrap(),
            None
        );
        assert!(model_source_of("https://x.com/m.ckpt").is_err());
        assert!(model_source_of("just words").is_err());
    }
}
