//! The playground: one page at `GET /` (HTML, CSS and script in one file built into the binary: no CDN, no
//! build step), and `GET /api/v1/options`, the lists it fills its choices from.

use std::sync::Arc;

use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::app::App;
use crate::backend::PipelineKind;
use crate::prompt_enhance;
use crate::responses::ApiError;

/// The page.
const PAGE: &str = include_str!("../playground/index.html");

/// `GET /`.
pub async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
        .into_response()
}

/// `GET /api/v1/options` (any valid key, as Bearer, `key` header or `?key=`): the models (with the pipeline each
/// runs), scheduler names, LoRAs, VAEs, embeddings, enhance styles and the server's default models.
pub async fn options(app: Arc<App>, query_key: Option<String>, headers: HeaderMap) -> Response {
    let result = async {
        super::auth::caller_from_query_or_headers(&app, query_key.as_deref(), &headers)?;
        let backend = app.node.backend.clone();
        let (models, schedulers, (loras, vaes, embeddings)) =
            tokio::task::spawn_blocking(move || {
                (
                    backend.models(),
                    backend.schedulers(),
                    (backend.loras(), backend.vaes(), backend.embeddings()),
                )
            })
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        let models = models.map_err(|e| ApiError::Internal(e.to_string()))?;
        let models: Vec<_> = models
            .into_iter()
            .map(|m| {
                json!({"id": m.id, "kind": match m.kind {
                    PipelineKind::Pix2Pix => "pix2pix",
                    _ => "img2img",
                }})
            })
            .collect();
        Ok::<_, ApiError>(json!({
            "models": models,
            "schedulers": schedulers,
            "loras": loras,
            "vaes": vaes,
            "embeddings": embeddings,
            "styles": prompt_enhance::style_ids().collect::<Vec<_>>(),
            "a1111_samplers": crate::samplers::a1111_sampler_map_json(),
            "default_model": app.node.config.default_model,
            "pix2pix_model": app.node.config.pix2pix_model,
        }))
    };
    match result.await {
        Ok(body) => Json(body).into_response(),
        Err(e) => e.into_response(),
    }
}
