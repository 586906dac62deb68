//! DPM-Solver++ multistep (Lu et al. 2022), diffusers' `DPMSolverMultistepScheduler`: "DPM++ 2M" at the
//! default `solver_order: 2`, "DPM++ 2M SDE" with `algorithm_type: "sde-dpmsolver++"`.
//!
//! Quirks kept from diffusers:
//! - Timesteps are integers; "leading" spacing divides by `steps + 1` (so 10 steps at T = 1000 are
//!   901, 801, …, 1 with `steps_offset: 1`), unlike DDIM's.
//! - The last step is first order when `final_sigmas_type` is "zero" (the default), when `euler_at_final`,
//!   or with `lower_order_final` under 15 steps; the one before is at most second order in the last case.
//! - The history restarts empty, so an img2img run's first step is first order whatever the begin index.
//! - The SDE variant draws one model-output-sized float32 normal tensor per step, the last one included,
//!   before the update.
//! - A timestep not in the schedule maps to the last step instead of failing.
//! - A config whose `algorithm_type` is "deis" (saved by DEISMultistepScheduler) reads as dpmsolver++, and
//!   a `solver_type` of logrho/bh1/bh2 as midpoint, as diffusers' constructor does.

use candle_core::{DType, Tensor};
use serde_json::Value;

use super::config::{BetaConfig, ConfigReader, PredictionType, TimestepSpacing};
use super::multistep::{
    add_noise, alpha_sigma, clipped_count, data_prediction, exp, lambda, lin, push_history,
    read_final_zero, read_prediction_type, read_ramp, read_solver_order, recent, reject_common,
    spaced_timesteps, training, Cursor, FinalSigma, Ramp, ScheduleSpec,
};
use super::{ops, Scheduler, SchedulerOptions};
use crate::error::{EngineError, Result};
use crate::rng::TorchGenerator;

const CLASS: &str = "DPMSolverMultistepScheduler";

/// The algorithm spellings accepted for `algorithm_type`.
pub const ALGORITHM_TYPES: &str =
    "\"dpmsolver++\", \"sde-dpmsolver++\" (or its API spelling \"dpmsolver+++\")";

/// `algorithm_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// DPM-Solver++ (deterministic, data prediction).
    DpmSolverPP,
    /// SDE-DPM-Solver++ (stochastic, draws noise every step).
    SdeDpmSolverPP,
}

/// `solver_type` of the second-order update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SolverType {
    /// `midpoint` (default).
    Midpoint,
    /// `heun`.
    Heun,
}

/// Parses an algorithm name from a request or config; `from_config` says whether diffusers' constructor
/// remapping of "deis" applies.
pub fn parse_algorithm(name: &str, from_config: bool) -> Result<Algorithm> {
    match name {
        "dpmsolver++" => Ok(Algorithm::DpmSolverPP),
        "deis" if from_config => Ok(Algorithm::DpmSolverPP),
        "sde-dpmsolver++" | "dpmsolver+++" => Ok(Algorithm::SdeDpmSolverPP),
        other => {
            let extra = if matches!(other, "dpmsolver" | "sde-dpmsolver") {
                " (the deprecated DPM-Solver variants are not implemented)"
            } else {
                ""
            };
            let origin = if from_config {
                "in the scheduler config"
            } else {
                "requested"
            };
            Err(EngineError::invalid(
                "algorithm_type",
                format!(
                    "{other:?} ({origin}) is not supported{extra}; accepted: {ALGORITHM_TYPES}"
                ),
            ))
        }
    }
}

/// Reads `solver_type` as the DPM-Solver classes do (other classes' solver types read as midpoint).
pub(crate) fn read_solver_type(cfg: &ConfigReader) -> Result<SolverType> {
    cfg.choice(
        "solver_type",
        SolverType::Midpoint,
        &[
            ("midpoint", SolverType::Midpoint),
            ("heun", SolverType::Heun),
            ("logrho", SolverType::Midpoint),
            ("bh1", SolverType::Midpoint),
            ("bh2", SolverType::Midpoint),
        ],
    )
}

/// The constructor arguments of diffusers' `DPMSolverMultistepScheduler` that this engine implements.
#[derive(Debug, Clone, PartialEq)]
pub struct DpmMultistepConfig {
    /// The training noise schedule (with `rescale_betas_zero_snr`).
    pub beta: BetaConfig,
    /// `solver_order` (1 to 3, default 2).
    pub solver_order: usize,
    /// `prediction_type` (default epsilon).
    pub prediction_type: PredictionType,
    /// `algorithm_type` (default dpmsolver++), after the request's override.
    pub algorithm: Algorithm,
    /// `solver_type` (default midpoint).
    pub solver_type: SolverType,
    /// `lower_order_final` (default true).
    pub lower_order_final: bool,
    /// `euler_at_final` (default false).
    pub euler_at_final: bool,
    /// The sigma ramp (`use_karras_sigmas`, `use_exponential_sigmas`, `use_lu_lambdas`).
    pub ramp: Ramp,
    /// `final_sigmas_type` is "zero" (default) rather than "sigma_min".
    pub final_sigma_zero: bool,
    /// `lambda_min_clipped` (default -inf, i.e. none).
    pub lambda_min_clipped: Option<f64>,
    /// `timestep_spacing` (default linspace).
    pub timestep_spacing: TimestepSpacing,
    /// `steps_offset` (default 0).
    pub steps_offset: i64,
}

impl DpmMultistepConfig {
    /// Reads a scheduler config with `from_config` semantics; `opts.use_karras_sigmas` and
    /// `opts.algorithm_type` act as keyword arguments when set.
    pub fn from_config(config: &Value, opts: &SchedulerOptions) -> Result<Self> {
        let cfg = ConfigReader::new(CLASS, config)?;
        reject_common(&cfg)?;
        let algorithm = match &opts.algorithm_type {
            Some(name) => parse_algorithm(name, false)?,
            None => parse_algorithm(&cfg.string("algorithm_type", "dpmsolver++")?, true)?,
        };
        Ok(DpmMultistepConfig {
            beta: BetaConfig::read(&cfg, &BetaConfig::DIFFUSERS_DEFAULT, true)?,
            solver_order: read_solver_order(&cfg, 3)?,
            prediction_type: read_prediction_type(&cfg)?,
            algorithm,
            solver_type: read_solver_type(&cfg)?,
            lower_order_final: cfg.bool("lower_order_final", true)?,
            euler_at_final: cfg.bool("euler_at_final", false)?,
            ramp: read_ramp(&cfg, opts, true)?,
            final_sigma_zero: read_final_zero(&cfg)?,
            lambda_min_clipped: cfg.opt_f64("lambda_min_clipped")?,
            timestep_spacing: TimestepSpacing::read(&cfg, TimestepSpacing::Linspace)?,
            steps_offset: cfg.i64("steps_offset", 0)?,
        })
    }
}

/// diffusers' `DPMSolverMultistepScheduler` after `set_timesteps`.
#[derive(Debug, Clone)]
pub struct DpmSolverMultistepScheduler {
    config: DpmMultistepConfig,
    timesteps: Vec<f64>,
    sigmas32: Vec<f32>,
    sigmas: Vec<f64>,
    history: Vec<Option<Tensor>>,
    lower_order_nums: usize,
    cursor: Cursor,
}

impl DpmSolverMultistepScheduler {
    /// The scheduler for `config`, set up for `steps` inference steps.
    pub fn new(config: &DpmMultistepConfig, steps: usize) -> Result<Self> {
        if steps == 0 {
            return Err(EngineError::invalid(
                "num_inference_steps",
                "must be at least 1",
            ));
        }
        let train = config.beta.num_train_timesteps;
        let (alphas_cumprod, train_sigmas) = training(&config.beta)?;
        let last_timestep = train - clipped_count(&alphas_cumprod, config.lambda_min_clipped);
        if last_timestep == 0 {
            return Err(EngineError::invalid(
                "scheduler",
                format!("{CLASS}: lambda_min_clipped leaves no timesteps"),
            ));
        }
        let spec = ScheduleSpec {
            base: spaced_timesteps(
                config.timestep_spacing,
                last_timestep,
                train,
                steps,
                config.steps_offset,
            ),
            steps,
            ramp: config.ramp,
            round_ramp_timesteps: config.beta.beta_schedule
                != super::config::BetaSchedule::SquaredCosCapV2,
            sigma_min: None,
            sigma_max: None,
            final_sigma: if config.final_sigma_zero {
                FinalSigma::Zero
            } else {
                FinalSigma::TrainMin
            },
        };
        let (timesteps, sigmas32) = super::multistep::make_schedule(&spec, &train_sigmas);
        Ok(DpmSolverMultistepScheduler {
            config: config.clone(),
            timesteps,
            sigmas: sigmas32.iter().map(|&s| s as f64).collect(),
            sigmas32,
            history: vec![None; config.solver_order],
            lower_order_nums: 0,
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
        let (h, h_0) = (lambda_t - lambda_s0, lambda_s0 - lambda_s1);
        let r0 = h_0 / h;
        let d1 = ops::mul(&(m0 - m1)?, 1.0 / r0)?;
        let heun = self.config.solver_type == SolverType::Heun;
        second_order_update([alpha_t, sigma_t, sigma_s0, h], x, m0, &d1, heun, noise)
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
            lambda_t - lambda_s0,
            lambda_s0 - lambda_s1,
            lambda_s1 - lambda_s2,
        );
        let (r0, r1) = (h_0 / h, h_1 / h);
        let d1_0 = ops::mul(&(m0 - m1)?, 1.0 / r0)?;
        let d1_1 = ops::mul(&(m1 - m2)?, 1.0 / r1)?;
        let diff = (&d1_0 - &d1_1)?;
        let d1 = (&d1_0 + ops::mul(&diff, r0 / (r0 + r1))?)?;
        let d2 = ops::mul(&diff, 1.0 / (r0 + r1))?;
        match noise {
            None => {
                let em = exp(-h) - 1.0;
                lin(&[
                    (sigma_t / sigma_s0, x),
                    (-(alpha_t * em), m0),
                    (alpha_t * (em / h + 1.0), &d1),
                    (-(alpha_t * ((exp(-h) - 1.0 + h) / (h * h) - 0.5)), &d2),
                ])
            }
            Some(z) => {
                let e2 = exp(-2.0 * h);
                let two_h = 2.0 * h;
                lin(&[
                    (sigma_t / sigma_s0 * exp(-h), x),
                    (alpha_t * (1.0 - e2), m0),
                    (alpha_t * ((1.0 - e2) / (-2.0 * h) + 1.0), &d1),
                    (
                        alpha_t * ((1.0 - e2 - 2.0 * h) / (two_h * two_h) - 0.5),
                        &d2,
                    ),
                    (sigma_t * (1.0 - e2).sqrt(), z),
                ])
            }
        }
    }
}

/// DPM-Solver++ first-order update (DDIM in data prediction) from sigma index `i` to `i + 1`, with model
/// output `m`; the SDE variant when `noise` is given. Shared by the multistep and singlestep solvers.
pub(crate) fn first_order(
    sigmas32: &[f32],
    i: usize,
    m: &Tensor,
    x: &Tensor,
    noise: Option<&Tensor>,
) -> Result<Tensor> {
    let (alpha_t, sigma_t) = alpha_sigma(sigmas32[i + 1]);
    let (alpha_s, sigma_s) = alpha_sigma(sigmas32[i]);
    let h = lambda(alpha_t, sigma_t) - lambda(alpha_s, sigma_s);
    match noise {
        None => lin(&[(sigma_t / sigma_s, x), (-(alpha_t * (exp(-h) - 1.0)), m)]),
        Some(z) => {
            let e2 = exp(-2.0 * h);
            lin(&[
                (sigma_t / sigma_s * exp(-h), x),
                (alpha_t * (1.0 - e2), m),
                (sigma_t * (1.0 - e2).sqrt(), z),
            ])
        }
    }
}

/// DPM-Solver++ second-order update `sigma_t / sigma_s * x - c * d0 + c1 * d1` (plus the SDE terms when
/// `noise` is given), from `[alpha_t, sigma_t, sigma_s, h]`; `heun` picks the Heun `c1`, else the
/// midpoint one. Shared by the multistep and singlestep solvers, which differ only in what `sigma_s`, `h`,
/// `d0` and `d1` are.
pub(crate) fn second_order_update(
    [alpha_t, sigma_t, sigma_s, h]: [f32; 4],
    x: &Tensor,
    d0: &Tensor,
    d1: &Tensor,
    heun: bool,
    noise: Option<&Tensor>,
) -> Result<Tensor> {
    match noise {
        None => {
            let c = alpha_t * (exp(-h) - 1.0);
            let c1 = if heun {
                alpha_t * ((exp(-h) - 1.0) / h + 1.0)
            } else {
                -(0.5 * c)
            };
            lin(&[(sigma_t / sigma_s, x), (-c, d0), (c1, d1)])
        }
        Some(z) => {
            let e2 = exp(-2.0 * h);
            let c = alpha_t * (1.0 - e2);
            let c1 = if heun {
                alpha_t * ((1.0 - e2) / (-2.0 * h) + 1.0)
            } else {
                0.5 * c
            };
            lin(&[
                (sigma_t / sigma_s * exp(-h), x),
                (c, d0),
                (c1, d1),
                (sigma_t * (1.0 - e2).sqrt(), z),
            ])
        }
    }
}

impl Scheduler for DpmSolverMultistepScheduler {
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
        let i = self
            .cursor
            .checked_current(CLASS, &self.timesteps, timestep)?;
        let n = self.timesteps.len();
        let cfg = &self.config;
        let lower_order_final = i == n - 1
            && (cfg.euler_at_final || (cfg.lower_order_final && n < 15) || cfg.final_sigma_zero);
        let lower_order_second = i + 2 == n && cfg.lower_order_final && n < 15;

        let x = ops::f32(sample)?;
        let out = ops::f32(model_output)?;
        let x0 = data_prediction(cfg.prediction_type, &x, &out, self.sigmas32[i])?;
        push_history(&mut self.history, x0.clone());
        let noise = match cfg.algorithm {
            Algorithm::SdeDpmSolverPP => {
                Some(rng.randn_tensor(model_output.shape(), DType::F32, model_output.device())?)
            }
            Algorithm::DpmSolverPP => None,
        };
        let order = cfg.solver_order;
        let prev = if order == 1 || self.lower_order_nums < 1 || lower_order_final {
            first_order(&self.sigmas32, i, &x0, &x, noise.as_ref())?
        } else if order == 2 || self.lower_order_nums < 2 || lower_order_second {
            self.second_order(i, &x, noise.as_ref())?
        } else {
            self.third_order(i, &x, noise.as_ref())?
        };
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
