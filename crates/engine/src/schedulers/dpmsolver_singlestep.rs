//! DPM-Solver++ singlestep (Lu et al. 2022), diffusers' `DPMSolverSinglestepScheduler`: the steps are
//! grouped by a fixed order list (`[1, 2, 1, 2, …]` at order 2), and a second/third-order step reuses the
//! sample saved at the start of its group with the model outputs of the group's earlier steps.
//!
//! Quirks kept from diffusers:
//! - The class has no `timestep_spacing`, `steps_offset` or `rescale_betas_zero_snr`: timesteps are always
//!   `linspace(0, T - 1, steps + 1)` rounded, largest first, the 0 dropped.
//! - `lower_order_final: false` is forced to true when `steps % solver_order != 0` or when
//!   `final_sigmas_type` is "zero" (the default), so the order list ends in first order.
//! - When a group's earlier model outputs are missing (an img2img run starting inside a group, #1866), the
//!   step lowers its order until they exist; a first-order step saves the sample it starts from.
//! - Karras timesteps are always rounded; the SDE variant draws its noise in the model output's dtype.

use candle_core::Tensor;
use serde_json::Value;

use super::config::{BetaConfig, ConfigReader, PredictionType};
use super::dpmsolver_multistep::{first_order, read_solver_type, second_order_update, SolverType};
use super::multistep::{
    add_noise, alpha_sigma, clipped_count, data_prediction, exp, lambda, lin, make_schedule,
    push_history, read_final_zero, read_prediction_type, read_ramp, read_solver_order, recent,
    reject_common, spaced_timesteps, training, Cursor, FinalSigma, Ramp, ScheduleSpec,
};
use super::{ops, past_end, Scheduler, SchedulerOptions};
use crate::error::{EngineError, Result};
use crate::rng::TorchGenerator;

const CLASS: &str = "DPMSolverSinglestepScheduler";

/// The constructor arguments of diffusers' `DPMSolverSinglestepScheduler` that this engine implements.
#[derive(Debug, Clone, PartialEq)]
pub struct DpmSinglestepConfig {
    /// The training noise schedule (the class takes no `rescale_betas_zero_snr`).
    pub beta: BetaConfig,
    /// `solver_order` (1 to 3, default 2).
    pub solver_order: usize,
    /// `prediction_type` (default epsilon).
    pub prediction_type: PredictionType,
    /// `algorithm_type` is "sde-dpmsolver++" (default "dpmsolver++").
    pub sde: bool,
    /// `solver_type` (default midpoint).
    pub solver_type: SolverType,
    /// `lower_order_final` (default false).
    pub lower_order_final: bool,
    /// The sigma ramp (`use_karras_sigmas`, `use_exponential_sigmas`).
    pub ramp: Ramp,
    /// `final_sigmas_type` is "zero" (default) rather than "sigma_min".
    pub final_sigma_zero: bool,
    /// `lambda_min_clipped` (default -inf, i.e. none).
    pub lambda_min_clipped: Option<f64>,
}

impl DpmSinglestepConfig {
    /// Reads a scheduler config with `from_config` semantics (`opts.use_karras_sigmas` wins when set;
    /// the request's `algorithm_type` is a DPMSolverMultistepScheduler option and is not applied here).
    pub fn from_config(config: &Value, opts: &SchedulerOptions) -> Result<Self> {
        let cfg = ConfigReader::new(CLASS, config)?;
        reject_common(&cfg)?;
        let algorithm = cfg.string("algorithm_type", "dpmsolver++")?;
        let sde = match algorithm.as_str() {
            "dpmsolver++" | "deis" => false,
            "sde-dpmsolver++" => true,
            other => {
                return Err(EngineError::invalid(
                    "algorithm_type",
                    format!(
                        "{CLASS}: {other:?} in the scheduler config is not supported; accepted: \
                         \"dpmsolver++\", \"sde-dpmsolver++\""
                    ),
                ))
            }
        };
        Ok(DpmSinglestepConfig {
            beta: BetaConfig::read(&cfg, &BetaConfig::DIFFUSERS_DEFAULT, false)?,
            solver_order: read_solver_order(&cfg, 3)?,
            prediction_type: read_prediction_type(&cfg)?,
            sde,
            solver_type: read_solver_type(&cfg)?,
            lower_order_final: cfg.bool("lower_order_final", false)?,
            ramp: read_ramp(&cfg, opts, false)?,
            final_sigma_zero: read_final_zero(&cfg)?,
            lambda_min_clipped: cfg.opt_f64("lambda_min_clipped")?,
        })
    }
}

/// diffusers' `get_order_list`.
pub fn order_list(
    steps: usize,
    order: usize,
    lower_order_final: bool,
    final_zero: bool,
) -> Vec<usize> {
    let repeat = |pattern: &[usize], times: usize| -> Vec<usize> {
        pattern
            .iter()
            .copied()
            .cycle()
            .take(pattern.len() * times)
            .collect()
    };
    let mut orders = if lower_order_final {
        match order {
            3 => match steps % 3 {
                0 => [repeat(&[1, 2, 3], steps / 3 - 1), vec![1, 2, 1]].concat(),
                1 => [repeat(&[1, 2, 3], steps / 3), vec![1]].concat(),
                _ => [repeat(&[1, 2, 3], steps / 3), vec![1, 2]].concat(),
            },
            2 => {
                if steps.is_multiple_of(2) {
                    [repeat(&[1, 2], steps / 2 - 1), vec![1, 1]].concat()
                } else {
                    [repeat(&[1, 2], steps / 2), vec![1]].concat()
                }
            }
            _ => vec![1; steps],
        }
    } else {
        match order {
            3 => repeat(&[1, 2, 3], steps / 3),
            2 => repeat(&[1, 2], steps / 2),
            _ => vec![1; steps],
        }
    };
    if final_zero {
        if let Some(last) = orders.last_mut() {
            *last = 1;
        }
    }
    orders
}

/// diffusers' `DPMSolverSinglestepScheduler` after `set_timesteps`.
#[derive(Debug, Clone)]
pub struct DpmSolverSinglestepScheduler {
    config: DpmSinglestepConfig,
    timesteps: Vec<f64>,
    sigmas32: Vec<f32>,
    sigmas: Vec<f64>,
    orders: Vec<usize>,
    history: Vec<Option<Tensor>>,
    group_sample: Option<Tensor>,
    cursor: Cursor,
}

impl DpmSolverSinglestepScheduler {
    /// The scheduler for `config`, set up for `steps` inference steps.
    pub fn new(config: &DpmSinglestepConfig, steps: usize) -> Result<Self> {
        if steps == 0 {
            return Err(EngineError::invalid(
                "num_inference_steps",
                "must be at least 1",
            ));
        }
        let train = config.beta.num_train_timesteps;
        let (alphas_cumprod, train_sigmas) = training(&config.beta)?;
        let clipped = clipped_count(&alphas_cumprod, config.lambda_min_clipped);
        if clipped >= train {
            return Err(EngineError::invalid(
                "scheduler",
                format!("{CLASS}: lambda_min_clipped leaves no timesteps"),
            ));
        }
        let spec = ScheduleSpec {
            base: spaced_timesteps(
                super::config::TimestepSpacing::Linspace,
                train - clipped,
                train,
                steps,
                0,
            ),
            steps,
            ramp: config.ramp,
            round_ramp_timesteps: true,
            sigma_min: None,
            sigma_max: None,
            final_sigma: if config.final_sigma_zero {
                FinalSigma::Zero
            } else {
                FinalSigma::TrainMin
            },
        };
        let (timesteps, sigmas32) = make_schedule(&spec, &train_sigmas);
        let lower_order_final = config.lower_order_final
            || !steps.is_multiple_of(config.solver_order)
            || config.final_sigma_zero;
        let orders = order_list(
            steps,
            config.solver_order,
            lower_order_final,
            config.final_sigma_zero,
        );
        Ok(DpmSolverSinglestepScheduler {
            config: config.clone(),
            timesteps,
            sigmas: sigmas32.iter().map(|&s| s as f64).collect(),
            sigmas32,
            orders,
            history: vec![None; config.solver_order],
            group_sample: None,
            cursor: Cursor::default(),
        })
    }

    fn second_order(&self, i: usize, x: &Tensor, noise: Option<&Tensor>) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas32[i + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas32[i]);
        let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas32[i - 1]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let lambda_s1 = lambda(alpha_s1, sigma_s1);
        let m0 = recent(&self.history, 1, CLASS)?;
        let m1 = recent(&self.history, 2, CLASS)?;
        let (h, h_0) = (lambda_t - lambda_s1, lambda_s0 - lambda_s1);
        let r0 = h_0 / h;
        let d0 = m1;
        let d1 = ops::mul(&(m0 - m1)?, 1.0 / r0)?;
        let heun = self.config.solver_type == SolverType::Heun;
        second_order_update([alpha_t, sigma_t, sigma_s1, h], x, d0, &d1, heun, noise)
    }

    fn third_order(&self, i: usize, x: &Tensor, noise: Option<&Tensor>) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas32[i + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas32[i]);
        let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas32[i - 1]);
        let (alpha_s2, sigma_s2) = alpha_sigma(self.sigmas32[i - 2]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let lambda_s1 = lambda(alpha_s1, sigma_s1);
        let lambda_s2 = lambda(alpha_s2, sigma_s2);
        let m0 = recent(&self.history, 1, CLASS)?;
        let m1 = recent(&self.history, 2, CLASS)?;
        let m2 = recent(&self.history, 3, CLASS)?;
        let (h, h_0, h_1) = (
            lambda_t - lambda_s2,
            lambda_s0 - lambda_s2,
            lambda_s1 - lambda_s2,
        );
        let (r0, r1) = (h_0 / h, h_1 / h);
        let d0 = m2;
        let d1_0 = ops::mul(&(m1 - m2)?, 1.0 / r1)?;
        let d1_1 = ops::mul(&(m0 - m2)?, 1.0 / r0)?;
        let heun = self.config.solver_type == SolverType::Heun;
        // D1 = (r0 * D1_0 - r1 * D1_1) / (r0 - r1), D2 = 2 * (D1_1 - D1_0) / (r0 - r1) (heun only).
        let (d1, d2) = if heun {
            let d1 = ops::div(&lin(&[(r0, &d1_0), (-r1, &d1_1)])?, r0 - r1)?;
            let d2 = ops::div(&ops::mul(&(&d1_1 - &d1_0)?, 2.0)?, r0 - r1)?;
            (Some(d1), Some(d2))
        } else {
            (None, None)
        };
        let sigma_ratio = sigma_t / sigma_s2;
        match noise {
            None => {
                let em = exp(-h) - 1.0;
                let mut terms = vec![(sigma_ratio, x), (-(alpha_t * em), d0)];
                let c1 = alpha_t * (em / h + 1.0);
                match (&d1, &d2) {
                    (Some(d1), Some(d2)) => {
                        terms.push((c1, d1));
                        terms.push((-(alpha_t * ((exp(-h) - 1.0 + h) / (h * h) - 0.5)), d2));
                    }
                    _ => terms.push((c1, &d1_1)),
                }
                lin(&terms)
            }
            Some(z) => {
                let e2 = exp(-2.0 * h);
                let mut terms = vec![(sigma_ratio * exp(-h), x), (alpha_t * (1.0 - e2), d0)];
                let c1 = alpha_t * ((1.0 - e2) / (-2.0 * h) + 1.0);
                match (&d1, &d2) {
                    (Some(d1), Some(d2)) => {
                        let m2h = -2.0 * h;
                        terms.push((c1, d1));
                        terms.push((alpha_t * ((1.0 - e2 + m2h) / (m2h * m2h) - 0.5), d2));
                    }
                    _ => terms.push((c1, &d1_1)),
                }
                terms.push((sigma_t * (1.0 - e2).sqrt(), z));
                lin(&terms)
            }
        }
    }
}

impl Scheduler for DpmSolverSinglestepScheduler {
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
        let i = self.cursor.current(&self.timesteps, timestep);
        if i >= self.timesteps.len() || i >= self.orders.len() {
            return Err(past_end(CLASS, i));
        }
        let x = ops::f32(sample)?;
        let out = ops::f32(model_output)?;
        let x0 = data_prediction(self.config.prediction_type, &x, &out, self.sigmas32[i])?;
        push_history(&mut self.history, x0.clone());
        let noise = if self.config.sde {
            Some(ops::f32(&rng.randn_tensor(
                model_output.shape(),
                model_output.dtype(),
                model_output.device(),
            )?)?)
        } else {
            None
        };
        let mut order = self.orders[i];
        while order > 1 && self.history[self.history.len() - order].is_none() {
            order -= 1;
        }
        if order == 1 {
            self.group_sample = Some(x.clone());
        }
        let start = self.group_sample.clone().ok_or_else(|| {
            EngineError::invalid("scheduler", format!("{CLASS}: no saved sample"))
        })?;
        let prev = match order {
            1 => first_order(&self.sigmas32, i, &x0, &start, noise.as_ref())?,
            2 => self.second_order(i, &start, noise.as_ref())?,
            _ => self.third_order(i, &start, noise.as_ref())?,
        };
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
