//! The stochastic sampler of Karras et al. 2022 ("EDM", algorithm 2): before each step the sample is "churned"
//! up to a slightly higher noise level with fresh noise, then a Heun (second-order) step is taken.
//!
//! Not diffusers' `KarrasVeScheduler` (deprecated since diffusers 0.24; variance-exploding defaults with
//! sigma_max 100, a non-standard `step` signature and no `add_noise`, so no diffusers img2img pipeline can run
//! it). This sampler keeps the algorithm and runs it on the model's own noise schedule
//! ([`super::model_sigmas`]: the sigmas `EulerDiscreteScheduler` would use; Karras ramp with
//! `use_karras_sigmas`).
//!
//! Churn: at step i with `s_tmin <= sigma_i <= s_tmax`, `gamma = min(s_churn / steps, sqrt(2) - 1)` and the
//! model is evaluated at `sigma_hat = sigma_i * (1 + gamma)` after adding noise of standard deviation
//! `s_noise * sqrt(sigma_hat² - sigma_i²)` (drawn from the request's generator, one normal per latent element,
//! only at steps with gamma > 0). Config keys read with their defaults: `s_churn` 3.0 (gamma 0.15 at 20 steps,
//! the per-step churn of EDM's ImageNet setting 40/256), `s_min` 0.05, `s_max` 50, `s_noise` 1.003 (EDM);
//! `s_churn: 0` gives plain deterministic Heun.
//!
//! Evaluations: every step evaluates the model at `sigma_hat_i`, takes an Euler step to `sigma_{i+1}`, evaluates
//! there again and averages the two slopes (Heun); the last step (to sigma 0) is a single Euler step. So
//! `timesteps()` lists `2 * steps - 1` evaluations `[t(sigma_hat_0), t(sigma_1), t(sigma_hat_1), ...,
//! t(sigma_hat_{n-1})]` and `order()` is 2, as for diffusers' Heun: img2img starts at index `2 * t_start`.
//! The churn noise of step i+1 is added at the end of step i's second evaluation, so the sample the pipeline
//! hands to the next evaluation is already at `sigma_hat_{i+1}`; `add_noise` noises straight to
//! `sigma_hat` of the first step (no extra draw).

use candle_core::{DType, Tensor};
use serde_json::Value;

use super::config::ConfigReader;
use super::euler::{add_noise_at_cursor, scale_by_sigma};
use super::model_sigmas::ModelSigmas;
use super::{ops, past_end, Scheduler, SchedulerOptions, StepCursor};
use crate::error::{EngineError, Result};
use crate::rng::TorchGenerator;

const CLASS: &str = "KarrasVeScheduler";

/// The churn settings (EDM's S_churn, S_tmin, S_tmax, S_noise).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Churn {
    /// `s_churn`: total churn over the schedule (gamma = s_churn / steps, capped at sqrt(2) - 1).
    pub s_churn: f64,
    /// `s_min`: no churn below this sigma.
    pub s_tmin: f64,
    /// `s_max`: no churn above this sigma.
    pub s_tmax: f64,
    /// `s_noise`: scale of the churn noise.
    pub s_noise: f64,
}

impl Default for Churn {
    fn default() -> Self {
        Churn {
            s_churn: 3.0,
            s_tmin: 0.05,
            s_tmax: 50.0,
            s_noise: 1.003,
        }
    }
}

/// Which part of a step an entry of `timesteps()` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Eval {
    /// The first evaluation of step k, at sigma_hat_k.
    First(usize),
    /// The Heun correction of step k, at sigma_{k+1}.
    Second(usize),
}

/// EDM stochastic Heun on the model's sigma schedule.
#[derive(Debug, Clone)]
pub struct KarrasVeScheduler {
    schedule: ModelSigmas,
    churn: Churn,
    sigmas64: Vec<f64>,
    /// sigma_hat of each step.
    sigma_hats: Vec<f32>,
    /// Per entry of `timesteps`: the noise level of the evaluation and what it is.
    eval_sigmas: Vec<f32>,
    evals: Vec<Eval>,
    timesteps: Vec<f64>,
    cursor: StepCursor,
    /// The first evaluation's sample and slope, waiting for the Heun correction.
    pending: Option<(Tensor, Tensor)>,
}

impl KarrasVeScheduler {
    /// Builds the sampler from a scheduler config (`use_karras_sigmas` from `opts` wins over the file).
    pub fn from_config(config: &Value, steps: usize, opts: &SchedulerOptions) -> Result<Self> {
        let cfg = ConfigReader::new(CLASS, config)?;
        let d = Churn::default();
        let churn = Churn {
            s_churn: cfg.f64("s_churn", d.s_churn)?,
            s_tmin: cfg.f64("s_min", d.s_tmin)?,
            s_tmax: cfg.f64("s_max", d.s_tmax)?,
            s_noise: cfg.f64("s_noise", d.s_noise)?,
        };
        for (key, v) in [
            ("s_churn", churn.s_churn),
            ("s_min", churn.s_tmin),
            ("s_max", churn.s_tmax),
            ("s_noise", churn.s_noise),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(cfg.error(key, format!("must be a non-negative number, got {v}")));
            }
        }
        let schedule = ModelSigmas::read(&cfg, steps, opts)?;
        Ok(Self::new(schedule, churn))
    }

    /// The sampler over `schedule` with `churn`.
    pub fn new(schedule: ModelSigmas, churn: Churn) -> Self {
        let n = schedule.steps();
        let gamma = (churn.s_churn / n as f64).min(std::f64::consts::SQRT_2 - 1.0);
        let sigma_hats: Vec<f32> = schedule.sigmas[..n]
            .iter()
            .map(|&s| {
                let s64 = s as f64;
                if gamma > 0.0 && churn.s_tmin <= s64 && s64 <= churn.s_tmax {
                    (s64 * (1.0 + gamma)) as f32
                } else {
                    s
                }
            })
            .collect();
        let (mut eval_sigmas, mut evals, mut timesteps) = (Vec::new(), Vec::new(), Vec::new());
        #[allow(clippy::needless_range_loop)] // parallel arrays indexed by the same k
        for k in 0..n {
            eval_sigmas.push(sigma_hats[k]);
            evals.push(Eval::First(k));
            timesteps.push(if sigma_hats[k] == schedule.sigmas[k] {
                schedule.timesteps[k]
            } else {
                schedule.timestep_for(sigma_hats[k])
            });
            if schedule.sigmas[k + 1] > 0.0 {
                eval_sigmas.push(schedule.sigmas[k + 1]);
                evals.push(Eval::Second(k));
                timesteps.push(schedule.timesteps[k + 1]);
            }
        }
        KarrasVeScheduler {
            sigmas64: schedule.sigmas.iter().map(|&s| s as f64).collect(),
            schedule,
            churn,
            sigma_hats,
            eval_sigmas,
            evals,
            timesteps,
            cursor: StepCursor::default(),
            pending: None,
        }
    }

    /// The noise level of each entry of `timesteps()` (for tests and diagnostics).
    pub fn eval_sigmas(&self) -> &[f32] {
        &self.eval_sigmas
    }

    fn index(&self, timestep: f64) -> Result<usize> {
        self.cursor.current(CLASS, &self.timesteps, timestep)
    }
}

impl Scheduler for KarrasVeScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn order(&self) -> usize {
        2
    }

    fn init_noise_sigma(&self) -> f64 {
        self.sigma_hats[0] as f64
    }

    fn set_begin_index(&mut self, index: usize) {
        self.cursor.begin_index = Some(index);
    }

    fn scale_model_input(&self, sample: &Tensor, timestep: f64) -> Result<Tensor> {
        let j = self.index(timestep)?;
        let sigma = *self.eval_sigmas.get(j).ok_or_else(|| past_end(CLASS, j))?;
        scale_by_sigma(sample, sigma)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        rng: &mut TorchGenerator,
    ) -> Result<Tensor> {
        let j = self.index(timestep)?;
        let eval = *self.evals.get(j).ok_or_else(|| past_end(CLASS, j))?;
        let sigma = self.eval_sigmas[j];
        let x = ops::f32(sample)?;
        let den = self
            .schedule
            .denoised(&x, &ops::f32(model_output)?, sigma)?;
        let d = ops::div(&(&x - den)?, sigma)?;
        let out = match eval {
            Eval::First(k) => {
                let next = self.schedule.sigmas[k + 1];
                let euler = (&x + ops::mul(&d, next - sigma)?)?;
                if next > 0.0 {
                    self.pending = Some((x, d));
                }
                euler
            }
            Eval::Second(k) => {
                let (x_hat, d_hat) = self.pending.take().ok_or_else(|| {
                    EngineError::invalid(
                        "scheduler",
                        format!(
                            "{CLASS}: the Heun correction of step {k} ran without its first half"
                        ),
                    )
                })?;
                let dt = sigma - self.sigma_hats[k];
                let slope = ops::mul(&(d_hat + d)?, 0.5)?;
                let mut next = (x_hat + ops::mul(&slope, dt)?)?;
                // Churn for the following step: raise the noise level from sigma_{k+1} to sigma_hat_{k+1}.
                if let Some(&hat) = self.sigma_hats.get(k + 1) {
                    let extra = (hat as f64).powi(2) - (sigma as f64).powi(2);
                    if extra > 0.0 {
                        let z = rng.randn_tensor(next.shape(), DType::F32, next.device())?;
                        let scale = (self.churn.s_noise * extra.sqrt()) as f32;
                        next = (next + ops::mul(&z, scale)?)?;
                    }
                }
                next
            }
        };
        self.cursor.step_index = Some(j + 1);
        Ok(out.to_dtype(model_output.dtype())?)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        add_noise_at_cursor(
            CLASS,
            &self.cursor,
            &self.timesteps,
            &self.eval_sigmas,
            original,
            noise,
            timestep,
        )
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas64)
    }
}
