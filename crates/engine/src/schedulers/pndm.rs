//! PNDM (Liu et al. 2022): pseudo linear multistep (PLMS), with the Runge-Kutta (PRK) warm-up unless
//! `skip_prk_steps` is set (Stable Diffusion configs set it).
//!
//! Quirks kept from diffusers' `PNDMScheduler`:
//! - With `skip_prk_steps`, the timestep list repeats its second entry (`[901, 801, 801, 701, …]` for 10
//!   steps): the first two calls of `step` make one second-order step (the second call redoes the first
//!   interval with the averaged model output), so there are `steps + 1` UNet evaluations.
//! - `step` keeps its own counter from 0 regardless of where the run starts; there is no begin index. An
//!   img2img run that starts at index 2 or later (past the repeated entry) therefore makes its first two
//!   calls over the *same* interval `t0 → t0 - T/steps`, and the third call gets the next listed timestep
//!   for a latent still at `t0 - T/steps`: one interval is skipped. diffusers does exactly this.
//! - Without `skip_prk_steps` the list starts with 12 PRK evaluations (needs at least 4 steps).
//! - The previous timestep is always `t - T / steps` (integer division), whatever the spacing.

use candle_core::Tensor;
use serde_json::Value;

use super::config::{
    BetaConfig, ConfigReader, PredictionType, TimestepSpacing, NOISE_PREDICTION_TYPES,
};
use super::ddim::add_noise_ddpm;
use super::schedule::{leading_timesteps, linspace_timesteps, trailing_timesteps, NoiseSchedule};
use super::{ops, train_index, Scheduler};
use crate::error::{EngineError, Result};
use crate::rng::TorchGenerator;

const CLASS: &str = "PNDMScheduler";
const PNDM_ORDER: usize = 4;

/// The constructor arguments of diffusers' `PNDMScheduler`.
#[derive(Debug, Clone, PartialEq)]
pub struct PndmConfig {
    /// The training noise schedule (PNDM takes no `rescale_betas_zero_snr`).
    pub beta: BetaConfig,
    /// `skip_prk_steps` (default false).
    pub skip_prk_steps: bool,
    /// `set_alpha_to_one` (default false).
    pub set_alpha_to_one: bool,
    /// `prediction_type` (default epsilon; `sample` is not accepted).
    pub prediction_type: PredictionType,
    /// `timestep_spacing` (default leading).
    pub timestep_spacing: TimestepSpacing,
    /// `steps_offset` (default 0).
    pub steps_offset: i64,
}

impl PndmConfig {
    /// Reads a scheduler config with diffusers' `from_config` semantics.
    pub fn from_config(config: &Value) -> Result<Self> {
        let cfg = ConfigReader::new(CLASS, config)?;
        Ok(PndmConfig {
            beta: BetaConfig::read(&cfg, &BetaConfig::DIFFUSERS_DEFAULT, false)?,
            skip_prk_steps: cfg.bool("skip_prk_steps", false)?,
            set_alpha_to_one: cfg.bool("set_alpha_to_one", false)?,
            prediction_type: PredictionType::read(&cfg, NOISE_PREDICTION_TYPES)?,
            timestep_spacing: TimestepSpacing::read(&cfg, TimestepSpacing::Leading)?,
            steps_offset: cfg.i64("steps_offset", 0)?,
        })
    }
}

/// diffusers' `PNDMScheduler` after `set_timesteps`.
#[derive(Debug, Clone)]
pub struct PndmScheduler {
    config: PndmConfig,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    num_inference_steps: usize,
    prk_timesteps: Vec<i64>,
    timesteps: Vec<f64>,
    counter: usize,
    ets: Vec<Tensor>,
    cur_sample: Option<Tensor>,
    cur_model_output: Option<Tensor>,
}

impl PndmScheduler {
    /// The scheduler for `config`, set up for `steps` inference steps.
    pub fn new(config: &PndmConfig, steps: usize) -> Result<Self> {
        let train = config.beta.num_train_timesteps;
        let min_steps = if config.skip_prk_steps { 1 } else { PNDM_ORDER };
        if steps < min_steps {
            let how = if config.skip_prk_steps {
                ""
            } else {
                " with its Runge-Kutta warm-up (skip_prk_steps: false)"
            };
            return Err(EngineError::invalid(
                "num_inference_steps",
                format!("{CLASS}{how} needs at least {min_steps} steps, not {steps}"),
            ));
        }
        let schedule = NoiseSchedule::new(&config.beta)?;
        // The base grid (diffusers' `_timesteps`), smallest first; the helpers give it largest first.
        let mut base: Vec<i64> = match config.timestep_spacing {
            TimestepSpacing::Linspace => linspace_timesteps(train, steps)
                .into_iter()
                .map(|t| t.round_ties_even() as i64)
                .collect(),
            TimestepSpacing::Leading => leading_timesteps(train, steps, config.steps_offset),
            TimestepSpacing::Trailing => trailing_timesteps(train, steps),
        };
        base.reverse();
        let n = base.len();
        let (prk, plms): (Vec<i64>, Vec<i64>) = if config.skip_prk_steps {
            // base[:-1] ++ base[-2:-1] ++ base[-1:], reversed.
            let mut plms: Vec<i64> = base[..n - 1].to_vec();
            if n >= 2 {
                plms.push(base[n - 2]);
            }
            plms.push(base[n - 1]);
            plms.reverse();
            (Vec::new(), plms)
        } else {
            let half = (train / steps / 2) as i64;
            // base[-4:].repeat(2) + tile([0, half], 4), then [:-1].repeat(2)[1:-1], reversed.
            let mut rk: Vec<i64> = Vec::with_capacity(2 * PNDM_ORDER);
            for &t in &base[n - PNDM_ORDER..] {
                rk.push(t);
                rk.push(t + half);
            }
            rk.pop();
            let mut doubled: Vec<i64> = rk.iter().flat_map(|&t| [t, t]).collect();
            doubled.remove(0);
            doubled.pop();
            doubled.reverse();
            let mut plms: Vec<i64> = base[..n - 3].to_vec();
            plms.reverse();
            (doubled, plms)
        };
        let timesteps = prk.iter().chain(plms.iter()).map(|&t| t as f64).collect();
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            schedule.alphas_cumprod[0]
        };
        Ok(PndmScheduler {
            config: config.clone(),
            alphas_cumprod: schedule.alphas_cumprod,
            final_alpha_cumprod,
            num_inference_steps: steps,
            prk_timesteps: prk,
            timesteps,
            counter: 0,
            ets: Vec::new(),
            cur_sample: None,
            cur_model_output: None,
        })
    }

    fn alpha(&self, t: i64) -> Result<f32> {
        if t < 0 {
            return Ok(self.final_alpha_cumprod);
        }
        let i = train_index(CLASS, t as f64, self.alphas_cumprod.len())?;
        Ok(self.alphas_cumprod[i])
    }

    /// Formula (9) of the PNDM paper: x_{t-δ} from x_t and the (combined) noise prediction.
    fn prev_sample(
        &self,
        sample: &Tensor,
        t: i64,
        prev: i64,
        model_output: &Tensor,
    ) -> Result<Tensor> {
        let alpha_t = self.alpha(t)?;
        let alpha_prev = self.alpha(prev)?;
        let beta_t = 1.0 - alpha_t;
        let beta_prev = 1.0 - alpha_prev;
        let eps = match self.config.prediction_type {
            PredictionType::VPrediction => {
                (ops::mul(model_output, alpha_t.sqrt())? + ops::mul(sample, beta_t.sqrt())?)?
            }
            _ => model_output.clone(),
        };
        let sample_coeff = (alpha_prev / alpha_t).sqrt();
        let denom = alpha_t * beta_prev.sqrt() + (alpha_t * beta_t * alpha_prev).sqrt();
        let correction = ops::div(&ops::mul(&eps, alpha_prev - alpha_t)?, denom)?;
        Ok((ops::mul(sample, sample_coeff)? - correction)?)
    }

    fn step_prk(&mut self, model_output: Tensor, timestep: i64, sample: Tensor) -> Result<Tensor> {
        let half = (self.config.beta.num_train_timesteps / self.num_inference_steps / 2) as i64;
        let diff_to_prev = if self.counter % 2 == 1 { 0 } else { half };
        let prev = timestep - diff_to_prev;
        let t = self.prk_timesteps[self.counter / 4 * 4];
        let model_output = match self.counter % 4 {
            0 => {
                self.cur_model_output = Some(ops::mul(&model_output, 1.0 / 6.0)?);
                self.ets.push(model_output.clone());
                self.cur_sample = Some(sample.clone());
                model_output
            }
            1 | 2 => {
                let add = ops::mul(&model_output, 1.0 / 3.0)?;
                self.cur_model_output = Some(match self.cur_model_output.take() {
                    Some(acc) => (acc + add)?,
                    None => add,
                });
                model_output
            }
            _ => {
                let last = ops::mul(&model_output, 1.0 / 6.0)?;
                match self.cur_model_output.take() {
                    Some(acc) => (acc + last)?,
                    None => last,
                }
            }
        };
        let cur = self.cur_sample.clone().unwrap_or(sample);
        let out = self.prev_sample(&cur, t, prev, &model_output)?;
        self.counter += 1;
        Ok(out)
    }

    fn step_plms(&mut self, model_output: Tensor, timestep: i64, sample: Tensor) -> Result<Tensor> {
        if !self.config.skip_prk_steps && self.ets.len() < 3 {
            return Err(EngineError::invalid(
                "scheduler",
                format!(
                    "{CLASS}: the linear multistep steps need the Runge-Kutta warm-up to run first"
                ),
            ));
        }
        let ratio = (self.config.beta.num_train_timesteps / self.num_inference_steps) as i64;
        let mut t = timestep;
        let mut prev = timestep - ratio;
        if self.counter != 1 {
            if self.ets.len() > 3 {
                self.ets.drain(..self.ets.len() - 3);
            }
            self.ets.push(model_output.clone());
        } else {
            prev = timestep;
            t = timestep + ratio;
        }
        let mut sample = sample;
        let n = self.ets.len();
        let combined = if n == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.clone());
            model_output
        } else if n == 1 && self.counter == 1 {
            let avg = ops::div(&(&model_output + &self.ets[0])?, 2.0)?;
            if let Some(cur) = self.cur_sample.take() {
                sample = cur;
            }
            avg
        } else if n == 2 {
            ops::div(&(ops::mul(&self.ets[1], 3.0)? - &self.ets[0])?, 2.0)?
        } else if n == 3 {
            let a = ops::mul(&self.ets[2], 23.0)?;
            let b = ops::mul(&self.ets[1], 16.0)?;
            let c = ops::mul(&self.ets[0], 5.0)?;
            ops::div(&((a - b)? + c)?, 12.0)?
        } else {
            let a = ops::mul(&self.ets[n - 1], 55.0)?;
            let b = ops::mul(&self.ets[n - 2], 59.0)?;
            let c = ops::mul(&self.ets[n - 3], 37.0)?;
            let d = ops::mul(&self.ets[n - 4], 9.0)?;
            ops::mul(&(((a - b)? + c)? - d)?, 1.0 / 24.0)?
        };
        let out = self.prev_sample(&sample, t, prev, &combined)?;
        self.counter += 1;
        Ok(out)
    }
}

impl Scheduler for PndmScheduler {
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
        if timestep.fract() != 0.0 {
            return Err(EngineError::invalid(
                "scheduler",
                format!("{CLASS}: timestep {timestep} is not a whole number"),
            ));
        }
        let t = timestep as i64;
        let out = ops::f32(model_output)?;
        let x = ops::f32(sample)?;
        let prev = if self.counter < self.prk_timesteps.len() && !self.config.skip_prk_steps {
            self.step_prk(out, t, x)?
        } else {
            self.step_plms(out, t, x)?
        };
        Ok(prev.to_dtype(model_output.dtype())?)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        add_noise_ddpm(CLASS, &self.alphas_cumprod, original, noise, timestep)
    }
}
