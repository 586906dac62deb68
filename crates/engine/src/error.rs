//! The engine's error type: every failure a caller can see, each naming the problem.

use std::path::PathBuf;

/// Everything that can go wrong inside the engine. Messages are written for the person who sent the request.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A request field is out of range or inconsistent (the field's name comes first).
    #[error("{field}: {message}")]
    InvalidRequest {
        /// The API body field (or CLI option) at fault.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// The requested model id or path does not exist in the models folder.
    #[error("model not found: {0}")]
    ModelNotFound(String),
    /// A model exists but cannot be used (missing component, bad config, wrong tensor shapes, pickle file, …).
    #[error("model {model}: {message}")]
    InvalidModel {
        /// Which model (id or path).
        model: String,
        /// What is wrong with it.
        message: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The init image could not be decoded.
    #[error("init_image: {0}")]
    BadImage(String),
    /// A capability that exists in the API but is not implemented yet.
    #[error("{0} is not supported yet")]
    Unsupported(String),
    /// The request was cancelled by its caller.
    #[error("cancelled")]
    Cancelled,
    /// A tensor operation failed (a bug or an inconsistent model).
    #[error("tensor error: {0}")]
    Tensor(#[from] candle_core::Error),
    /// Downloading a model failed.
    #[error("download failed: {0}")]
    Download(String),
}

impl EngineError {
    /// Shorthand for [`EngineError::InvalidRequest`].
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        EngineError::InvalidRequest {
            field,
            message: message.into(),
        }
    }

    /// Shorthand for [`EngineError::InvalidModel`].
    pub fn model(model: impl Into<String>, message: impl Into<String>) -> Self {
        EngineError::InvalidModel {
            model: model.into(),
            message: message.into(),
        }
    }

    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        EngineError::Io {
            path: path.into(),
            source,
        }
    }
}

/// The engine's result type.
pub type Result<T> = std::result::Result<T, EngineError>;
