//! Pictor's HTTP service: the ModelsLab / Stable Diffusion API img2img dialects in front of a job store, a worker
//! pool, output storage and webhooks. The generation itself is behind the [`backend::Backend`] trait, which the
//! `pictor` binary implements with the engine: this crate never touches tensors.

pub mod a1111;
pub mod app;
pub mod backend;
pub mod config;
pub mod destination;
pub mod disk_space;
pub mod family;
pub mod infotext;
pub mod init_image;
pub mod jobs;
pub mod keys;
pub mod metrics;
pub mod model_loads;
pub mod net_guard;
pub mod node;
pub mod openai;
pub mod openapi;
pub mod params;
pub mod prompt_enhance;
pub mod render;
pub mod request;
pub mod responses;
pub mod routes;
pub mod samplers;
pub mod shared_models;
pub mod storage;
pub mod webhook;
pub mod worker;

pub use app::{serve, App};
pub use backend::Backend;
pub use config::ServerConfig;
