//! DEIS (Zhang & Chen 2022, "log-rho" multistep), diffusers' `DEISMultistepScheduler`: the model output is
//! turned into a noise prediction and integrated with polynomial extrapolation in log(rho), rho = sigma_t /
//! alpha_t.
//!
//! Quirks kept from diffusers:
//! - There is no `final_sigmas_type`: the last sigma is the smallest training sigma, or with Karras /
//!   exponential sigmas the ramp's last value repeated (so the final step changes nothing but the history).
//! - `lower_order_final` only applies under 15 steps.
//! - The class has no `rescale_betas_zero_snr` (the key is ignored, as `from_config` ignores it).
//! - `algorithm_type` dpmsolver/dpmsolver++ reads as deis and midpoint/heun/bh1/bh2 `solver_type`s as
//!   logrho, as diffusers' constructor remaps them.

use candle_core::Tensor;
use serde_json::Value;

use super::config::{BetaConfig, ConfigReader, PredictionType, TimestepSpacing};
use super::multistep::{
    add_noise, alpha_sigma, data_prediction, exp, lambda, lin, ln, make_schedule, push_history,
    read_prediction_type, read_ramp, read_solver_order, recent, reject_common, spaced_timesteps,
    training, Cursor, FinalSigma, Ramp, ScheduleSpec,
};
use super::{ops, Scheduler, SchedulerOptions};
use crate::error::{EngineError, Result};
use crate::rng::TorchGenerator;

const CLASS: &str = "DEISMultistepScheduler";

/// The constructor arguments of diffusers' `DEISMultistepScheduler` that this engine implements.
#[derive(Debug, Clone, PartialEq)]
pub struct DeisConfig {
    /// The training noise schedule.
    pub beta: BetaConfig,
    /// `solver_order` (1 to 3, default 2).
    pub solver_order: usize,
    /// `prediction_type` (default epsilon).
    pub prediction_type: PredictionType,
    /// `lower_order_final` (default true).
    pub lower_order_final: bool,
    /// The sigma ramp (`use_karras_sigmas`, `use_exponential_sigmas`).
    pub ramp: Ramp,
    /// `timestep_spacing` (default linspace).
    pub timestep_spacing: TimestepSpacing,
    /// `steps_offset` (default 0).
    pub steps_offset: i64,
}

impl DeisConfig {
    /// Reads a scheduler config with `from_config` semantics (`opts.use_karras_sigmas` wins when set).
    pub fn from_config(config: &Value, opts: &SchedulerOptions) -> Result<Self> {
        let cfg = ConfigReader::new(CLASS, config)?;
        reject_common(&cfg)?;
        cfg.choice(
            "algorithm_type",
            (),
            &[("deis", ()), ("dpmsolver", ()), ("dpmsolver++", ())],
        )?;
        cfg.choice(
            "solver_type",
            (),
            &[
                ("logrho", ()),
                ("midpoint", ()),
                ("heun", ()),
                ("bh1", ()),
                ("bh2", ()),
            ],
        )?;
        Ok(DeisConfig {
            beta: BetaConfig::read(&cfg, &BetaConfig::DIFFUSERS_DEFAULT, false)?,
            solver_order: read_solver_order(&cfg, 3)?,
            prediction_type: read_prediction_type(&cfg)?,
            lower_order_final: cfg.bool("lower_order_final", true)?,
            ramp: read_ramp(&cfg, opts, false)?,
            timestep_spacing: TimestepSpacing::read(&cfg, TimestepSpacing::Linspace)?,
            steps_offset: cfg.i64("steps_offset", 0)?,
        })
    }
}

/// diffusers' `DEISMultistepScheduler` after `set_timesteps`.
#[derive(Debug, Clone)]
pub struct DeisMultistepScheduler {
    config: DeisConfig,
    timesteps: Vec<f64>,
    sigmas32: Vec<f32>,
    sigmas: Vec<f64>,
    history: Vec<Option<Tensor>>,
    lower_order_nums: usize,
    cursor: Cursor,
}

/// The second-order `ind_fn(t, b, c)` in float32, as diffusers evaluates it with numpy logs.
fn ind2(t: f32, b: f32, c: f32) -> f32 {
    t * (-ln(c) + ln(t) - 1.0) / (ln(b) - ln(c))
}

/// The third-order `ind_fn(t, b, c, d)` in float32.
fn ind3(t: f32, b: f32, c: f32, d: f32) -> f32 {
    let (lt, lb, lc, ld) = (ln(t), ln(b), ln(c), ln(d));
    let numerator = t * (lc * (ld - lt + 1.0) - ld * lt + ld + lt * lt - 2.0 * lt + 2.0);
    let denominator = (lb - lc) * (lb - ld);
    numerator / denominator
}

impl DeisMultistepScheduler {
    /// The scheduler for `config`, set up for `steps` inference steps.
    pub fn new(config: &DeisConfig, steps: usize) -> Result<Self> {
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
            sigma_min: None,
            sigma_max: None,
            final_sigma: FinalSigma::RampLast,
        };
        let (timesteps, sigmas32) = make_schedule(&spec, &train_sigmas);
        Ok(DeisMultistepScheduler {
            config: config.clone(),
            timesteps,
            sigmas: sigmas32.iter().map(|&s| s as f64).collect(),
            sigmas32,
            history: vec![None; config.solver_order],
            lower_order_nums: 0,
            cursor: Cursor::default(),
        })
    }

    /// rho = sigma_t / alpha_t at sigma index `i`, with alpha_t.
    fn rho(&self, i: usize) -> (f32, f32) {
        let (alpha, sigma) = alpha_sigma(self.sigmas32[i]);
        (sigma / alpha, alpha)
    }
}

impl Scheduler for DeisMultistepScheduler {
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
        let lower_order_final = i + 1 == n && self.config.lower_order_final && n < 15;
        let lower_order_second = i + 2 == n && self.config.lower_order_final && n < 15;
        let x = ops::f32(sample)?;
        let out = ops::f32(model_output)?;
        // convert_model_output: x0, then back to a noise prediction.
        let (alpha_s, sigma_s) = alpha_sigma(self.sigmas32[i]);
        let x0 = data_prediction(self.config.prediction_type, &x, &out, self.sigmas32[i])?;
        let eps = ops::div(&lin(&[(1.0, &x), (-alpha_s, &x0)])?, sigma_s)?;
        push_history(&mut self.history, eps.clone());

        let order = self.config.solver_order;
        let prev = if order == 1 || self.lower_order_nums < 1 || lower_order_final {
            let (alpha_t, sigma_t) = alpha_sigma(self.sigmas32[i + 1]);
            let h = lambda(alpha_t, sigma_t) - lambda(alpha_s, sigma_s);
            lin(&[(alpha_t / alpha_s, &x), (-(sigma_t * (exp(h) - 1.0)), &eps)])?
        } else if order == 2 || self.lower_order_nums < 2 || lower_order_second {
            let (rho_t, alpha_t) = self.rho(i + 1);
            let (rho_s0, alpha_s0) = self.rho(i);
            let (rho_s1, _) = self.rho(i - 1);
            let m0 = recent(&self.history, 1, CLASS)?;
            let m1 = recent(&self.history, 2, CLASS)?;
            let coef1 = ind2(rho_t, rho_s0, rho_s1) - ind2(rho_s0, rho_s0, rho_s1);
            let coef2 = ind2(rho_t, rho_s1, rho_s0) - ind2(rho_s0, rho_s1, rho_s0);
            let inner = (ops::div(&x, alpha_s0)? + lin(&[(coef1, m0)])?)?;
            let inner = (inner + ops::mul(m1, coef2)?)?;
            ops::mul(&inner, alpha_t)?
        } else {
            let (rho_t, alpha_t) = self.rho(i + 1);
            let (rho_s0, alpha_s0) = self.rho(i);
            let (rho_s1, _) = self.rho(i - 1);
            let (rho_s2, _) = self.rho(i - 2);
            let m0 = recent(&self.history, 1, CLASS)?;
            let m1 = recent(&self.history, 2, CLASS)?;
            let m2 = recent(&self.history, 3, CLASS)?;
            let coef1 = ind3(rho_t, rho_s0, rho_s1, rho_s2) - ind3(rho_s0, rho_s0, rho_s1, rho_s2);
            let coef2 = ind3(rho_t, rho_s1, rho_s2, rho_s0) - ind3(rho_s0, rho_s1, rho_s2, rho_s0);
            let coef3 = ind3(rho_t, rho_s2, rho_s0, rho_s1) - ind3(rho_s0, rho_s2, rho_s0, rho_s1);
            let inner = (ops::div(&x, alpha_s0)? + ops::mul(m0, coef1)?)?;
            let inner = (inner + ops::mul(m1, coef2)?)?;
            let inner = (inner + ops::mul(m2, coef3)?)?;
            ops::mul(&inner, alpha_t)?
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
