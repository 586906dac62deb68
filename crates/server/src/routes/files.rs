//! Plain `GET` routes: stored files, health, metrics, the OpenAPI document, and the JSON 404.

use std::sync::Arc;

use axum::extract::State;
use axum::http::Uri;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::app::App;
use crate::storage::valid_key;

/// `GET /generations/…` and `GET /temp/…`: a stored output.
pub async fn file(State(app): State<Arc<App>>, uri: Uri) -> Response {
    let key = uri.path().trim_start_matches('/');
    if !valid_key(key) {
        return not_found().await.into_response();
    }
    match app.node.storage.get(key).await {
        Ok(Some(bytes)) => {
            let content_type = match key.rsplit('.').next() {
                Some("png") => "image/png",
                Some("jpeg" | "jpg") => "image/jpeg",
                Some("webp") => "image/webp",
                Some("base64") => "text/plain; charset=utf-8",
                _ => "application/octet-stream",
            };
            ([(header::CONTENT_TYPE, content_type)], bytes).into_response()
        }
        Ok(None) => not_found().await.into_response(),
        Err(e) => {
            tracing::error!(key, error = %e, "cannot read a stored file");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!({"status": "error", "message": "cannot read the file"})),
            )
                .into_response()
        }
    }
}

/// `GET /health`: 200 once the service accepts requests.
pub async fn health(State(app): State<Arc<App>>) -> Response {
    let depth = app.node.jobs.store().depth().await;
    match (app.is_ready(), depth) {
        (true, Ok((queued, running))) => Json(json!({
            "status": "ok", "queued": queued, "running": running,
        }))
        .into_response(),
        (_, Err(e)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "error", "message": e.to_string()})),
        )
            .into_response(),
        (false, _) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "starting"})),
        )
            .into_response(),
    }
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics(State(app): State<Arc<App>>) -> Response {
    if let Ok((queued, running)) = app.node.jobs.store().depth().await {
        app.node
            .metrics
            .queue
            .with_label_values(&["queued"])
            .set(queued);
        app.node
            .metrics
            .queue
            .with_label_values(&["running"])
            .set(running);
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.node.metrics.render(),
    )
        .into_response()
}

/// `GET /openapi.json`.
pub async fn openapi(State(app): State<Arc<App>>) -> Response {
    Json(crate::openapi::document(&app.node.config.public_url)).into_response()
}

/// A known route asked with another method: 405 in the API's error shape.
pub async fn method_not_allowed() -> impl IntoResponse {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        Json(json!({"status": "error", "message": "Method not allowed on this route"})),
    )
}

/// An unknown route or file: 404 in the API's error shape.
pub async fn not_found() -> impl IntoResponse {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"status": "error", "message": "Not found: no such route or file"})),
    )
}
