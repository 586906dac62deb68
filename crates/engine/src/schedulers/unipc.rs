//! UniPC (Zhao et al. 2023), diffusers' `UniPCMultistepScheduler`: a multistep predictor (UniP) whose
//! result is corrected (UniC) at the next step, once the model has been evaluated there.
//!
//! Quirks kept from diffusers:
//! - The corrector of step k runs at the start of step k + 1 (it needs that step's model output), and not
//!   for steps listed in `disable_corrector`, nor on the first step of a run (img2img included).
//! - With `lower_order_final` the order drops near the end whatever the step count (no "< 15 steps" rule).
//! - With Karras/exponential sigmas, `final_sigmas_type: "sigma_min"` repeats the ramp's last sigma.
//! - `sigma_min`/`sigma_max` of the config bound the Karras/exponential ramps.
//! - The predictor's order-2 coefficient is fixed at 0.5; higher orders solve a small linear system
//!   (here in float64 from the float32 entries, rounded back; torch solves in float32).

use candle_core::Tensor;
use serde_json::Value;

use super::config::{BetaConfig, ConfigReader, PredictionType, TimestepSpacing};
use super::multistep::{
    add_noise, alpha_sigma, data_prediction, expm1, lambda, lin, make_schedule, noise_prediction,
    push_history, read_final_zero, read_prediction_type, read_ramp, recent, reject_common,
    spaced_timesteps, training, Cursor, FinalSigma, Ramp, ScheduleSpec,
};
use super::{ops, Scheduler, SchedulerOptions};
use crate::error::{EngineError, Result};
use crate::rng::TorchGenerator;

const CLASS: &str = "UniPCMultistepScheduler";

/// `solver_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UniPcSolver {
    /// `bh1`: B(h) = h.
    Bh1,
    /// `bh2` (default): B(h) = e^h - 1.
    Bh2,
}

/// The constructor arguments of diffusers' `UniPCMultistepScheduler` that this engine implements.
#[derive(Debug, Clone, PartialEq)]
pub struct UniPcConfig {
    /// The training noise schedule (with `rescale_betas_zero_snr`).
    pub beta: BetaConfig,
    /// `solver_order` (1 to 5, default 2).
    pub solver_order: usize,
    /// `prediction_type` (default epsilon).
    pub prediction_type: PredictionType,
    /// `predict_x0` (default true).
    pub predict_x0: bool,
    /// `solver_type` (default bh2).
    pub solver_type: UniPcSolver,
    /// `lower_order_final` (default true).
    pub lower_order_final: bool,
    /// `disable_corrector`: step indices whose result is not corrected.
    pub disable_corrector: Vec<usize>,
    /// The sigma ramp (`use_karras_sigmas`, `use_exponential_sigmas`).
    pub ramp: Ramp,
    /// `sigma_min` of the ramps.
    pub sigma_min: Option<f64>,
    /// `sigma_max` of the ramps.
    pub sigma_max: Option<f64>,
    /// `timestep_spacing` (default linspace).
    pub timestep_spacing: TimestepSpacing,
    /// `steps_offset` (default 0).
    pub steps_offset: i64,
    /// `final_sigmas_type` is "zero" (default) rather than "sigma_min".
    pub final_sigma_zero: bool,
}

impl UniPcConfig {
    /// Reads a scheduler config with `from_config` semantics (`opts.use_karras_sigmas` wins when set).
    pub fn from_config(config: &Value, opts: &SchedulerOptions) -> Result<Self> {
        let cfg = ConfigReader::new(CLASS, config)?;
        reject_common(&cfg)?;
        if cfg.raw("solver_p").is_some() {
            return Err(cfg.unsupported("`solver_p`"));
        }
        let disable_corrector = match cfg.raw("disable_corrector") {
            None => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_u64().map(|i| i as usize).ok_or_else(|| {
                        cfg.error("disable_corrector", "must be a list of step indices")
                    })
                })
                .collect::<Result<Vec<usize>>>()?,
            Some(_) => return Err(cfg.error("disable_corrector", "must be a list of step indices")),
        };
        let solver_order = cfg.usize_at_least("solver_order", 2, 1)?;
        if solver_order > 5 {
            return Err(cfg.error(
                "solver_order",
                format!("must be between 1 and 5, got {solver_order}"),
            ));
        }
        Ok(UniPcConfig {
            beta: BetaConfig::read(&cfg, &BetaConfig::DIFFUSERS_DEFAULT, true)?,
            solver_order,
            prediction_type: read_prediction_type(&cfg)?,
            predict_x0: cfg.bool("predict_x0", true)?,
            solver_type: cfg.choice(
                "solver_type",
                UniPcSolver::Bh2,
                &[
                    ("bh1", UniPcSolver::Bh1),
                    ("bh2", UniPcSolver::Bh2),
                    ("midpoint", UniPcSolver::Bh2),
                    ("heun", UniPcSolver::Bh2),
                    ("logrho", UniPcSolver::Bh2),
                ],
            )?,
            lower_order_final: cfg.bool("lower_order_final", true)?,
            disable_corrector,
            ramp: read_ramp(&cfg, opts, false)?,
            sigma_min: cfg.opt_f64("sigma_min")?,
            sigma_max: cfg.opt_f64("sigma_max")?,
            timestep_spacing: TimestepSpacing::read(&cfg, TimestepSpacing::Linspace)?,
            steps_offset: cfg.i64("steps_offset", 0)?,
            final_sigma_zero: read_final_zero(&cfg)?,
        })
    }
}

/// Solves `a x = b` (small, dense) by Gaussian elimination with partial pivoting in float64.
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Vec<f64> {
    let n = b.len();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))
            .unwrap_or(col);
        a.swap(col, pivot);
        b.swap(col, pivot);
        for row in col + 1..n {
            let f = a[row][col] / a[col][col];
            #[allow(clippy::needless_range_loop)] // parallel arrays indexed by the same k
            for k in col..n {
                a[row][k] -= f * a[col][k];
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let s: f64 = (row + 1..n).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - s) / a[row][row];
    }
    x
}

/// diffusers' `UniPCMultistepScheduler` after `set_timesteps`.
#[derive(Debug, Clone)]
pub struct UniPcMultistepScheduler {
    config: UniPcConfig,
    timesteps: Vec<f64>,
    sigmas32: Vec<f32>,
    sigmas: Vec<f64>,
    history: Vec<Option<Tensor>>,
    lower_order_nums: usize,
    this_order: usize,
    last_sample: Option<Tensor>,
    cursor: Cursor,
}

/// The coefficients one UniP/UniC update shares.
struct Coefficients {
    h_phi_1: f32,
    b_h: f32,
    rks: Vec<f32>,
    b: Vec<f32>,
}

impl UniPcMultistepScheduler {
    /// The scheduler for `config`, set up for `steps` inference steps.
    pub fn new(config: &UniPcConfig, steps: usize) -> Result<Self> {
        if steps == 0 {
            return Err(EngineError::invalid(
                "num_inference_steps",
                "must be at least 1",
            ));
        }
        let train = config.beta.num_train_timesteps;
        let (_, train_sigmas) = training(&config.beta)?;
        let spec = ScheduleSpec {
            base: spaced_timesteps(
                config.timestep_spacing,
                train,
                train,
                steps,
                config.steps_offset,
            ),
            steps,
            ramp: config.ramp,
            round_ramp_timesteps: true,
            sigma_min: config.sigma_min,
            sigma_max: config.sigma_max,
            final_sigma: if config.final_sigma_zero {
                FinalSigma::Zero
            } else {
                FinalSigma::RampLast
            },
        };
        let (timesteps, sigmas32) = make_schedule(&spec, &train_sigmas);
        Ok(UniPcMultistepScheduler {
            config: config.clone(),
            timesteps,
            sigmas: sigmas32.iter().map(|&s| s as f64).collect(),
            sigmas32,
            history: vec![None; config.solver_order],
            lower_order_nums: 0,
            this_order: 0,
            last_sample: None,
            cursor: Cursor::default(),
        })
    }

    /// `hh`, `h_phi_1`, `B(h)`, the `rks` (ending in 1) and `b` of an update from sigma index `s0` to
    /// `t`, whose earlier points are the sigma indices `earlier` (most recent first).
    fn coefficients(&self, t: usize, s0: usize, earlier: &[usize], order: usize) -> Coefficients {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas32[t]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas32[s0]);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let h = lambda(alpha_t, sigma_t) - lambda_s0;
        let mut rks: Vec<f32> = earlier
            .iter()
            .map(|&si| {
                let (a, s) = alpha_sigma(self.sigmas32[si]);
                (lambda(a, s) - lambda_s0) / h
            })
            .collect();
        rks.push(1.0);
        let hh = if self.config.predict_x0 { -h } else { h };
        let h_phi_1 = expm1(hh);
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial_i: u64 = 1;
        let b_h = match self.config.solver_type {
            UniPcSolver::Bh1 => hh,
            UniPcSolver::Bh2 => expm1(hh),
        };
        let mut b = Vec::with_capacity(order);
        for i in 1..=order as u64 {
            b.push(h_phi_k * factorial_i as f32 / b_h);
            factorial_i *= i + 1;
            h_phi_k = h_phi_k / hh - (1.0 / factorial_i as f64) as f32;
        }
        Coefficients {
            h_phi_1,
            b_h,
            rks,
            b,
        }
    }

    /// `x_t_`: the first-order part of both updates, from `x` at sigma index `s0` to index `t`.
    fn base(&self, t: usize, s0: usize, x: &Tensor, m0: &Tensor, h_phi_1: f32) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas32[t]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas32[s0]);
        if self.config.predict_x0 {
            lin(&[(sigma_t / sigma_s0, x), (-(alpha_t * h_phi_1), m0)])
        } else {
            lin(&[(alpha_t / alpha_s0, x), (-(sigma_t * h_phi_1), m0)])
        }
    }

    /// The factor of B(h) in both updates: alpha_t (data prediction) or sigma_t (noise prediction).
    fn outer(&self, t: usize) -> f32 {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas32[t]);
        if self.config.predict_x0 {
            alpha_t
        } else {
            sigma_t
        }
    }

    /// The difference terms `(m_i - m0) / r_i` of the history entries 2..=order.
    fn differences(&self, rks: &[f32], order: usize) -> Result<Vec<Tensor>> {
        let m0 = recent(&self.history, 1, CLASS)?;
        (1..order)
            .map(|k| {
                let mi = recent(&self.history, k + 1, CLASS)?;
                ops::div(&(mi - m0)?, rks[k - 1])
            })
            .collect()
    }

    /// The sum `sum_k rho_k * D_k` (the einsum), left to right.
    fn weighted(rhos: &[f32], d: &[Tensor]) -> Result<Option<Tensor>> {
        if d.is_empty() {
            return Ok(None);
        }
        let terms: Vec<(f32, &Tensor)> = rhos.iter().copied().zip(d.iter()).collect();
        Ok(Some(lin(&terms)?))
    }

    /// UniP: the predicted sample at step `i + 1`.
    fn predictor(&self, i: usize, x: &Tensor, order: usize) -> Result<Tensor> {
        let earlier: Vec<usize> = (1..order).map(|k| i - k).collect();
        let c = self.coefficients(i + 1, i, &earlier, order);
        let m0 = recent(&self.history, 1, CLASS)?;
        let d = self.differences(&c.rks, order)?;
        let x_t_ = self.base(i + 1, i, x, m0, c.h_phi_1)?;
        let rhos: Vec<f32> = if order == 2 {
            vec![0.5]
        } else if order > 2 {
            let k = order - 1;
            let a: Vec<Vec<f64>> = (0..k)
                .map(|p| {
                    c.rks[..k]
                        .iter()
                        .map(|&r| r.powi(p as i32) as f64)
                        .collect()
                })
                .collect();
            solve(a, c.b[..k].iter().map(|&v| v as f64).collect())
                .into_iter()
                .map(|v| v as f32)
                .collect()
        } else {
            Vec::new()
        };
        let coef = self.outer(i + 1) * c.b_h;
        match Self::weighted(&rhos, &d)? {
            Some(pred_res) => Ok((x_t_ - ops::mul(&pred_res, coef)?)?),
            None => Ok(x_t_),
        }
    }

    /// UniC: the corrected sample at step `i` from the one at `i - 1` and the new model output `model_t`.
    fn corrector(&self, i: usize, last: &Tensor, model_t: &Tensor, order: usize) -> Result<Tensor> {
        let earlier: Vec<usize> = (1..order).map(|k| i - (k + 1)).collect();
        let c = self.coefficients(i, i - 1, &earlier, order);
        let m0 = recent(&self.history, 1, CLASS)?;
        let d = self.differences(&c.rks, order)?;
        let x_t_ = self.base(i, i - 1, last, m0, c.h_phi_1)?;
        let rhos: Vec<f32> = if order == 1 {
            vec![0.5]
        } else {
            let a: Vec<Vec<f64>> = (0..order)
                .map(|p| c.rks.iter().map(|&r| r.powi(p as i32) as f64).collect())
                .collect();
            solve(a, c.b.iter().map(|&v| v as f64).collect())
                .into_iter()
                .map(|v| v as f32)
                .collect()
        };
        let d1_t = (model_t - m0)?;
        let last_term = ops::mul(&d1_t, rhos[rhos.len() - 1])?;
        let inner = match Self::weighted(&rhos[..rhos.len() - 1], &d)? {
            Some(corr_res) => (corr_res + last_term)?,
            None => last_term,
        };
        let coef = self.outer(i) * c.b_h;
        Ok((x_t_ - ops::mul(&inner, coef)?)?)
    }
}

impl Scheduler for UniPcMultistepScheduler {
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
        _rng: &mut TorchGenerator,
    ) -> Result<Tensor> {
        let i = self
            .cursor
            .checked_current(CLASS, &self.timesteps, timestep)?;
        let n = self.timesteps.len();
        let mut x = ops::f32(sample)?;
        let out = ops::f32(model_output)?;
        let sigma = self.sigmas32[i];
        let converted = if self.config.predict_x0 {
            data_prediction(self.config.prediction_type, &x, &out, sigma)?
        } else {
            noise_prediction(self.config.prediction_type, &x, &out, sigma)?
        };
        let use_corrector = i > 0
            && !self.config.disable_corrector.contains(&(i - 1))
            && self.last_sample.is_some();
        if use_corrector {
            let last = self.last_sample.clone().expect("checked above");
            x = self.corrector(i, &last, &converted, self.this_order)?;
        }
        push_history(&mut self.history, converted);
        let order = self.config.solver_order;
        let this_order = if self.config.lower_order_final {
            order.min(n - i)
        } else {
            order
        };
        self.this_order = this_order.min(self.lower_order_nums + 1);
        self.last_sample = Some(x.clone());
        let prev = self.predictor(i, &x, self.this_order)?;
        if self.lower_order_nums < order {
            self.lower_order_nums += 1;
        }
        self.cursor.step_index = Some(i + 1);
        Ok(prev.to_dtype(model_output.dtype())?)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        let i = self.cursor.noise_index(&self.timesteps, timestep);
        add_noise(CLASS, &self.sigmas32, i, original, noise)
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas)
    }
}
