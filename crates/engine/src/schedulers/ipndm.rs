//! Improved pseudo-numerical methods (iPNDM, Zhang & Chen 2022): a fourth-order Adams–Bashforth linear
//! multistep method on the probability-flow ODE in k-diffusion sigma space, as k-diffusion's `sample_ipndm`.
//!
//! Not diffusers' `IPNDMScheduler`: that class builds its own continuous cosine schedule with t in [0, 1), has no
//! `add_noise`, and cannot drive a Stable Diffusion UNet in img2img. This sampler keeps the algorithm and runs it
//! on the model's own noise schedule ([`super::model_sigmas`]: the sigmas `EulerDiscreteScheduler` would use,
//! Karras ramp with `use_karras_sigmas`).
//!
//! Each step evaluates the model once at `sigma_i`, forms the derivative `d_i = (x - x0_hat) / sigma_i`, and
//! moves to `sigma_{i+1}` with `x + (sigma_{i+1} - sigma_i) * D`, where D combines the latest derivatives with
//! the Adams–Bashforth weights 1; 3/2, -1/2; 23/12, -16/12, 5/12; 55/24, -59/24, 37/24, -9/24 (the order grows
//! from 1 to 4 over the first steps of the run, so an img2img run warms up from its own first step).
//! Deterministic: no noise is drawn. `add_noise` is `x0 + sigma * noise` at the start sigma, the input scaling
//! `1 / sqrt(sigma² + 1)`, as for Euler.

use candle_core::Tensor;
use serde_json::Value;

use super::config::ConfigReader;
use super::euler::scale_by_sigma;
use super::model_sigmas::ModelSigmas;
use super::{ops, past_end, Scheduler, SchedulerOptions, StepCursor};
use crate::error::Result;
use crate::rng::TorchGenerator;

const CLASS: &str = "IPNDMScheduler";

/// The Adams–Bashforth weights for orders 1 to 4, newest derivative first.
const AB_WEIGHTS: [&[f32]; 4] = [
    &[1.0],
    &[3.0 / 2.0, -1.0 / 2.0],
    &[23.0 / 12.0, -16.0 / 12.0, 5.0 / 12.0],
    &[55.0 / 24.0, -59.0 / 24.0, 37.0 / 24.0, -9.0 / 24.0],
];

/// The iPNDM sampler on the model's sigma schedule.
#[derive(Debug, Clone)]
pub struct IpndmScheduler {
    schedule: ModelSigmas,
    sigmas64: Vec<f64>,
    cursor: StepCursor,
    /// Derivatives of the previous steps, newest last (at most 3 kept).
    history: Vec<Tensor>,
}

impl IpndmScheduler {
    /// Builds the sampler from a scheduler config (`use_karras_sigmas` from `opts` wins over the file).
    pub fn from_config(config: &Value, steps: usize, opts: &SchedulerOptions) -> Result<Self> {
        let cfg = ConfigReader::new(CLASS, config)?;
        let schedule = ModelSigmas::read(&cfg, steps, opts)?;
        Ok(IpndmScheduler {
            sigmas64: schedule.sigmas.iter().map(|&s| s as f64).collect(),
            schedule,
            cursor: StepCursor::default(),
            history: Vec::new(),
        })
    }
}

impl Scheduler for IpndmScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.schedule.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.schedule.init_noise_sigma
    }

    fn set_begin_index(&mut self, index: usize) {
        self.cursor.begin_index = Some(index);
    }

    fn scale_model_input(&self, sample: &Tensor, timestep: f64) -> Result<Tensor> {
        let i = self
            .cursor
            .current(CLASS, &self.schedule.timesteps, timestep)?;
        let sigma = *self
            .schedule
            .sigmas
            .get(i)
            .ok_or_else(|| past_end(CLASS, i))?;
        scale_by_sigma(sample, sigma)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        _rng: &mut TorchGenerator,
    ) -> Result<Tensor> {
        let i = self.cursor.current_before_last(
            CLASS,
            &self.schedule.timesteps,
            timestep,
            self.schedule.sigmas.len(),
        )?;
        let (sigma, next) = (self.schedule.sigmas[i], self.schedule.sigmas[i + 1]);
        let x = ops::f32(sample)?;
        let x0 = self
            .schedule
            .denoised(&x, &ops::f32(model_output)?, sigma)?;
        let d = ops::div(&(&x - x0)?, sigma)?;
        let weights = AB_WEIGHTS[self.history.len().min(3)];
        let mut combined = ops::mul(&d, weights[0])?;
        for (w, past) in weights[1..].iter().zip(self.history.iter().rev()) {
            combined = (combined + ops::mul(past, *w)?)?;
        }
        let prev = (&x + ops::mul(&combined, next - sigma)?)?;
        self.history.push(d);
        if self.history.len() > 3 {
            self.history.remove(0);
        }
        self.cursor.step_index = Some(i + 1);
        Ok(prev.to_dtype(model_output.dtype())?)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        let i = self
            .cursor
            .noise_index(CLASS, &self.schedule.timesteps, timestep)?;
        let sigma = *self
            .schedule
            .sigmas
            .get(i)
            .ok_or_else(|| past_end(CLASS, i))?;
        let noise = noise.to_dtype(original.dtype())?;
        Ok((original + ops::mul(&noise, sigma)?)?)
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas64)
    }
}
