//! DDPM ancestral sampling (Ho et al. 2020): the posterior mean of x_{t-1} given x_t and the predicted x0,
//! plus noise of the chosen fixed variance.
//!
//! Quirks kept from diffusers' `DDPMScheduler`:
//! - The previous timestep is the next entry of the schedule (−1, i.e. `alphas_cumprod = 1`, after the last);
//!   the default spacing is "leading"; `clip_sample` defaults to true; there is no begin index.
//! - Noise with the model output's shape is drawn from the generator at every step whose timestep is > 0
//!   (so with `steps_offset: 1` even the last step draws), after the posterior mean is formed.
//! - `variance_type`: `fixed_small` (default, the posterior variance), `fixed_small_log` (its square root via
//!   exp(log/2)), `fixed_large` (beta_t). `fixed_large_log` is broken in diffusers (it takes the square root of
//!   `log(beta_t) < 0`, so every step is NaN); here it is read as the log-variance it names and gives the same
//!   noise as `fixed_large` (std = exp(log(beta_t) / 2)). `learned`/`learned_range` need a UNet that predicts
//!   its variance (2x channels), which Stable Diffusion's does not: refused.

use candle_core::Tensor;
use serde_json::Value;

use super::config::{
    BetaConfig, ConfigReader, PredictionType, TimestepSpacing, ALL_PREDICTION_TYPES,
};
use super::ddim::{add_noise_ddpm, alpha_x0, clip_x0};
use super::schedule::{integer_timesteps, NoiseSchedule};
use super::{ops, train_index, Scheduler};
use crate::error::{EngineError, Result};
use crate::rng::TorchGenerator;

const CLASS: &str = "DDPMScheduler";

/// The variance of the noise added at each step (`variance_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VarianceType {
    /// The posterior variance `(1 - a_prev) / (1 - a_t) * beta_t` (clamped at 1e-20).
    FixedSmall,
    /// The same variance, its square root computed as `exp(0.5 * log(var))`.
    FixedSmallLog,
    /// `beta_t`.
    FixedLarge,
    /// `beta_t`, given as its logarithm (see the module notes).
    FixedLargeLog,
}

/// The constructor arguments of diffusers' `DDPMScheduler`.
#[derive(Debug, Clone, PartialEq)]
pub struct DdpmConfig {
    /// The training noise schedule (with `rescale_betas_zero_snr`).
    pub beta: BetaConfig,
    /// `variance_type` (default fixed_small).
    pub variance_type: VarianceType,
    /// `clip_sample` (default true).
    pub clip_sample: bool,
    /// `clip_sample_range` (default 1.0).
    pub clip_sample_range: f64,
    /// `prediction_type` (default epsilon).
    pub prediction_type: PredictionType,
    /// `timestep_spacing` (default leading).
    pub timestep_spacing: TimestepSpacing,
    /// `steps_offset` (default 0).
    pub steps_offset: i64,
}

impl DdpmConfig {
    /// Reads a scheduler config with diffusers' `from_config` semantics.
    pub fn from_config(config: &Value) -> Result<Self> {
        let cfg = ConfigReader::new(CLASS, config)?;
        cfg.reject_true("thresholding", false)?;
        if let Some(Value::String(v)) = cfg.raw("variance_type") {
            if v == "learned" || v == "learned_range" {
                return Err(cfg.unsupported(format_args!(
                    "`variance_type: {v:?}` (it needs a UNet that also predicts the variance, with twice the \
                     latent channels; Stable Diffusion UNets do not)"
                )));
            }
        }
        Ok(DdpmConfig {
            beta: BetaConfig::read(&cfg, &BetaConfig::DIFFUSERS_DEFAULT, true)?,
            variance_type: cfg.choice(
                "variance_type",
                VarianceType::FixedSmall,
                &[
                    ("fixed_small", VarianceType::FixedSmall),
                    ("fixed_small_log", VarianceType::FixedSmallLog),
                    ("fixed_large", VarianceType::FixedLarge),
                    ("fixed_large_log", VarianceType::FixedLargeLog),
                ],
            )?,
            clip_sample: cfg.bool("clip_sample", true)?,
            clip_sample_range: cfg.f64("clip_sample_range", 1.0)?,
            prediction_type: PredictionType::read(&cfg, ALL_PREDICTION_TYPES)?,
            timestep_spacing: TimestepSpacing::read(&cfg, TimestepSpacing::Leading)?,
            steps_offset: cfg.i64("steps_offset", 0)?,
        })
    }
}

/// diffusers' `DDPMScheduler` after `set_timesteps`.
#[derive(Debug, Clone)]
pub struct DdpmScheduler {
    config: DdpmConfig,
    alphas_cumprod: Vec<f32>,
    timesteps: Vec<f64>,
}

impl DdpmScheduler {
    /// The scheduler for `config`, set up for `steps` inference steps.
    pub fn new(config: &DdpmConfig, steps: usize) -> Result<Self> {
        let timesteps = integer_timesteps(
            CLASS,
            config.timestep_spacing,
            config.beta.num_train_timesteps,
            steps,
            config.steps_offset,
        )?;
        let schedule = NoiseSchedule::new(&config.beta)?;
        Ok(DdpmScheduler {
            config: config.clone(),
            alphas_cumprod: schedule.alphas_cumprod,
            timesteps,
        })
    }

    /// diffusers' `previous_timestep`: the entry after the first occurrence of `t`, or −1.
    fn previous_timestep(&self, t: f64) -> Result<i64> {
        let index = self.timesteps.iter().position(|&x| x == t).ok_or_else(|| {
            EngineError::invalid(
                "scheduler",
                format!("{CLASS}: timestep {t} is not in the schedule"),
            )
        })?;
        Ok(self.timesteps.get(index + 1).map_or(-1, |&p| p as i64))
    }

    fn alpha_at(&self, t: i64) -> Result<f32> {
        if t < 0 {
            return Ok(1.0);
        }
        let i = train_index(CLASS, t as f64, self.alphas_cumprod.len())?;
        Ok(self.alphas_cumprod[i])
    }
}

impl Scheduler for DdpmScheduler {
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
        rng: &mut TorchGenerator,
    ) -> Result<Tensor> {
        let t = train_index(CLASS, timestep, self.alphas_cumprod.len())?;
        let prev_t = self.previous_timestep(timestep)?;
        let alpha_t = self.alphas_cumprod[t];
        let alpha_prev = self.alpha_at(prev_t)?;
        let beta_t = 1.0 - alpha_t;
        let beta_prev = 1.0 - alpha_prev;
        let current_alpha = alpha_t / alpha_prev;
        let current_beta = 1.0 - current_alpha;

        let out = ops::f32(model_output)?;
        let x = ops::f32(sample)?;
        let x0 = alpha_x0(
            self.config.prediction_type,
            &x,
            &out,
            alpha_t.sqrt(),
            beta_t.sqrt(),
        )?;
        let x0 = clip_x0(x0, self.config.clip_sample, self.config.clip_sample_range)?;
        let x0_coeff = alpha_prev.sqrt() * current_beta / beta_t;
        let sample_coeff = current_alpha.sqrt() * beta_prev / beta_t;
        let mut prev = (ops::mul(&x0, x0_coeff)? + ops::mul(&x, sample_coeff)?)?;
        if t > 0 {
            let noise = rng.randn_tensor(
                model_output.shape(),
                model_output.dtype(),
                model_output.device(),
            )?;
            // _get_variance(t)
            let variance = ((1.0 - alpha_prev) / (1.0 - alpha_t) * current_beta).max(1e-20);
            let std = match self.config.variance_type {
                VarianceType::FixedSmall => variance.sqrt(),
                VarianceType::FixedSmallLog => (0.5 * variance.ln()).exp(),
                VarianceType::FixedLarge => current_beta.sqrt(),
                VarianceType::FixedLargeLog => (0.5 * current_beta.ln()).exp(),
            };
            prev = (prev + ops::mul(&ops::f32(&noise)?, std)?)?;
        }
        Ok(prev.to_dtype(model_output.dtype())?)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        add_noise_ddpm(CLASS, &self.alphas_cumprod, original, noise, timestep)
    }
}
