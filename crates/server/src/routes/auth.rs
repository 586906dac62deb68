//! Reading a request: the body (within the size limit) and the caller's key.

use std::time::Duration;

use axum::body::Body;
use axum::http::HeaderMap;
use futures_util::StreamExt;

use crate::app::App;
use crate::keys::Caller;
use crate::params;
use crate::responses::ApiError;

/// After a body passes the limit, at most this much more is read (and dropped) before answering, so a client
/// still sending gets to read the error instead of a reset connection.
const MAX_DRAIN_BYTES: usize = 64 << 20;
/// And for at most this long.
const MAX_DRAIN_TIME: Duration = Duration::from_secs(5);

/// Reads the whole body, refusing more than `--max-body-bytes`, and parses it as a JSON object.
pub async fn read_body(app: &App, body: Body) -> Result<params::Body, ApiError> {
    let bytes = read_bytes(body, app.node.config.max_body_bytes).await?;
    params::Body::parse(&bytes)
}

/// Reads the whole body as bytes, refusing more than `limit`. An over-limit body is drained (within
/// `MAX_DRAIN_BYTES` and `MAX_DRAIN_TIME`) before the refusal, so the client reads the error.
pub async fn read_bytes(body: Body, limit: usize) -> Result<Vec<u8>, ApiError> {
    let mut stream = body.into_data_stream();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|_| ApiError::message("the request body could not be read"))?;
        if bytes.len() + chunk.len() > limit {
            let deadline = tokio::time::Instant::now() + MAX_DRAIN_TIME;
            let mut drained = chunk.len();
            while drained < MAX_DRAIN_BYTES {
                match tokio::time::timeout_at(deadline, stream.next()).await {
                    Ok(Some(Ok(more))) => drained += more.len(),
                    _ => break,
                }
            }
            return Err(ApiError::message(format!(
                "the request body is larger than the {} MiB limit",
                limit >> 20
            )));
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// The key from the body's `key`, else a `key` header, else `Authorization: Bearer`.
fn presented_key<'a>(body: &'a params::Body, headers: &'a HeaderMap) -> Option<String> {
    if let Ok(Some(k)) = body.string(&["key"]) {
        return Some(k);
    }
    if let Some(k) = headers.get("key").and_then(|v| v.to_str().ok()) {
        return Some(k.to_string());
    }
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string)
}

/// The caller a key stands for, or the API's invalid-key error.
fn caller_of(app: &App, key: Option<&str>) -> Result<Caller, ApiError> {
    let key = key.ok_or(ApiError::InvalidKey)?;
    app.keys
        .read()
        .expect("key store")
        .check(key.trim())
        .ok_or(ApiError::InvalidKey)
}

/// The caller, or the API's invalid-key error.
pub fn caller(app: &App, body: &params::Body, headers: &HeaderMap) -> Result<Caller, ApiError> {
    caller_of(app, presented_key(body, headers).as_deref())
}

/// The key a request carries in its headers: `Authorization: Basic` (the password, or the user name when the
/// password is empty: AUTOMATIC1111's `--api-auth` clients), `Authorization: Bearer` (OpenAI's SDK), or a
/// `key` header.
fn header_key(headers: &HeaderMap) -> Option<String> {
    use base64::Engine as _;
    let auth = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    if let Some(encoded) = auth.and_then(|a| a.strip_prefix("Basic ")) {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (user, password) = text.split_once(':').unwrap_or((&text, ""));
        return Some(if password.is_empty() { user } else { password }.to_string());
    }
    if let Some(token) = auth.and_then(|a| a.strip_prefix("Bearer ")) {
        return Some(token.trim().to_string());
    }
    headers
        .get("key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// The caller from the headers alone (the dialects whose key never travels in the body), or the invalid-key
/// error.
pub fn caller_from_headers(app: &App, headers: &HeaderMap) -> Result<Caller, ApiError> {
    caller_of(app, header_key(headers).as_deref())
}

/// The caller from `?key=` (a browser's EventSource cannot set headers), else from the headers.
pub fn caller_from_query_or_headers(
    app: &App,
    query_key: Option<&str>,
    headers: &HeaderMap,
) -> Result<Caller, ApiError> {
    match query_key {
        Some(key) => caller_of(app, Some(key)),
        None => caller_from_headers(app, headers),
    }
}

/// The request's `Idempotency-Key` header: a retry carrying the same one answers the first request's job.
pub fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|k| !k.is_empty() && k.len() <= 255)
        .ok_or_else(|| {
            ApiError::field(
                "Idempotency-Key",
                "must be printable text of at most 255 characters",
            )
        })?;
    Ok(Some(format!("header:{key}")))
}

/// The caller, who must hold an admin key.
pub fn admin(app: &App, body: &params::Body, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let c = caller(app, body, headers)?;
    if !c.admin {
        return Err(ApiError::Forbidden(
            "this management route needs an admin key (pictor serve --admin-key)".into(),
        ));
    }
    Ok(c)
}
