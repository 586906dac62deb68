//! Heun's method (Karras et al. 2022, algorithm 1 without churn): an Euler predictor to the next sigma, then
//! the trapezoidal corrector with a second model evaluation there.
//!
//! Quirks kept from diffusers' `HeunDiscreteScheduler` (`order == 2`):
//! - Timesteps list every evaluation: `[t0, t1, t1, t2, t2, …]` (2n − 1 entries); sigmas are
//!   `[s0, s1, s1, …, s_{n-1}, s_{n-1}, 0]`. The last step is a single Euler step down to 0, so img2img
//!   (which starts at index `2 * t_start`, always a predictor step) runs an odd number of evaluations.
//! - Its own beta defaults (0.00085..0.012, linear); `sigma_min`/`sigma_max` bound the Karras/exponential
//!   ramps when the file has them; `clip_sample` clamps x0; `init_noise_sigma`/`add_noise` as in Euler.

use candle_core::Tensor;
use serde_json::Value;

use super::config::{ConfigReader, ALL_PREDICTION_TYPES};
use super::ddim::clip_x0;
use super::euler::{add_noise_at_cursor, init_noise_sigma, predict_x0, scale_at_cursor};
use super::k_common::{k_schedule, KConfig, K_BETA_DEFAULT};
use super::{ops, past_end, Scheduler, SchedulerOptions, StepCursor};
use crate::error::Result;
use crate::rng::TorchGenerator;

const CLASS: &str = "HeunDiscreteScheduler";

/// The constructor arguments of diffusers' `HeunDiscreteScheduler`.
#[derive(Debug, Clone, PartialEq)]
pub struct HeunConfig {
    /// The shared k-diffusion keys.
    pub k: KConfig,
    /// `clip_sample` (default false).
    pub clip_sample: bool,
    /// `clip_sample_range` (default 1.0).
    pub clip_sample_range: f64,
}

impl HeunConfig {
    /// Reads a scheduler config with diffusers' `from_config` semantics.
    pub fn from_config(config: &Value, opts: &SchedulerOptions) -> Result<Self> {
        let cfg = ConfigReader::new(CLASS, config)?;
        Ok(HeunConfig {
            k: KConfig::read(&cfg, opts, &K_BETA_DEFAULT, ALL_PREDICTION_TYPES)?,
            clip_sample: cfg.bool("clip_sample", false)?,
            clip_sample_range: cfg.f64("clip_sample_range", 1.0)?,
        })
    }
}

/// The first-order half of a step, kept for the corrector.
#[derive(Debug, Clone)]
struct Predictor {
    derivative: Tensor,
    dt: f32,
    sample: Tensor,
}

/// diffusers' `HeunDiscreteScheduler` after `set_timesteps`.
#[derive(Debug, Clone)]
pub struct HeunDiscreteScheduler {
    config: HeunConfig,
    sigmas32: Vec<f32>,
    sigmas: Vec<f64>,
    timesteps: Vec<f64>,
    init_noise_sigma: f64,
    cursor: StepCursor,
    predictor: Option<Predictor>,
}

impl HeunDiscreteScheduler {
    /// The scheduler for `config`, set up for `steps` inference steps.
    pub fn new(config: &HeunConfig, steps: usize) -> Result<Self> {
        let ks = k_schedule(&config.k, steps, true)?;
        let mut base: Vec<f32> = ks.sigmas.iter().map(|&s| s as f32).collect();
        base.push(0.0);
        // cat([s[:1], s[1:-1].repeat_interleave(2), s[-1:]])
        let mut sigmas32 = vec![base[0]];
        for &s in &base[1..base.len() - 1] {
            sigmas32.push(s);
            sigmas32.push(s);
        }
        sigmas32.push(base[base.len() - 1]);
        let ts: Vec<f32> = ks.timesteps.iter().map(|&t| t as f32).collect();
        let mut timesteps = vec![ts[0] as f64];
        for &t in &ts[1..] {
            timesteps.push(t as f64);
            timesteps.push(t as f64);
        }
        Ok(HeunDiscreteScheduler {
            config: config.clone(),
            sigmas: sigmas32.iter().map(|&s| s as f64).collect(),
            init_noise_sigma: init_noise_sigma(&sigmas32, config.k.timestep_spacing),
            sigmas32,
            timesteps,
            cursor: StepCursor::default(),
            predictor: None,
        })
    }

    fn x0(&self, x: &Tensor, out: &Tensor, sigma: f32) -> Result<Tensor> {
        let x0 = predict_x0(self.config.k.prediction_type, x, out, sigma)?;
        clip_x0(x0, self.config.clip_sample, self.config.clip_sample_range)
    }
}

impl Scheduler for HeunDiscreteScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn order(&self) -> usize {
        2
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
        _rng: &mut TorchGenerator,
    ) -> Result<Tensor> {
        let i = self.cursor.current(CLASS, &self.timesteps, timestep)?;
        if i >= self.timesteps.len() || i + 1 >= self.sigmas32.len() {
            return Err(past_end(CLASS, i));
        }
        let x = ops::f32(sample)?;
        let out = ops::f32(model_output)?;
        let prev = match self.predictor.take() {
            None => {
                let (sigma, sigma_next) = (self.sigmas32[i], self.sigmas32[i + 1]);
                let x0 = self.x0(&x, &out, sigma)?;
                let derivative = ops::div(&(&x - x0)?, sigma)?;
                let dt = sigma_next - sigma;
                let prev = (&x + ops::mul(&derivative, dt)?)?;
                self.predictor = Some(Predictor {
                    derivative,
                    dt,
                    sample: x,
                });
                prev
            }
            Some(p) => {
                if i == 0 {
                    return Err(past_end(CLASS, i));
                }
                let sigma_next = self.sigmas32[i];
                let x0 = self.x0(&x, &out, sigma_next)?;
                let derivative = ops::div(&(&x - x0)?, sigma_next)?;
                let derivative = ops::div(&(p.derivative + derivative)?, 2.0)?;
                (&p.sample + ops::mul(&derivative, p.dt)?)?
            }
        };
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
