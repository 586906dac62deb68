//! Latent Consistency Model multistep sampling (Luo et al. 2023), as diffusers' `LCMScheduler`: each step
//! predicts x0, applies the consistency boundary condition `denoised = c_out * x0 + c_skip * x_t`, and (except
//! on the last step of the schedule) re-noises `denoised` to the next timestep with fresh noise.
//!
//! Quirks kept from diffusers 0.42.1:
//! - Timesteps come from a "skipping-step" grid: `original_inference_steps` (default 50) timesteps
//!   `k, 2k, ..., 50k` minus 1 (k = `num_train_timesteps // original_inference_steps`), reversed, from which
//!   `steps` are taken at indices `floor(linspace(0, 50, steps, endpoint=False))`. `timestep_spacing` and
//!   `steps_offset` are read but play no part. `steps` above `original_inference_steps` is an error.
//! - `StableDiffusionImg2ImgPipeline` calls `set_timesteps(steps)` without `strength` and slices the result
//!   (`timesteps[t_start:]`, `set_begin_index(t_start)`), so the `strength` argument of `set_timesteps` (which
//!   would rebuild the grid from `original_inference_steps * strength`) is never used in img2img; this engine's
//!   pipeline does the same.
//! - `c_skip = 0.25 / ((10 t)² + 0.25)` and `c_out = 10 t / sqrt((10 t)² + 0.25)` (`timestep_scaling` 10,
//!   sigma_data 0.5), in float32 since the timestep arrives as a tensor.
//! - Noise (the model output's shape, one normal per element, from the pipeline's generator) is drawn on every
//!   step whose step index is not `steps - 1`, i.e. every step but the last of the full schedule; a one-step run
//!   draws none. The next timestep of the last step is the timestep itself (`alphas_cumprod` of it is unused).
//! - `clip_sample` (default false) clamps x0; `thresholding` is not implemented.
//! - Guidance: the pipeline applies plain classifier-free guidance, as diffusers does for a UNet without
//!   `time_cond_proj_dim`; an LCM-distilled UNet with a guidance embedding is not supported by this engine's UNet.

use candle_core::Tensor;
use serde_json::Value;

use super::config::{
    BetaConfig, BetaSchedule, ConfigReader, PredictionType, TimestepSpacing, ALL_PREDICTION_TYPES,
};
use super::ddim::{add_noise_ddpm, alpha_x0, clip_x0};
use super::schedule::NoiseSchedule;
use super::{ops, past_end, train_index, Scheduler, StepCursor};
use crate::error::{EngineError, Result};
use crate::rng::TorchGenerator;

const CLASS: &str = "LCMScheduler";

/// The constructor arguments of diffusers' `LCMScheduler`.
#[derive(Debug, Clone, PartialEq)]
pub struct LcmConfig {
    /// The training noise schedule (class defaults: scaled_linear 0.00085..0.012).
    pub beta: BetaConfig,
    /// `original_inference_steps` (default 50).
    pub original_inference_steps: usize,
    /// `clip_sample` (default false).
    pub clip_sample: bool,
    /// `clip_sample_range` (default 1.0).
    pub clip_sample_range: f64,
    /// `set_alpha_to_one` (default true; never reached with the built-in timestep grid).
    pub set_alpha_to_one: bool,
    /// `prediction_type` (default epsilon).
    pub prediction_type: PredictionType,
    /// `timestep_scaling` (default 10).
    pub timestep_scaling: f64,
}

impl LcmConfig {
    /// Reads a scheduler config with diffusers' `from_config` semantics.
    pub fn from_config(config: &Value) -> Result<Self> {
        let cfg = ConfigReader::new(CLASS, config)?;
        cfg.reject_true("thresholding", false)?;
        let defaults = BetaConfig {
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            ..BetaConfig::DIFFUSERS_DEFAULT
        };
        // Read (and so validated) like diffusers, though set_timesteps never looks at them.
        TimestepSpacing::read(&cfg, TimestepSpacing::Leading)?;
        cfg.i64("steps_offset", 0)?;
        Ok(LcmConfig {
            beta: BetaConfig::read(&cfg, &defaults, true)?,
            original_inference_steps: cfg.usize_at_least("original_inference_steps", 50, 1)?,
            clip_sample: cfg.bool("clip_sample", false)?,
            clip_sample_range: cfg.f64("clip_sample_range", 1.0)?,
            set_alpha_to_one: cfg.bool("set_alpha_to_one", true)?,
            prediction_type: PredictionType::read(&cfg, ALL_PREDICTION_TYPES)?,
            timestep_scaling: cfg.f64("timestep_scaling", 10.0)?,
        })
    }
}

/// diffusers' LCM timestep selection (`set_timesteps(steps, original_inference_steps, strength=strength)`).
pub fn lcm_timesteps(
    num_train: usize,
    original_steps: usize,
    steps: usize,
    strength: f64,
) -> Result<Vec<i64>> {
    let invalid =
        |msg: String| EngineError::invalid("num_inference_steps", format!("{CLASS}: {msg}"));
    if original_steps > num_train {
        return Err(invalid(format!(
            "original_inference_steps {original_steps} cannot be larger than num_train_timesteps {num_train}"
        )));
    }
    if steps > num_train {
        return Err(invalid(format!(
            "{steps} steps cannot be more than num_train_timesteps {num_train}"
        )));
    }
    let k = (num_train / original_steps) as i64;
    let count = (original_steps as f64 * strength) as usize;
    let origin: Vec<i64> = (1..=count as i64).rev().map(|i| i * k - 1).collect();
    if steps == 0 || origin.len() / steps < 1 {
        return Err(invalid(format!(
            "original_inference_steps × strength ({original_steps} × {strength}) is smaller than {steps} steps"
        )));
    }
    if steps > original_steps {
        return Err(invalid(format!(
            "{steps} steps cannot be more than original_inference_steps {original_steps}"
        )));
    }
    let step = origin.len() as f64 / steps as f64;
    Ok((0..steps)
        .map(|i| origin[(i as f64 * step).floor() as usize])
        .collect())
}

/// diffusers' `LCMScheduler` after `set_timesteps(steps)`.
#[derive(Debug, Clone)]
pub struct LcmScheduler {
    config: LcmConfig,
    alphas_cumprod: Vec<f32>,
    timesteps: Vec<f64>,
    cursor: StepCursor,
}

impl LcmScheduler {
    /// The scheduler for `config`, set up for `steps` inference steps.
    pub fn new(config: &LcmConfig, steps: usize) -> Result<Self> {
        let timesteps = lcm_timesteps(
            config.beta.num_train_timesteps,
            config.original_inference_steps,
            steps,
            1.0,
        )?;
        let schedule = NoiseSchedule::new(&config.beta)?;
        Ok(LcmScheduler {
            config: config.clone(),
            alphas_cumprod: schedule.alphas_cumprod,
            timesteps: timesteps.into_iter().map(|t| t as f64).collect(),
            cursor: StepCursor::default(),
        })
    }

    /// `(c_skip, c_out)` of the consistency boundary condition at `timestep`, in float32.
    pub fn boundary_scalings(&self, timestep: usize) -> (f32, f32) {
        let sigma_data = 0.5f32;
        let scaled = timestep as f32 * self.config.timestep_scaling as f32;
        let denom = scaled * scaled + sigma_data * sigma_data;
        (sigma_data * sigma_data / denom, scaled / denom.sqrt())
    }
}

impl Scheduler for LcmScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn set_begin_index(&mut self, index: usize) {
        self.cursor.begin_index = Some(index);
    }

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
        let i = self.cursor.current(CLASS, &self.timesteps, timestep)?;
        if i >= self.timesteps.len() {
            return Err(past_end(CLASS, i));
        }
        let t = train_index(CLASS, timestep, self.alphas_cumprod.len())?;
        let prev_t = match self.timesteps.get(i + 1) {
            Some(&p) => train_index(CLASS, p, self.alphas_cumprod.len())?,
            None => t,
        };
        let alpha_t = self.alphas_cumprod[t];
        // The grid's timesteps are all >= k - 1 >= 0, so diffusers' `final_alpha_cumprod` (set_alpha_to_one) is
        // never used on this path.
        let alpha_prev = self.alphas_cumprod[prev_t];
        let (beta_t, beta_prev) = (1.0 - alpha_t, 1.0 - alpha_prev);
        let (c_skip, c_out) = self.boundary_scalings(t);

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
        let denoised = (ops::mul(&x0, c_out)? + ops::mul(&x, c_skip)?)?;
        let prev = if i != self.timesteps.len() - 1 {
            let noise = rng.randn_tensor(
                model_output.shape(),
                model_output.dtype(),
                model_output.device(),
            )?;
            (ops::mul(&denoised, alpha_prev.sqrt())?
                + ops::mul(&ops::f32(&noise)?, beta_prev.sqrt())?)?
        } else {
            denoised
        };
        self.cursor.step_index = Some(i + 1);
        Ok(prev.to_dtype(model_output.dtype())?)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        add_noise_ddpm(CLASS, &self.alphas_cumprod, original, noise, timestep)
    }
}
