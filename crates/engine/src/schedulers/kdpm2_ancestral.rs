//! DPM-Solver-2 ancestral (k-diffusion `sample_dpm_2_ancestral`, eta = 1): the DPM-2 midpoint step down to
//! `sigma_down`, then fresh noise of standard deviation `sigma_up`.
//!
//! Quirks kept from diffusers' `KDPM2AncestralDiscreteScheduler` (`order == 2`):
//! - Timesteps `[t0, tm0, t1, tm1, t1, …]`: the midpoint of step k lies between `s_k` and `sigma_down_k`
//!   (2n − 1 entries; the last step is an Euler step to 0 with no noise).
//! - Noise is drawn once per full step, at the midpoint (second) evaluation, with the model output's shape,
//!   from the generator passed to `step`; the final Euler step draws none.
//! - Timesteps, sigmas, ramps and config keys as in [`super::kdpm2`].

use candle_core::Tensor;
use serde_json::Value;

use super::config::PredictionType;
use super::euler::{add_noise_at_cursor, init_noise_sigma, predict_x0, scale_by_sigma};
use super::k_common::{interleave_repeat, k_schedule, lerp_half, KConfig};
use super::kdpm2::{interleave_midpoints, kdpm2_main_timesteps, read_kdpm2_config};
use super::{ops, past_end, Scheduler, SchedulerOptions, StepCursor};
use crate::error::Result;
use crate::rng::TorchGenerator;

const CLASS: &str = "KDPM2AncestralDiscreteScheduler";

/// The constructor arguments of diffusers' `KDPM2AncestralDiscreteScheduler`.
#[derive(Debug, Clone, PartialEq)]
pub struct Kdpm2AncestralConfig {
    /// The shared k-diffusion keys.
    pub k: KConfig,
}

impl Kdpm2AncestralConfig {
    /// Reads a scheduler config with diffusers' `from_config` semantics.
    pub fn from_config(config: &Value, opts: &SchedulerOptions) -> Result<Self> {
        Ok(Kdpm2AncestralConfig {
            k: read_kdpm2_config(CLASS, config, opts)?,
        })
    }
}

/// diffusers' `KDPM2AncestralDiscreteScheduler` after `set_timesteps`.
#[derive(Debug, Clone)]
pub struct Kdpm2AncestralDiscreteScheduler {
    prediction_type: PredictionType,
    sigmas32: Vec<f32>,
    interpol32: Vec<f32>,
    up32: Vec<f32>,
    down32: Vec<f32>,
    sigmas: Vec<f64>,
    timesteps: Vec<f64>,
    init_noise_sigma: f64,
    cursor: StepCursor,
    sample: Option<Tensor>,
}

impl Kdpm2AncestralDiscreteScheduler {
    /// The scheduler for `config`, set up for `steps` inference steps.
    pub fn new(config: &Kdpm2AncestralConfig, steps: usize) -> Result<Self> {
        let ks = k_schedule(&config.k, steps, true)?;
        let main = kdpm2_main_timesteps(config.k.ramp, &ks.timesteps);
        let mut base: Vec<f32> = ks.sigmas.iter().map(|&s| s as f32).collect();
        base.push(0.0);
        let n = base.len();
        let next: Vec<f32> = (0..n)
            .map(|i| if i + 1 < n { base[i + 1] } else { 0.0 })
            .collect();
        let up: Vec<f32> = (0..n)
            .map(|i| {
                let (s2, n2) = (base[i] * base[i], next[i] * next[i]);
                (n2 * (s2 - n2) / s2).sqrt()
            })
            .collect();
        let mut down: Vec<f32> = (0..n)
            .map(|i| (next[i] * next[i] - up[i] * up[i]).sqrt())
            .collect();
        down[n - 1] = 0.0;
        let mut interpol: Vec<f32> = (0..n)
            .map(|i| lerp_half(base[i].ln(), down[i].ln()).exp())
            .collect();
        for v in interpol.iter_mut().skip(n.saturating_sub(2)) {
            *v = 0.0;
        }
        let timesteps = interleave_midpoints(&main, &interpol[..n - 2], &ks.log_sigmas);
        let sigmas32 = interleave_repeat(&base);
        Ok(Kdpm2AncestralDiscreteScheduler {
            prediction_type: config.k.prediction_type,
            sigmas: sigmas32.iter().map(|&s| s as f64).collect(),
            init_noise_sigma: init_noise_sigma(&sigmas32, config.k.timestep_spacing),
            sigmas32,
            interpol32: interleave_repeat(&interpol),
            up32: interleave_repeat(&up),
            down32: interleave_repeat(&down),
            timesteps,
            cursor: StepCursor::default(),
            sample: None,
        })
    }
}

impl Scheduler for Kdpm2AncestralDiscreteScheduler {
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
        let sigma = if self.sample.is_none() {
            self.sigmas32.get(i).copied()
        } else {
            i.checked_sub(1)
                .and_then(|j| self.interpol32.get(j).copied())
        };
        let sigma = sigma.ok_or_else(|| past_end(CLASS, i))?;
        scale_by_sigma(sample, sigma)
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
        let x = ops::f32(sample)?;
        let out = ops::f32(model_output)?;
        let prev = match self.sample.take() {
            None => {
                let sigma = self.sigmas32[i];
                let sigma_interpol = self.interpol32[i];
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
                let j = i - 1;
                let (sigma, sigma_interpol) = (self.sigmas32[j], self.interpol32[j]);
                let (sigma_up, sigma_down) = (self.up32[j], self.down32[j]);
                let x0 = predict_x0(self.prediction_type, &x, &out, sigma_interpol)?;
                let derivative = ops::div(&(&x - x0)?, sigma_interpol)?;
                let prev = (&start + ops::mul(&derivative, sigma_down - sigma)?)?;
                let noise = rng.randn_tensor(
                    model_output.shape(),
                    model_output.dtype(),
                    model_output.device(),
                )?;
                (prev + ops::mul(&ops::f32(&noise)?, sigma_up)?)?
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
