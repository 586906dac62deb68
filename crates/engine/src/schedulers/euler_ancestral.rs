//! Euler ancestral (k-diffusion `sample_euler_ancestral`, eta = 1): an Euler step down to `sigma_down`, then
//! fresh noise of standard deviation `sigma_up`.
//!
//! Quirks kept from diffusers' `EulerAncestralDiscreteScheduler`: it takes no `use_karras_sigmas` (the
//! request's flag is ignored, as `from_config` ignores it); the noise is drawn with the model output's shape
//! at every step, the last one included (where `sigma_up` is 0), so each step consumes
//! `model_output.elem_count()` normals from the generator; timesteps, `init_noise_sigma` and `add_noise`
//! behave as in [`super::euler`].

use candle_core::Tensor;
use serde_json::Value;

use super::config::{
    BetaConfig, ConfigReader, PredictionType, TimestepSpacing, ALL_PREDICTION_TYPES,
};
use super::euler::{
    add_noise_at_cursor, base_timesteps, init_noise_sigma, predict_x0, scale_at_cursor,
    training_sigmas,
};
use super::schedule::interp;
use super::{ops, Scheduler, StepCursor};
use crate::error::{EngineError, Result};
use crate::rng::TorchGenerator;

const CLASS: &str = "EulerAncestralDiscreteScheduler";

/// The constructor arguments of diffusers' `EulerAncestralDiscreteScheduler`.
#[derive(Debug, Clone, PartialEq)]
pub struct EulerAncestralConfig {
    /// The training noise schedule.
    pub beta: BetaConfig,
    /// `prediction_type` (default epsilon; diffusers has not implemented `sample`).
    pub prediction_type: PredictionType,
    /// `timestep_spacing` (default linspace).
    pub timestep_spacing: TimestepSpacing,
    /// `steps_offset` (default 0).
    pub steps_offset: i64,
}

impl EulerAncestralConfig {
    /// Reads a scheduler config with diffusers' `from_config` semantics.
    pub fn from_config(config: &Value) -> Result<Self> {
        let cfg = ConfigReader::new(CLASS, config)?;
        let prediction_type = PredictionType::read(&cfg, ALL_PREDICTION_TYPES)?;
        if prediction_type == PredictionType::Sample {
            return Err(
                cfg.unsupported("`prediction_type: \"sample\"` (diffusers does not implement it)")
            );
        }
        Ok(EulerAncestralConfig {
            beta: BetaConfig::read(&cfg, &BetaConfig::DIFFUSERS_DEFAULT, true)?,
            prediction_type,
            timestep_spacing: TimestepSpacing::read(&cfg, TimestepSpacing::Linspace)?,
            steps_offset: cfg.i64("steps_offset", 0)?,
        })
    }
}

/// diffusers' `EulerAncestralDiscreteScheduler` after `set_timesteps`.
#[derive(Debug, Clone)]
pub struct EulerAncestralDiscreteScheduler {
    config: EulerAncestralConfig,
    sigmas32: Vec<f32>,
    sigmas: Vec<f64>,
    timesteps: Vec<f64>,
    init_noise_sigma: f64,
    cursor: StepCursor,
}

impl EulerAncestralDiscreteScheduler {
    /// The scheduler for `config`, set up for `steps` inference steps.
    pub fn new(config: &EulerAncestralConfig, steps: usize) -> Result<Self> {
        if steps == 0 {
            return Err(EngineError::invalid(
                "num_inference_steps",
                "must be at least 1",
            ));
        }
        let train = config.beta.num_train_timesteps;
        let train_sigmas = training_sigmas(&config.beta)?;
        let fp: Vec<f64> = train_sigmas.iter().map(|&s| s as f64).collect();
        let base = base_timesteps(config.timestep_spacing, train, steps, config.steps_offset);
        let mut sigmas32: Vec<f32> = base.iter().map(|&t| interp(t as f64, &fp) as f32).collect();
        sigmas32.push(0.0);
        Ok(EulerAncestralDiscreteScheduler {
            config: config.clone(),
            sigmas: sigmas32.iter().map(|&s| s as f64).collect(),
            init_noise_sigma: init_noise_sigma(&sigmas32, config.timestep_spacing),
            sigmas32,
            timesteps: base.iter().map(|&t| t as f64).collect(),
            cursor: StepCursor::default(),
        })
    }
}

impl Scheduler for EulerAncestralDiscreteScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    fn set_begin_index(&mut self, index: usize) {
        self.cursor.begin_index = Some(index);
    }

    fn scale_model_input(&self, sample: &Tensor, timestep: f64) -> Result<Tensor> {
        scale_at_cursor(
            CLASS,
            &self.cursor,
            &self.timesteps,
            &self.sigmas32,
            sample,
            timestep,
        )
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        rng: &mut TorchGenerator,
    ) -> Result<Tensor> {
        let i = self.cursor.current_before_last(
            CLASS,
            &self.timesteps,
            timestep,
            self.sigmas32.len(),
        )?;
        let sigma = self.sigmas32[i];
        let x = ops::f32(sample)?;
        let out = ops::f32(model_output)?;
        let x0 = predict_x0(self.config.prediction_type, &x, &out, sigma)?;

        let (from2, to) = (sigma * sigma, self.sigmas32[i + 1]);
        let to2 = to * to;
        let sigma_up = (to2 * (from2 - to2) / from2).sqrt();
        let sigma_down = (to2 - sigma_up * sigma_up).sqrt();

        let derivative = ops::div(&(&x - x0)?, sigma)?;
        let prev = (&x + ops::mul(&derivative, sigma_down - sigma)?)?;
        let noise = rng.randn_tensor(
            model_output.shape(),
            model_output.dtype(),
            model_output.device(),
        )?;
        let prev = (prev + ops::mul(&ops::f32(&noise)?, sigma_up)?)?;
        self.cursor.step_index = Some(i + 1);
        Ok(prev.to_dtype(model_output.dtype())?)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        add_noise_at_cursor(
            CLASS,
            &self.cursor,
            &self.timesteps,
            &self.sigmas32,
            original,
            noise,
            timestep,
        )
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas)
    }
}
