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
pub mod ddim_inverse;
pub mod ddpm;
pub mod deis;
pub mod dpmsolver_multistep;
pub mod dpmsolver_singlestep;
pub mod euler;
pub mod euler_ancestral;
pub mod heun;
pub mod ipndm;
pub(crate) mod k_common;
pub mod karras_ve;
pub mod kdpm2;
pub mod kdpm2_ancestral;
pub mod lcm;
pub mod lms;
pub mod model_sigmas;
pub(crate) mod multistep;
pub(crate) mod ops;
pub mod pndm;
pub mod schedule;
pub mod score_sde_ve;
pub mod unipc;

#[cfg(test)]
mod test_support;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_dpm;
#[cfg(test)]
mod tests_extra;
#[cfg(test)]
mod tests_k;

pub use ddim::DdimScheduler;
pub use ddim_inverse::DdimInverseScheduler;
pub use ddpm::DdpmScheduler;
pub use deis::DeisMultistepScheduler;
pub use dpmsolver_multistep::DpmSolverMultistepScheduler;
pub use dpmsolver_singlestep::DpmSolverSinglestepScheduler;
pub use euler::EulerDiscreteScheduler;
pub use euler_ancestral::EulerAncestralDiscreteScheduler;
pub use heun::HeunDiscreteScheduler;
pub use ipndm::IpndmScheduler;
pub use karras_ve::KarrasVeScheduler;
pub use kdpm2::Kdpm2DiscreteScheduler;
pub use kdpm2_ancestral::Kdpm2AncestralDiscreteScheduler;
pub use lcm::LcmScheduler;
pub use lms::LmsDiscreteScheduler;
pub use pndm::PndmScheduler;
pub use score_sde_ve::ScoreSdeVeScheduler;
pub use unipc::UniPcMultistepScheduler;

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

    /// For samplers whose img2img starts from a deterministic inversion of the init latents instead of added
    /// noise (DDIMInverseScheduler): the timesteps, in the order to run them (ascending), at which the model is
    /// evaluated to carry the clean latents up to `timesteps()[begin]`. The pipeline then skips `add_noise` and,
    /// starting from the init latents, calls `scale_model_input`, the model (unguided) and [`Self::invert_step`]
    /// for each of them, and denoises from the result as usual. `None` (the default): use `add_noise`.
    fn inversion_timesteps(&self, _begin: usize) -> Option<Vec<f64>> {
        None
    }

    /// One inversion step: the sample one level noisier, given the model's output for `sample` at `timestep` (an
    /// entry of `inversion_timesteps`). Only samplers whose `inversion_timesteps` is `Some` implement it.
    fn invert_step(
        &mut self,
        _model_output: &Tensor,
        timestep: f64,
        _sample: &Tensor,
    ) -> Result<Tensor> {
        Err(EngineError::invalid(
            "scheduler",
            format!("this sampler has no inversion step (timestep {timestep})"),
        ))
    }
}

/// The scheduler names this engine implements, as the API spells them (diffusers' class names).
pub const SCHEDULER_NAMES: &[&str] = &[
    "DDIMScheduler",
    "PNDMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "LMSDiscreteScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DDPMScheduler",
    "LCMScheduler",
    "IPNDMScheduler",
    "KarrasVeScheduler",
    "ScoreSdeVeScheduler",
    "DDIMInverseScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
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
        "LCMScheduler" => Box::new(LcmScheduler::new(
            &lcm::LcmConfig::from_config(config)?,
            num_inference_steps,
        )?),
        "IPNDMScheduler" => Box::new(IpndmScheduler::from_config(
            config,
            num_inference_steps,
            opts,
        )?),
        "KarrasVeScheduler" => Box::new(KarrasVeScheduler::from_config(
            config,
            num_inference_steps,
            opts,
        )?),
        "ScoreSdeVeScheduler" => Box::new(ScoreSdeVeScheduler::from_config(
            config,
            num_inference_steps,
            opts,
        )?),
        "DDIMInverseScheduler" => Box::new(DdimInverseScheduler::from_config(
            config,
            num_inference_steps,
        )?),
        "DPMSolverMultistepScheduler" => Box::new(DpmSolverMultistepScheduler::new(
            &dpmsolver_multistep::DpmMultistepConfig::from_config(config, opts)?,
            num_inference_steps,
        )?),
        "DPMSolverSinglestepScheduler" => Box::new(DpmSolverSinglestepScheduler::new(
            &dpmsolver_singlestep::DpmSinglestepConfig::from_config(config, opts)?,
            num_inference_steps,
        )?),
        "UniPCMultistepScheduler" => Box::new(UniPcMultistepScheduler::new(
            &unipc::UniPcConfig::from_config(config, opts)?,
            num_inference_steps,
        )?),
        "DEISMultistepScheduler" => Box::new(DeisMultistepScheduler::new(
            &deis::DeisConfig::from_config(config, opts)?,
            num_inference_steps,
        )?),
        "LMSDiscreteScheduler" => Box::new(LmsDiscreteScheduler::new(
            &lms::LmsConfig::from_config(config, opts)?,
            num_inference_steps,
        )?),
        "HeunDiscreteScheduler" => Box::new(HeunDiscreteScheduler::new(
            &heun::HeunConfig::from_config(config, opts)?,
            num_inference_steps,
        )?),
        "KDPM2DiscreteScheduler" => Box::new(Kdpm2DiscreteScheduler::new(
            &kdpm2::Kdpm2Config::from_config(config, opts)?,
            num_inference_steps,
        )?),
        "KDPM2AncestralDiscreteScheduler" => Box::new(Kdpm2AncestralDiscreteScheduler::new(
            &kdpm2_ancestral::Kdpm2AncestralConfig::from_config(config, opts)?,
            num_inference_steps,
        )?),
        "DDPMScheduler" => Box::new(DdpmScheduler::new(
            &ddpm::DdpmConfig::from_config(config)?,
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

    /// [`StepCursor::current`], refused as past the end when `sigmas_len` leaves no sigma after it.
    pub fn current_before_last(
        &self,
        class: &str,
        timesteps: &[f64],
        timestep: f64,
        sigmas_len: usize,
    ) -> Result<usize> {
        let i = self.current(class, timesteps, timestep)?;
        if i + 1 >= sigmas_len {
            return Err(past_end(class, i));
        }
        Ok(i)
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
