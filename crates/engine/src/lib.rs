//! Pictor's Stable Diffusion engine: img2img and InstructPix2Pix on candle.
//!
//! This crate knows nothing of HTTP, JSON dialects, databases or storage. It loads models from a models
//! folder, takes a typed request and returns images plus metadata, reporting progress through a callback
//! and honouring cancellation.

pub mod error;
pub mod rng;
pub mod schedulers;

pub use error::{EngineError, Result};
pub mod assets;
pub mod bench;
pub mod config;
pub mod demo;
pub mod embeddings;
pub mod hub;
pub mod image_io;
pub mod kernels;
pub mod models;
pub mod parity;
pub mod prompt_syntax;
pub mod runtime;
pub mod safety;
pub mod tokenizer;
pub use runtime::Runtime;
pub mod checkpoint;
pub mod lora;
pub mod model_store;
pub mod pipeline;
pub mod weights;
