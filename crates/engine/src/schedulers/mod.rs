//! Samplers ("schedulers" in diffusers' words): each turns the UNet's prediction at one timestep into the
//! next, less noisy, latent. They are built from the model's `scheduler_config.json` the way diffusers'
//! `from_config` does, and share one interface so the pipeline never knows which one it drives.
//!
//! Layout: [`config`] reads a config file with diffusers' `from_config` semantics, [`schedule`] holds the
//! training noise schedule and the timestep/sigma arithmetic the samplers share, and each sampler lives in
//! its own module. Every sampler reproduces its diffusers class (0.42.1) step for step, including the quirks
//! a pipeline relies on (see each module's notes).

use candle_core::Tensor;
use serde_json::Value;

use crate::error::{EngineError, Result};
use crate::rng::TorchGenerator;

pub mod config;
pub mod ddim;
pub mod euler;
pub mod euler_ancestral;
pub(crate) mod ops;
pub mod pndm;
pub mod schedule;

#[cfg(test)]
mod tests;

pub use ddim::DdimScheduler;
pub use euler::EulerDiscreteScheduler;
pub use euler_ancestral::EulerAncestralDiscreteScheduler;
pub use pndm::PndmScheduler;

/// Options of a request that shape the sampler beyond the model's own config.
#[derive(Debug, Clone, Default)]
pub struct SchedulerOptions {
    /// `use_karras_sigmas` from the request: use the Karras sigma schedule where the sampler supports it.
    /// `Some(v)` acts like the keyword argument `use_karras_sigmas=v` to diffusers' `from_config` (it wins over
    /// the config for samplers that take it and is ignored by the others); `None` leaves the config's value.
    pub use_karras_sigmas: Option<bool>,
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
    /// Samplers that have no such notion in diffusers (DDIM, PNDM) ignore it.
    fn set_begin_index(&mut self, index: usize);

    /// Scales the denoising model input for the current step (identity for DDIM-type samplers).
    fn scale_model_input(&self, sample: &Tensor, timestep: f64) -> Result<Tensor>;

    /// Advances one step from `sample` given the model's (guided) output; stochastic samplers draw their noise
    /// from `rng`, in diffusers' order. The result has `model_output`'s dtype; the arithmetic is float32.
    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        rng: &mut TorchGenerator,
    ) -> Result<Tensor>;

    /// Noises `original` to the level of `timestep` (img2img's starting point).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor>;

    /// The sigma schedule (one more entry than steps, ending in the final sigma) of samplers that work in
    /// sigma space; `None` for the others.
    fn sigmas(&self) -> Option<&[f64]> {
        None
    }
}

/// The scheduler names this engine implements, as the API spells them (diffusers' class names).
pub const SCHEDULER_NAMES: &[&str] = &[
    "DDIMScheduler",
    "PNDMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
];

/// Builds scheduler `name` from a model's scheduler config (diffusers' `from_config`, with `opts` as keyword
/// arguments) and sets it up for `num_inference_steps` steps (diffusers' `set_timesteps`).
///
/// Errors: an unknown `name` (listing the known ones), a config value of the wrong type or out of range
/// (naming the class and key), an option this engine does not implement (e.g. `thresholding: true`), or a
/// step count the sampler cannot run.
pub fn build(
    name: &str,
    config: &Value,
    num_inference_steps: usize,
    opts: &SchedulerOptions,
) -> Result<Box<dyn Scheduler>> {
    if !SCHEDULER_NAMES.contains(&name) {
        return Err(unknown_scheduler(name));
    }
    if num_inference_steps == 0 {
        return Err(EngineError::invalid(
            "num_inference_steps",
            "must be at least 1",
        ));
    }
    Ok(match name {
        "DDIMScheduler" => Box::new(DdimScheduler::new(
            &ddim::DdimConfig::from_config(config)?,
            num_inference_steps,
        )?),
        "PNDMScheduler" => Box::new(PndmScheduler::new(
            &pndm::PndmConfig::from_config(config)?,
            num_inference_steps,
        )?),
        "EulerDiscreteScheduler" => Box::new(EulerDiscreteScheduler::new(
            &euler::EulerConfig::from_config(config, opts)?,
            num_inference_steps,
        )?),
        "EulerAncestralDiscreteScheduler" => Box::new(EulerAncestralDiscreteScheduler::new(
            &euler_ancestral::EulerAncestralConfig::from_config(config)?,
            num_inference_steps,
        )?),
        _ => return Err(unknown_scheduler(name)),
    })
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

/// A training timestep given as f64 turned into an index into the training schedule.
pub(crate) fn train_index(class: &str, timestep: f64, len: usize) -> Result<usize> {
    if timestep.fract() != 0.0 || timestep < 0.0 || timestep >= len as f64 {
        return Err(EngineError::invalid(
            "scheduler",
            format!("{class}: timestep {timestep} is not a training timestep in 0..{len}"),
        ));
    }
    Ok(timestep as usize)
}

/// Where a sigma-space sampler is in its schedule: diffusers' `_begin_index` and `_step_index`.
#[derive(Debug, Clone, Default)]
pub(crate) struct StepCursor {
    pub begin_index: Option<usize>,
    pub step_index: Option<usize>,
}

impl StepCursor {
    /// diffusers' `index_for_timestep`: the position of `timestep` in the schedule, the second one when it
    /// appears more than once (so an img2img run that starts on a repeated timestep does not skip a sigma).
    pub fn index_for_timestep(class: &str, timesteps: &[f64], timestep: f64) -> Result<usize> {
        let hits: Vec<usize> = timesteps
            .iter()
            .enumerate()
            .filter(|(_, &t)| t == timestep)
            .map(|(i, _)| i)
            .collect();
        match hits.len() {
            0 => Err(EngineError::invalid(
                "scheduler",
                format!("{class}: timestep {timestep} is not in the schedule"),
            )),
            1 => Ok(hits[0]),
            _ => Ok(hits[1]),
        }
    }

    /// The step index the next `scale_model_input`/`step` uses (diffusers' `_init_step_index` when unset).
    pub fn current(&self, class: &str, timesteps: &[f64], timestep: f64) -> Result<usize> {
        match (self.step_index, self.begin_index) {
            (Some(i), _) => Ok(i),
            (None, Some(b)) => Ok(b),
            (None, None) => Self::index_for_timestep(class, timesteps, timestep),
        }
    }

    /// The index `add_noise` takes its sigma from.
    pub fn noise_index(&self, class: &str, timesteps: &[f64], timestep: f64) -> Result<usize> {
        match (self.begin_index, self.step_index) {
            (None, _) => Self::index_for_timestep(class, timesteps, timestep),
            (Some(_), Some(i)) => Ok(i),
            (Some(b), None) => Ok(b),
        }
    }
}

/// The error for a `step` past the end of the schedule.
pub(crate) fn past_end(class: &str, index: usize) -> EngineError {
    EngineError::invalid(
        "scheduler",
        format!("{class}: step {index} is past the end of the schedule"),
    )
}
