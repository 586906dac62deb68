//! The OpenAI Images API, as the `openai` SDKs call it: `POST /v1/images/generations` (JSON),
//! `POST /v1/images/edits` (multipart: `image`, optional `mask` refused until inpainting exists) and
//! `GET /v1/models`, with the key as `Authorization: Bearer`. Synchronous: the answer carries the images.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::multipart::MultipartError;
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use serde_json::{json, Map, Value};

use crate::app::App;
use crate::backend::PipelineKind;
use crate::jobs::{failure, JobStatus};
use crate::openai::{self, OpenAiError, ResponseFormat};
use crate::params;
use crate::render;
use crate::responses::ApiError;

/// `POST /v1/images/generations`.
pub async fn generations(app: Arc<App>, headers: HeaderMap, body: Body) -> Response {
    let result = async {
        let caller = super::auth::caller_from_headers(&app, &headers)?;
        let body = super::auth::read_body(&app, body).await?;
        let mut request = openai::parse(PipelineKind::Text2Img, &body, None)?;
        request.submission.delivery.idempotency_key = super::auth::idempotency_key(&headers)?;
        run(&app, &caller, request).await
    };
    respond(result.await)
}

/// `POST /v1/images/edits`: img2img, or InstructPix2Pix when `model` is an InstructPix2Pix model.
pub async fn edits(app: Arc<App>, request: Request) -> Response {
    let result = async {
        let caller = super::auth::caller_from_headers(&app, request.headers())?;
        let idempotency = super::auth::idempotency_key(request.headers())?;
        let (fields, image) = read_form(request, app.node.config.max_body_bytes).await?;
        let image = image.ok_or_else(|| ApiError::field("image", "image is required"))?;
        let pix2pix = match fields.string(&["model"])? {
            Some(id) => super::generate::models(&app)
                .await?
                .iter()
                .any(|m| m.id == id && m.kind == PipelineKind::Pix2Pix),
            None => false,
        };
        let kind = if pix2pix {
            PipelineKind::Pix2Pix
        } else {
            PipelineKind::Img2Img
        };
        let mut request = openai::parse(kind, &fields, Some(image))?;
        request.submission.delivery.idempotency_key = idempotency;
        run(&app, &caller, request).await
    };
    respond(result.await)
}

/// `GET /v1/models`.
pub async fn list_models(app: Arc<App>, headers: HeaderMap) -> Response {
    let result = async {
        super::auth::caller_from_headers(&app, &headers)?;
        let data: Vec<Value> = super::generate::models(&app)
            .await?
            .into_iter()
            .map(|m| {
                json!({"id": m.id, "object": "model", "created": m.added_at.unwrap_or(0),
                       "owned_by": "pictor"})
            })
            .collect();
        Ok(json!({"object": "list", "data": data}))
    };
    respond(result.await)
}

fn respond(result: Result<Value, ApiError>) -> Response {
    match result {
        Ok(value) => Json(value).into_response(),
        Err(e) => OpenAiError(e).into_response(),
    }
}

/// A form that could not be read, in words a client can act on (axum's own text for all of them is "Error parsing
/// `multipart/form-data` request"). Size is not among the reasons: [`read_form`] refuses an over-limit body
/// before the form is parsed.
fn form_error(e: MultipartError) -> ApiError {
    ApiError::message(format!("the form could not be read: {}", e.body_text()))
}

/// The form's text fields, and its `image` (or first `image[]`) file as base64. More than one image is refused;
/// a body over `limit` bytes is refused (and drained) as the JSON routes refuse it.
async fn read_form(
    request: Request,
    limit: usize,
) -> Result<(params::Body, Option<String>), ApiError> {
    // The whole body first, so that a form over the limit is drained before the refusal (the client reads the
    // error, not a broken pipe) and no form error leaves part of the body unread.
    let (parts, body) = request.into_parts();
    let bytes = super::auth::read_bytes(body, limit).await?;
    let request = Request::from_parts(parts, Body::from(bytes));
    let mut form = Multipart::from_request(request, &())
        .await
        .map_err(|e| ApiError::message(format!("the body must be multipart/form-data: {e}")))?;
    let mut fields = Map::new();
    let mut image = None;
    while let Some(field) = form.next_field().await.map_err(form_error)? {
        let name = field.name().unwrap_or_default().to_string();
        let is_file = field.file_name().is_some();
        let bytes = field.bytes().await.map_err(form_error)?;
        match name.as_str() {
            "image" | "image[]" => {
                if image.is_some() {
                    return Err(ApiError::field("image", "one image per edit is supported"));
                }
                image = Some(base64::engine::general_purpose::STANDARD.encode(&bytes));
            }
            "mask" => {
                fields.insert("mask".into(), json!("file"));
            }
            _ if is_file => {
                return Err(ApiError::field(name, "unexpected file"));
            }
            _ => {
                let text = String::from_utf8(bytes.to_vec())
                    .map_err(|_| ApiError::field(name.clone(), "must be UTF-8 text"))?;
                fields.insert(name, Value::String(text));
            }
        }
    }
    Ok((params::Body(fields), image))
}

/// Queues the request as one job of `n` samples, waits for it, and answers in OpenAI's shape.
async fn run(
    app: &Arc<App>,
    caller: &crate::keys::Caller,
    request: openai::OpenAiRequest,
) -> Result<Value, ApiError> {
    let id = super::generate::submit(app, caller, &request.submission).await?;
    let job = super::generate::wait_finished(app, id).await?;
    if job.status == JobStatus::Failed {
        return Err(failure(job.error.as_deref()));
    }
    let prompt = &job.spec.request.prompt;
    let data: Vec<Value> = match request.response_format {
        ResponseFormat::Url => render::output_urls(&job, app.node.storage.as_ref())
            .into_iter()
            .map(|url| json!({"url": url, "revised_prompt": prompt}))
            .collect(),
        ResponseFormat::B64Json => super::generate::outputs_base64(app, &job)
            .await?
            .into_iter()
            .map(|b64| json!({"b64_json": b64, "revised_prompt": prompt}))
            .collect(),
    };
    let r = &job.spec.request;
    Ok(json!({
        "created": job.finished_at.unwrap_or(job.created_at) as i64,
        "data": data,
        "size": format!("{}x{}", r.width, r.height),
        "output_format": "png",
    }))
}
