//! Samplers ("schedulers" in diffusers' words): each turns the UNet's prediction at one timestep into the
//! next, less noisy, latent. They are built from the model's `scheduler_config.json` the way diffusers'
//! `from_config` does, and share one interface so the pipeline never knows which one it drives.

use candle_core::Tensor;

use crate::error::{EngineError, Result};
use crate::rng::TorchGenerator;

/// Options of a request that shape the sampler beyond the model's own config.
#[derive(Debug, Clone, Default)]
pub struct SchedulerOptions {
    /// `use_karras_sigmas` from the request: use the Karras sigma schedule where the sampler supports it.
    pub use_karras_sigmas: bool,
    /// `algorithm_type` from the request (DPMSolverMultistepScheduler only).
    pub algorithm_type: Option<String>,
}

/// The interface every sampler implements; it mirrors diffusers' (`set_timesteps` happens at construction).
///
/// A scheduler is built per request and keeps its own step counter, as diffusers' does: `step` must be called
/// once per entry of `timesteps()[begin_index..]`, in order.
pub trait Scheduler: Send {
    /// The timesteps at which the UNet is evaluated, for the whole schedule (fractional for sigma-interpolated
    /// schedules). Second-order samplers list their intermediate evaluations too.
    fn timesteps(&self) -> &[f64];

    /// UNet evaluations per step: 2 for Heun-type samplers, else 1. img2img starts at `t_start * order`.
    fn order(&self) -> usize {
        1
    }

    /// The standard deviation of the initial noise (1 for DDIM-type, the largest sigma for Euler-type).
    fn init_noise_sigma(&self) -> f64;

    /// Sets the index into `timesteps()` of the first step that will run (img2img starts part-way).
    fn set_begin_index(&mut self, index: usize);

    /// Scales the denoising model input for the current step (identity for DDIM-type samplers).
    fn scale_model_input(&self, sample: &Tensor, timestep: f64) -> Result<Tensor>;

    /// Advances one step from `sample` given the model's (guided) output; stochastic samplers draw their noise
    /// from `rng`, in diffusers' order.
    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        rng: &mut TorchGenerator,
    ) -> Result<Tensor>;

    /// Noises `original` to the level of `timestep` (img2img's starting point).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor>;
}

/// Rejects a scheduler name the engine does not know, listing the ones it does.
pub fn unknown_scheduler(name: &str) -> EngineError {
    EngineError::invalid(
        "scheduler",
        format!(
            "unknown scheduler {name:?}; available: {}",
            SCHEDULER_NAMES.join(", ")
        ),
    )
}

/// The scheduler names this engine implements, as the API spells them.
pub const SCHEDULER_NAMES: &[&str] = &[];
