//! DDIM (Song et al. 2020), deterministic (eta = 0, as Stable Diffusion pipelines run it).
//!
//! Quirks kept from diffusers' `DDIMScheduler`: the previous timestep is always `t - T / steps` (integer
//! division), whatever the spacing; below 0 it uses `final_alpha_cumprod` (1 with `set_alpha_to_one`, else
//! `alphas_cumprod[0]`); `clip_sample` (default true!) clamps the predicted x0; there is no begin index.

use candle_core::Tensor;
use serde_json::Value;

use super::config::{
    BetaConfig, ConfigReader, PredictionType, TimestepSpacing, ALL_PREDICTION_TYPES,
};
use super::schedule::{integer_timesteps, NoiseSchedule};
use super::{ops, train_index, Scheduler};
use crate::error::Result;
use crate::rng::TorchGenerator;

const CLASS: &str = "DDIMScheduler";

/// The constructor arguments of diffusers' `DDIMScheduler`.
#[derive(Debug, Clone, PartialEq)]
pub struct DdimConfig {
    /// The training noise schedule.
    pub beta: BetaConfig,
    /// `clip_sample` (default true).
    pub clip_sample: bool,
    /// `clip_sample_range` (default 1.0).
    pub clip_sample_range: f64,
    /// `set_alpha_to_one` (default true).
    pub set_alpha_to_one: bool,
    /// `steps_offset` (default 0).
    pub steps_offset: i64,
    /// `prediction_type` (default epsilon).
    pub prediction_type: PredictionType,
    /// `timestep_spacing` (default leading).
    pub timestep_spacing: TimestepSpacing,
}

impl DdimConfig {
    /// Reads a scheduler config with diffusers' `from_config` semantics.
    pub fn from_config(config: &Value) -> Result<Self> {
        let cfg = ConfigReader::new(CLASS, config)?;
        cfg.reject_true("thresholding", false)?;
        Ok(DdimConfig {
            beta: BetaConfig::read(&cfg, &BetaConfig::DIFFUSERS_DEFAULT, true)?,
            clip_sample: cfg.bool("clip_sample", true)?,
            clip_sample_range: cfg.f64("clip_sample_range", 1.0)?,
            set_alpha_to_one: cfg.bool("set_alpha_to_one", true)?,
            steps_offset: cfg.i64("steps_offset", 0)?,
            prediction_type: PredictionType::read(&cfg, ALL_PREDICTION_TYPES)?,
            timestep_spacing: TimestepSpacing::read(&cfg, TimestepSpacing::Leading)?,
        })
    }
}

/// diffusers' `DDIMScheduler` after `set_timesteps`.
#[derive(Debug, Clone)]
pub struct DdimScheduler {
    config: DdimConfig,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    num_inference_steps: usize,
    timesteps: Vec<f64>,
}

impl DdimScheduler {
    /// The scheduler for `config`, set up for `steps` inference steps.
    pub fn new(config: &DdimConfig, steps: usize) -> Result<Self> {
        let timesteps = integer_timesteps(
            CLASS,
            config.timestep_spacing,
            config.beta.num_train_timesteps,
            steps,
            config.steps_offset,
        )?;
        let schedule = NoiseSchedule::new(&config.beta)?;
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            schedule.alphas_cumprod[0]
        };
        Ok(DdimScheduler {
            config: config.clone(),
            alphas_cumprod: schedule.alphas_cumprod,
            final_alpha_cumprod,
            num_inference_steps: steps,
            timesteps,
        })
    }

    /// The cumulative alpha products of the training schedule.
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }
}

impl Scheduler for DdimScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn set_begin_index(&mut self, _index: usize) {}

    fn scale_model_input(&self, sample: &Tensor, _timestep: f64) -> Result<Tensor> {
        Ok(sample.clone())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        _rng: &mut TorchGenerator,
    ) -> Result<Tensor> {
        let train = self.alphas_cumprod.len();
        let t = train_index(CLASS, timestep, train)?;
        let prev =
            t as i64 - (self.config.beta.num_train_timesteps / self.num_inference_steps) as i64;
        let alpha_t = self.alphas_cumprod[t];
        let alpha_prev = if prev >= 0 {
            self.alphas_cumprod[prev as usize]
        } else {
            self.final_alpha_cumprod
        };
        let beta_t = 1.0 - alpha_t;
        let (sqrt_a, sqrt_b) = (alpha_t.sqrt(), beta_t.sqrt());

        let out = ops::f32(model_output)?;
        let x = ops::f32(sample)?;
        let (x0, eps) = x0_and_eps(self.config.prediction_type, &x, out, sqrt_a, sqrt_b)?;
        let x0 = clip_x0(x0, self.config.clip_sample, self.config.clip_sample_range)?;
        // eta = 0: the noise term vanishes and the direction coefficient is sqrt(1 - alpha_prev).
        let direction = ops::mul(&eps, (1.0 - alpha_prev).sqrt())?;
        let prev_sample = (ops::mul(&x0, alpha_prev.sqrt())? + direction)?;
        Ok(prev_sample.to_dtype(model_output.dtype())?)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        add_noise_ddpm(CLASS, &self.alphas_cumprod, original, noise, timestep)
    }
}

/// The x0 prediction of the DDPM-family samplers from a model output, with `sqrt_a = sqrt(alpha_t)` and
/// `sqrt_b = sqrt(1 - alpha_t)` (float32 arithmetic).
pub(crate) fn alpha_x0(
    kind: PredictionType,
    x: &Tensor,
    out: &Tensor,
    sqrt_a: f32,
    sqrt_b: f32,
) -> Result<Tensor> {
    Ok(match kind {
        PredictionType::Epsilon => ops::div(&(x - ops::mul(out, sqrt_b)?)?, sqrt_a)?,
        PredictionType::Sample => out.clone(),
        PredictionType::VPrediction => (ops::mul(x, sqrt_a)? - ops::mul(out, sqrt_b)?)?,
    })
}

/// DDIM's `(x0, eps)` pair: [`alpha_x0`] and the matching noise prediction.
pub(crate) fn x0_and_eps(
    kind: PredictionType,
    x: &Tensor,
    out: Tensor,
    sqrt_a: f32,
    sqrt_b: f32,
) -> Result<(Tensor, Tensor)> {
    let x0 = alpha_x0(kind, x, &out, sqrt_a, sqrt_b)?;
    let eps = match kind {
        PredictionType::Epsilon => out,
        PredictionType::Sample => ops::div(&(x - ops::mul(&out, sqrt_a)?)?, sqrt_b)?,
        PredictionType::VPrediction => (ops::mul(&out, sqrt_a)? + ops::mul(x, sqrt_b)?)?,
    };
    Ok((x0, eps))
}

/// `x0` clamped to `[-range, range]` when `clip_sample` is set.
pub(crate) fn clip_x0(x0: Tensor, clip_sample: bool, range: f64) -> Result<Tensor> {
    if clip_sample {
        let r = range as f32;
        return Ok(x0.clamp(-r, r)?);
    }
    Ok(x0)
}

/// The DDPM forward process `sqrt(a_t) * x0 + sqrt(1 - a_t) * noise`, in the dtype of `original`.
pub(crate) fn add_noise_ddpm(
    class: &str,
    alphas_cumprod: &[f32],
    original: &Tensor,
    noise: &Tensor,
    timestep: f64,
) -> Result<Tensor> {
    let t = train_index(class, timestep, alphas_cumprod.len())?;
    let a = alphas_cumprod[t];
    let noise = noise.to_dtype(original.dtype())?;
    Ok((ops::mul(original, a.sqrt())? + ops::mul(&noise, (1.0 - a).sqrt())?)?)
}
