//! The model's own noise schedule in k-diffusion sigma space, for the samplers that diffusers cannot run for
//! img2img ([`super::ipndm`], [`super::karras_ve`], [`super::score_sde_ve`]).
//!
//! A Stable Diffusion latent at training timestep t is `sqrt(a_t) * (x0 + sigma_t * eps)` with
//! `sigma_t = sqrt((1 - a_t) / a_t)`; dividing by `sqrt(a_t)` gives the variance-exploding form `x0 + sigma * eps`
//! these samplers work in, exactly as [`super::euler`] does. The per-step sigmas are built the way
//! `EulerDiscreteScheduler` builds them (timestep grid from `timestep_spacing`, default "linspace"; training
//! sigmas interpolated at it, or the Karras ramp when `use_karras_sigmas` is set), ending in 0. Intermediate noise
//! levels a sampler evaluates the model at are mapped back to (fractional) timesteps by log-sigma interpolation
//! (diffusers' `_sigma_to_t`).

use candle_core::Tensor;

use super::config::{BetaConfig, ConfigReader, PredictionType, TimestepSpacing};
use super::euler::{base_timesteps, init_noise_sigma, predict_x0, training_sigmas};
use super::schedule::{interp, karras_sigmas, log_f32, sigma_to_t};
use super::SchedulerOptions;
use crate::error::{EngineError, Result};

/// The sigma schedule of one request, with the mapping between sigmas and timesteps.
#[derive(Debug, Clone)]
pub struct ModelSigmas {
    /// Per-step sigmas, largest first, `steps + 1` values ending in 0 (float32 values).
    pub sigmas: Vec<f32>,
    /// The timestep of each of the first `steps` sigmas (float32 values).
    pub timesteps: Vec<f64>,
    /// `init_noise_sigma` as diffusers' Euler-family schedulers define it.
    pub init_noise_sigma: f64,
    /// What the model predicts.
    pub prediction_type: PredictionType,
    log_sigmas: Vec<f32>,
}

impl ModelSigmas {
    /// Reads the schedule keys (`num_train_timesteps`, betas, `prediction_type`, `timestep_spacing`,
    /// `steps_offset`, `use_karras_sigmas`) of `cfg` and builds the schedule for `steps` steps.
    pub fn read(cfg: &ConfigReader, steps: usize, opts: &SchedulerOptions) -> Result<Self> {
        if steps == 0 {
            return Err(EngineError::invalid(
                "num_inference_steps",
                "must be at least 1",
            ));
        }
        let beta = BetaConfig::read(cfg, &BetaConfig::DIFFUSERS_DEFAULT, true)?;
        let prediction_type = cfg.choice(
            "prediction_type",
            PredictionType::Epsilon,
            &[
                ("epsilon", PredictionType::Epsilon),
                ("v_prediction", PredictionType::VPrediction),
                ("sample", PredictionType::Sample),
            ],
        )?;
        let spacing = TimestepSpacing::read(cfg, TimestepSpacing::Linspace)?;
        let steps_offset = cfg.i64("steps_offset", 0)?;
        let karras = match opts.use_karras_sigmas {
            Some(v) => v,
            None => cfg.bool("use_karras_sigmas", false)?,
        };
        let train = beta.num_train_timesteps;
        let train_sigmas = training_sigmas(&beta)?;
        let log_sigmas = log_f32(&train_sigmas);
        let base = base_timesteps(spacing, train, steps, steps_offset);
        let fp: Vec<f64> = train_sigmas.iter().map(|&s| s as f64).collect();
        let mut ts: Vec<f64> = base.iter().map(|&t| t as f64).collect();
        let mut sigmas: Vec<f64> = ts.iter().map(|&t| interp(t, &fp)).collect();
        if karras {
            let (lo, hi) = (sigmas[sigmas.len() - 1], sigmas[0]);
            sigmas = karras_sigmas(lo, hi, steps);
            ts = sigmas.iter().map(|&s| sigma_to_t(s, &log_sigmas)).collect();
        }
        sigmas.push(0.0);
        let sigmas: Vec<f32> = sigmas.iter().map(|&s| s as f32).collect();
        Ok(ModelSigmas {
            init_noise_sigma: init_noise_sigma(&sigmas, spacing),
            timesteps: ts.iter().map(|&t| t as f32 as f64).collect(),
            sigmas,
            prediction_type,
            log_sigmas,
        })
    }

    /// Number of steps (sigmas minus the final 0).
    pub fn steps(&self) -> usize {
        self.sigmas.len() - 1
    }

    /// The (fractional, float32-rounded) timestep at which the model sees noise level `sigma`.
    pub fn timestep_for(&self, sigma: f32) -> f64 {
        sigma_to_t(sigma as f64, &self.log_sigmas) as f32 as f64
    }

    /// The denoised estimate x0 (float32) of `sample` at noise level `sigma` from a model output.
    pub fn denoised(&self, sample: &Tensor, model_output: &Tensor, sigma: f32) -> Result<Tensor> {
        predict_x0(self.prediction_type, sample, model_output, sigma)
    }
}
