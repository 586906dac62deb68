//! Errors in the API's own shape. Bad keys and bad input are HTTP 200 with `{"status":"error","message":…}`
//! (the legacy API's behaviour, which its clients rely on); a full queue is 429 with `retry_after`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

/// The tip the hosted API sends with an invalid key.
const KEY_TIP: &str = "1. Make sure you are passing Content-Type: application/json in header. 2. Make sure you are \
doing POST request with valid JSON. 3. Make sure your JSON does not have error, use jsonlint to validate json array. \
4. Make sure you have valid API key.";

/// Seconds a client is told to wait when its queue is full.
pub const RETRY_AFTER_SECS: u64 = 30;

/// A request the service refuses, rendered in the API's error shape.
#[derive(Debug, Clone, PartialEq)]
pub enum ApiError {
    /// One field is missing or wrong; the message names it.
    Field {
        /// The field, as the API spells it.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// Anything else the requester can fix.
    Message(String),
    /// The key is missing or unknown.
    InvalidKey,
    /// The key is valid but may not use this route.
    Forbidden(String),
    /// The key already has `limit` jobs waiting.
    QueueFull {
        /// The per-key limit.
        limit: usize,
    },
    /// The service failed (not the requester's fault).
    Internal(String),
    /// A part the service depends on (the job database) cannot be reached now; the request may be retried.
    Unavailable(String),
}

impl ApiError {
    /// A field error.
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::Field {
            field: field.into(),
            message: message.into(),
        }
    }

    /// A required field is absent (Laravel's wording, which the hosted API uses).
    pub fn required(field: &str) -> Self {
        ApiError::field(
            field,
            format!("The {} field is required.", field.replace('_', " ")),
        )
    }

    /// A plain message error.
    pub fn message(message: impl Into<String>) -> Self {
        ApiError::Message(message.into())
    }

    /// The field at fault, for field errors.
    pub fn field_name(&self) -> Option<&str> {
        match self {
            ApiError::Field { field, .. } => Some(field),
            _ => None,
        }
    }

    /// The JSON body and HTTP status.
    pub fn to_body(&self) -> (StatusCode, Value) {
        let text = self.to_string();
        match self {
            ApiError::Field { field, message } => (
                StatusCode::OK,
                json!({"status": "error", "message": text, "messege": text,
                       "errors": {field.clone(): [message]}}),
            ),
            ApiError::InvalidKey => (
                StatusCode::OK,
                json!({"status": "error", "message": text, "messege": text, "tip": KEY_TIP}),
            ),
            ApiError::QueueFull { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                json!({"status": "error", "message": text, "messege": text,
                       "retry_after": RETRY_AFTER_SECS}),
            ),
            ApiError::Unavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"status": "error", "message": text, "messege": text,
                       "retry_after": RETRY_AFTER_SECS}),
            ),
            ApiError::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"status": "error", "message": text, "messege": text}),
            ),
            ApiError::Message(_) | ApiError::Forbidden(_) => (
                StatusCode::OK,
                json!({"status": "error", "message": text, "messege": text}),
            ),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApiError::Field { field, message } if message.starts_with("The ") => {
                let _ = field;
                f.write_str(message)
            }
            ApiError::Field { field, message } => write!(f, "{field}: {message}"),
            ApiError::Message(m) | ApiError::Forbidden(m) => f.write_str(m),
            ApiError::InvalidKey => f.write_str("Invalid Api Key"),
            ApiError::QueueFull { limit } => write!(
                f,
                "Rate limit exceeded. Maximum {limit} queued requests allowed."
            ),
            ApiError::Internal(m) => write!(f, "Internal server error: {m}"),
            ApiError::Unavailable(m) => write!(f, "Service unavailable, try again shortly: {m}"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match &self {
            ApiError::Internal(m) => tracing::error!(error = %m, "internal error"),
            ApiError::Unavailable(m) => tracing::warn!(error = %m, "dependency unavailable"),
            _ => {}
        }
        let (status, body) = self.to_body();
        (status, Json(body)).into_response()
    }
}

/// Job store failures: an unreachable, busy or full database is worth a retry (503), anything else is the service's fault.
impl From<crate::jobs::StoreError> for ApiError {
    fn from(e: crate::jobs::StoreError) -> Self {
        if e.is_transient() {
            ApiError::Unavailable(e.to_string())
        } else {
            ApiError::Internal(e.to_string())
        }
    }
}

/// Backend failures as the API reports them: a bad request value names its field.
impl From<crate::backend::BackendError> for ApiError {
    fn from(e: crate::backend::BackendError) -> Self {
        use crate::backend::BackendError;
        match e {
            BackendError::ModelNotFound(id) => ApiError::message(format!("Model not found: {id}")),
            BackendError::Invalid { field, message } => ApiError::field(field, message),
            other => ApiError::message(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        let (status, body) = ApiError::required("init_image").to_body();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["status"], "error");
        assert_eq!(body["message"], "The init image field is required.");
        assert_eq!(
            body["errors"]["init_image"][0],
            "The init image field is required."
        );

        let (status, body) = ApiError::QueueFull { limit: 5 }.to_body();
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(body["retry_after"], 30);
        assert_eq!(
            body["message"],
            "Rate limit exceeded. Maximum 5 queued requests allowed."
        );

        let (_, body) = ApiError::InvalidKey.to_body();
        assert_eq!(body["message"], "Invalid Api Key");
        assert!(body["tip"].as_str().unwrap().contains("valid API key"));
    }
}
