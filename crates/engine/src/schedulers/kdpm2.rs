//! DPM-Solver-2 (k-diffusion `sample_dpm_2`): an Euler step to the log-midpoint sigma, a model evaluation
//! there, and a full step with that midpoint derivative.
//!
//! Quirks kept from diffusers' `KDPM2DiscreteScheduler` (`order == 2`):
//! - Timesteps list every evaluation: `[t0, tm1, t1, tm2, t2, …, tm_{n-1}, t_{n-1}]` (2n − 1 entries), the
//!   midpoint timesteps `tm` found from the midpoint sigmas by log-sigma interpolation computed in float32
//!   (diffusers runs `_sigma_to_t` on torch float32 scalars there). The last step is an Euler step to 0.
//! - With Karras sigmas the main timesteps are rounded to integers (not with exponential sigmas); the list is
//!   float64 in those cases and float32 otherwise, as diffusers' dtype is.
//! - `sigmas()` is diffusers' `sigmas`: `[s0, s1, s1, …, s_{n-1}, s_{n-1}, 0, 0, 0]` (2n + 2 entries).
//! - Its own beta defaults (0.00085..0.012, linear); `sigma_min`/`sigma_max` from the file bound the ramps;
//!   `prediction_type: "sample"` is refused (diffusers raises at the first step).

use candle_core::Tensor;
use serde_json::Value;

use super::config::NOISE_PREDICTION_TYPES;
use super::euler::{add_noise_at_cursor, init_noise_sigma, predict_x0, scale_by_sigma, SigmaRamp};
use super::k_common::{
    interleave_repeat, k_schedule, lerp_half, sigma_to_t_f32, KConfig, K_BETA_DEFAULT,
};
use super::{ops, past_end, Scheduler, SchedulerOptions, StepCursor};
use crate::error::Result;
use crate::rng::TorchGenerator;

const CLASS: &str = "KDPM2DiscreteScheduler";

/// The constructor arguments of diffusers' `KDPM2DiscreteScheduler`.
#[derive(Debug, Clone, PartialEq)]
pub struct Kdpm2Config {
    /// The shared k-diffusion keys.
    pub k: KConfig,
}

impl Kdpm2Config {
    /// Reads a scheduler config with diffusers' `from_config` semantics.
    pub fn from_config(config: &Value, opts: &SchedulerOptions) -> Result<Self> {
        Ok(Kdpm2Config {
            k: read_kdpm2_config(CLASS, config, opts)?,
        })
    }
}

/// The config reading of both KDPM2 classes (they take the same keys).
pub(crate) fn read_kdpm2_config(
    class: &'static str,
    config: &Value,
    opts: &SchedulerOptions,
) -> Result<KConfig> {
    let cfg = super::config::ConfigReader::new(class, config)?;
    if cfg.raw("prediction_type").and_then(Value::as_str) == Some("sample") {
        return Err(
            cfg.unsupported("`prediction_type: \"sample\"` (diffusers does not implement it)")
        );
    }
    KConfig::read(&cfg, opts, &K_BETA_DEFAULT, NOISE_PREDICTION_TYPES)
}

/// The main timesteps of both KDPM2 classes (float64 values as diffusers' tensor holds them).
pub(crate) fn kdpm2_main_timesteps(ramp: SigmaRamp, timesteps: &[f64]) -> Vec<f64> {
    match ramp {
        SigmaRamp::Karras => timesteps.iter().map(|t| t.round_ties_even()).collect(),
        SigmaRamp::Exponential => timesteps.to_vec(),
        SigmaRamp::Interpolated => timesteps.iter().map(|&t| t as f32 as f64).collect(),
    }
}

/// Rounds a float32 midpoint timestep to the dtype of the main timesteps (float32 or float64: exact).
pub(crate) fn midpoint_timestep(t: f32) -> f64 {
    t as f64
}

/// The KDPM2 timestep layout: `main[0]`, then each midpoint's timestep (`_sigma_to_t` in float32) followed by
/// the next main timestep.
pub(crate) fn interleave_midpoints(
    main: &[f64],
    midpoints: &[f32],
    log_sigmas: &[f32],
) -> Vec<f64> {
    let mut timesteps = vec![main[0]];
    for (&s, t) in midpoints.iter().zip(&main[1..]) {
        timesteps.push(midpoint_timestep(sigma_to_t_f32(s, log_sigmas)));
        timesteps.push(*t);
    }
    timesteps
}

/// diffusers' `KDPM2DiscreteScheduler` after `set_timesteps`.
#[derive(Debug, Clone)]
pub struct Kdpm2DiscreteScheduler {
    prediction_type: super::config::PredictionType,
    sigmas32: Vec<f32>,
    interpol32: Vec<f32>,
    sigmas: Vec<f64>,
    timesteps: Vec<f64>,
    init_noise_sigma: f64,
    cursor: StepCursor,
    /// The sample at the start of the current step while its midpoint evaluation is pending.
    sample: Option<Tensor>,
}

impl Kdpm2DiscreteScheduler {
    /// The scheduler for `config`, set up for `steps` inference steps.
    pub fn new(config: &Kdpm2Config, steps: usize) -> Result<Self> {
        let ks = k_schedule(&config.k, steps, true)?;
        let main = kdpm2_main_timesteps(config.k.ramp, &ks.timesteps);
        let mut base: Vec<f32> = ks.sigmas.iter().map(|&s| s as f32).collect();
        base.push(0.0);
        let n = base.len();
        // sigmas.log().lerp(sigmas.roll(1).log(), 0.5).exp()
        let interpol: Vec<f32> = (0..n)
            .map(|i| lerp_half(base[i].ln(), base[(i + n - 1) % n].ln()).exp())
            .collect();
        let timesteps = interleave_midpoints(&main, &interpol[1..n - 1], &ks.log_sigmas);
        let sigmas32 = interleave_repeat(&base);
        Ok(Kdpm2DiscreteScheduler {
            prediction_type: config.k.prediction_type,
            sigmas: sigmas32.iter().map(|&s| s as f64).collect(),
            init_noise_sigma: init_noise_sigma(&sigmas32, config.k.timestep_spacing),
            sigmas32,
            interpol32: interleave_repeat(&interpol),
            timesteps,
            cursor: StepCursor::default(),
            sample: None,
        })
    }

    /// The midpoint sigmas in diffusers' layout (`sigmas_interpol`).
    pub fn sigmas_interpol(&self) -> &[f32] {
        &self.interpol32
    }
}

impl Scheduler for Kdpm2DiscreteScheduler {
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
        let i = self.cursor.current(CLASS, &self.timesteps, timestep)?;
        let table = if self.sample.is_none() {
            &self.sigmas32
        } else {
            &self.interpol32
        };
        let sigma = *table.get(i).ok_or_else(|| past_end(CLASS, i))?;
        scale_by_sigma(sample, sigma)
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
        let prev = match self.sample.take() {
            None => {
                let sigma = self.sigmas32[i];
                let sigma_interpol = self.interpol32[i + 1];
                let x0 = predict_x0(self.prediction_type, &x, &out, sigma)?;
                let derivative = ops::div(&(&x - x0)?, sigma)?;
                let prev = (&x + ops::mul(&derivative, sigma_interpol - sigma)?)?;
                self.sample = Some(x);
                prev
            }
            Some(start) => {
                if i == 0 {
                    return Err(past_end(CLASS, i));
                }
                let sigma = self.sigmas32[i - 1];
                let sigma_interpol = self.interpol32[i];
                let sigma_next = self.sigmas32[i];
                let x0 = predict_x0(self.prediction_type, &x, &out, sigma_interpol)?;
                let derivative = ops::div(&(&x - x0)?, sigma_interpol)?;
                (&start + ops::mul(&derivative, sigma_next - sigma)?)?
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
