//! Fetch routes: the id in the path or `request_id` in the body; any family's job through any fetch route.

use std::sync::Arc;

use axum::body::Body;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::app::App;
use crate::render;
use crate::responses::ApiError;
use crate::worker;

/// `POST .../fetch[/{id}]`.
pub async fn handle(
    app: Arc<App>,
    path_id: Option<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match fetch(&app, path_id, &headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn fetch(
    app: &Arc<App>,
    path_id: Option<String>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let body = super::auth::read_body(app, body).await?;
    let caller = super::auth::caller(app, &body, headers)?;
    let raw = match path_id {
        Some(id) => id,
        None => body
            .string(&["request_id", "id"])?
            .ok_or_else(|| ApiError::required("request_id"))?,
    };
    let id: i64 = raw
        .trim()
        .trim_matches('"')
        .parse()
        .map_err(|_| ApiError::field("request_id", format!("{raw:?} is not a request id")))?;
    let job = app.node.jobs.store().get(id).await?;
    let Some(job) = job.filter(|j| caller.admin || j.owner == caller.id) else {
        return Err(ApiError::message(format!(
            "Request not found: {id} (unknown, made with another key, or older than the retention period)"
        )));
    };
    let eta = worker::eta(&app.node, &job).await;
    Ok(Json(render::fetch(
        &job,
        app.node.storage.as_ref(),
        &app.node.config.public_url,
        eta,
    ))
    .into_response())
}
