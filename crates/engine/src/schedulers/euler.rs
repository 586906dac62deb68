//! Euler's method in k-diffusion sigma space (Karras et al. 2022, algorithm 2 without churn).
//!
//! Quirks kept from diffusers' `EulerDiscreteScheduler`:
//! - Timesteps are float32 and fractional for "linspace" spacing (e.g. 832.5) and for Karras/exponential
//!   sigmas (mapped back to timesteps by log-sigma interpolation); they are exposed as the exact f32 values.
//! - `init_noise_sigma` is the largest sigma for "linspace"/"trailing" spacing but `sqrt(max_sigma² + 1)` for
//!   "leading".
//! - `add_noise` takes its sigma from the begin index when one is set (img2img), else from the position of
//!   the timestep in the list (the second match if it appears twice).
//! - `s_churn` (stochastic Euler) is not exposed: diffusers' pipelines never pass it, so no noise is drawn.

use candle_core::Tensor;
use serde_json::Value;

use super::config::{BetaConfig, ConfigReader, PredictionType, TimestepSpacing};
use super::schedule::{
    exponential_sigmas, interp, karras_sigmas, leading_timesteps, linspace_timesteps, log_f32,
    sigma_to_t, torch_linspace_f32, trailing_timesteps, NoiseSchedule,
};
use super::{ops, past_end, Scheduler, SchedulerOptions, StepCursor};
use crate::error::{EngineError, Result};
use crate::rng::TorchGenerator;

const CLASS: &str = "EulerDiscreteScheduler";

/// How the per-step sigmas are derived from the training sigmas (`interpolation_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interpolation {
    /// Linear interpolation of the training sigmas at the (fractional) timesteps.
    Linear,
    /// Evenly spaced in log-sigma between the extreme training sigmas (`steps + 1` values).
    LogLinear,
}

/// The sigma ramp replacing the interpolated one (`use_karras_sigmas` / `use_exponential_sigmas`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigmaRamp {
    /// Keep the interpolated sigmas.
    Interpolated,
    /// Karras et al.'s rho = 7 ramp.
    Karras,
    /// Evenly spaced in log-sigma.
    Exponential,
}

impl SigmaRamp {
    /// Reads `use_karras_sigmas` / `use_exponential_sigmas` / `use_beta_sigmas`, refusing more than one and
    /// beta sigmas. `opts.use_karras_sigmas = Some(v)` acts as the keyword argument `use_karras_sigmas=v` (it
    /// wins over the file); `None` passes nothing, so the file's `use_karras_sigmas` (default false) applies.
    pub fn read(cfg: &ConfigReader, opts: &SchedulerOptions) -> Result<Self> {
        let class = cfg.class();
        // The request's flag is a keyword argument only when set; a request without it keeps the config's.
        let karras = match opts.use_karras_sigmas {
            Some(v) => v,
            None => cfg.bool("use_karras_sigmas", false)?,
        };
        let exponential = cfg.bool("use_exponential_sigmas", false)?;
        let beta_sigmas = cfg.bool("use_beta_sigmas", false)?;
        if [karras, exponential, beta_sigmas]
            .iter()
            .filter(|&&b| b)
            .count()
            > 1
        {
            let message = format!(
                "only one of use_karras_sigmas, use_exponential_sigmas and use_beta_sigmas can be used \
                 (karras: {karras}, exponential: {exponential}, beta: {beta_sigmas})"
            );
            return Err(if opts.use_karras_sigmas == Some(true) {
                EngineError::invalid("use_karras_sigmas", format!("{class}: {message}"))
            } else {
                cfg.error("use_karras_sigmas", message)
            });
        }
        if beta_sigmas {
            return Err(cfg.unsupported("`use_beta_sigmas: true`"));
        }
        Ok(if karras {
            SigmaRamp::Karras
        } else if exponential {
            SigmaRamp::Exponential
        } else {
            SigmaRamp::Interpolated
        })
    }
}

/// What the final sigma is (`final_sigmas_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalSigma {
    /// 0: the last step lands on the clean sample.
    Zero,
    /// The smallest training sigma.
    SigmaMin,
}

/// The constructor arguments of diffusers' `EulerDiscreteScheduler`.
#[derive(Debug, Clone, PartialEq)]
pub struct EulerConfig {
    /// The training noise schedule.
    pub beta: BetaConfig,
    /// `prediction_type` (default epsilon; `original_sample` is read as `sample`).
    pub prediction_type: PredictionType,
    /// `interpolation_type` (default linear).
    pub interpolation: Interpolation,
    /// `use_karras_sigmas` / `use_exponential_sigmas` (at most one may be set).
    pub ramp: SigmaRamp,
    /// `sigma_min` for the Karras/exponential ramps (default: the smallest interpolated sigma).
    pub sigma_min: Option<f64>,
    /// `sigma_max` for the Karras/exponential ramps (default: the largest interpolated sigma).
    pub sigma_max: Option<f64>,
    /// `timestep_spacing` (default linspace).
    pub timestep_spacing: TimestepSpacing,
    /// `timestep_type: "continuous"` (with v_prediction the timesteps become `0.25 * ln(sigma)`).
    pub continuous_timesteps: bool,
    /// `steps_offset` (default 0).
    pub steps_offset: i64,
    /// `final_sigmas_type` (default zero).
    pub final_sigma: FinalSigma,
}

impl EulerConfig {
    /// Reads a scheduler config with diffusers' `from_config` semantics. `opts.use_karras_sigmas = Some(v)`
    /// acts as the keyword argument `use_karras_sigmas=v` (it wins over the file); `None` passes nothing, so
    /// the file's `use_karras_sigmas` (default false) applies.
    pub fn from_config(config: &Value, opts: &SchedulerOptions) -> Result<Self> {
        let cfg = ConfigReader::new(CLASS, config)?;
        let ramp = SigmaRamp::read(&cfg, opts)?;
        Ok(EulerConfig {
            beta: BetaConfig::read(&cfg, &BetaConfig::DIFFUSERS_DEFAULT, true)?,
            prediction_type: cfg.choice(
                "prediction_type",
                PredictionType::Epsilon,
                &[
                    ("epsilon", PredictionType::Epsilon),
                    ("v_prediction", PredictionType::VPrediction),
                    ("sample", PredictionType::Sample),
                    ("original_sample", PredictionType::Sample),
                ],
            )?,
            interpolation: cfg.choice(
                "interpolation_type",
                Interpolation::Linear,
                &[
                    ("linear", Interpolation::Linear),
                    ("log_linear", Interpolation::LogLinear),
                ],
            )?,
            ramp,
            sigma_min: cfg.opt_f64("sigma_min")?,
            sigma_max: cfg.opt_f64("sigma_max")?,
            timestep_spacing: TimestepSpacing::read(&cfg, TimestepSpacing::Linspace)?,
            continuous_timesteps: cfg.choice(
                "timestep_type",
                false,
                &[("discrete", false), ("continuous", true)],
            )?,
            steps_offset: cfg.i64("steps_offset", 0)?,
            final_sigma: cfg.choice(
                "final_sigmas_type",
                FinalSigma::Zero,
                &[
                    ("zero", FinalSigma::Zero),
                    ("sigma_min", FinalSigma::SigmaMin),
                ],
            )?,
        })
    }
}

/// The float32 training sigmas (increasing with t) of a sigma-space sampler; with zero-SNR rescaling the last
/// `alphas_cumprod` is set to 2^-24 first, as diffusers' Euler-family schedulers do.
pub(crate) fn training_sigmas(beta: &BetaConfig) -> Result<Vec<f32>> {
    let mut schedule = NoiseSchedule::new(beta)?;
    if beta.rescale_betas_zero_snr {
        if let Some(last) = schedule.alphas_cumprod.last_mut() {
            *last = 2f32.powi(-24);
        }
    }
    Ok(schedule.sigmas())
}

/// The float32 timestep grid diffusers' sigma-space schedulers start from, largest first.
pub(crate) fn base_timesteps(
    spacing: TimestepSpacing,
    num_train: usize,
    steps: usize,
    steps_offset: i64,
) -> Vec<f32> {
    match spacing {
        TimestepSpacing::Linspace => linspace_timesteps(num_train, steps)
            .into_iter()
            .map(|t| t as f32)
            .collect(),
        TimestepSpacing::Leading => leading_timesteps(num_train, steps, 0)
            .into_iter()
            .map(|t| t as f32 + steps_offset as f32)
            .collect(),
        TimestepSpacing::Trailing => trailing_timesteps(num_train, steps)
            .into_iter()
            .map(|t| t as f32)
            .collect(),
    }
}

/// `init_noise_sigma` of diffusers' sigma-space schedulers.
pub(crate) fn init_noise_sigma(sigmas: &[f32], spacing: TimestepSpacing) -> f64 {
    let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    match spacing {
        TimestepSpacing::Leading => (max * max + 1.0).sqrt() as f64,
        _ => max as f64,
    }
}

/// The denoised estimate x0 from a model output at noise level `sigma` (float32 arithmetic).
pub(crate) fn predict_x0(
    kind: PredictionType,
    sample: &Tensor,
    model_output: &Tensor,
    sigma: f32,
) -> Result<Tensor> {
    Ok(match kind {
        PredictionType::Epsilon => (sample - ops::mul(model_output, sigma)?)?,
        PredictionType::Sample => model_output.clone(),
        PredictionType::VPrediction => {
            let s2 = sigma * sigma + 1.0;
            (ops::mul(model_output, -sigma / s2.sqrt())? + ops::div(sample, s2)?)?
        }
    })
}

/// `sample / sqrt(sigma² + 1)`: the input scaling of every sigma-space sampler.
pub(crate) fn scale_by_sigma(sample: &Tensor, sigma: f32) -> Result<Tensor> {
    ops::div(sample, (sigma * sigma + 1.0).sqrt())
}

/// `scale_model_input` of the sigma-space samplers: `sample` scaled by the sigma at the cursor's current step.
pub(crate) fn scale_at_cursor(
    class: &str,
    cursor: &StepCursor,
    timesteps: &[f64],
    sigmas32: &[f32],
    sample: &Tensor,
    timestep: f64,
) -> Result<Tensor> {
    let i = cursor.current(class, timesteps, timestep)?;
    let sigma = *sigmas32.get(i).ok_or_else(|| past_end(class, i))?;
    scale_by_sigma(sample, sigma)
}

/// `add_noise` of the sigma-space samplers: `original + noise * sigma` (noise cast to the original's dtype),
/// with the sigma at the cursor's noise index.
pub(crate) fn add_noise_at_cursor(
    class: &str,
    cursor: &StepCursor,
    timesteps: &[f64],
    sigmas32: &[f32],
    original: &Tensor,
    noise: &Tensor,
    timestep: f64,
) -> Result<Tensor> {
    let i = cursor.noise_index(class, timesteps, timestep)?;
    let sigma = *sigmas32.get(i).ok_or_else(|| past_end(class, i))?;
    let noise = noise.to_dtype(original.dtype())?;
    Ok((original + ops::mul(&noise, sigma)?)?)
}

/// diffusers' `EulerDiscreteScheduler` after `set_timesteps`.
#[derive(Debug, Clone)]
pub struct EulerDiscreteScheduler {
    config: EulerConfig,
    sigmas32: Vec<f32>,
    sigmas: Vec<f64>,
    timesteps: Vec<f64>,
    init_noise_sigma: f64,
    cursor: StepCursor,
}

impl EulerDiscreteScheduler {
    /// The scheduler for `config`, set up for `steps` inference steps.
    pub fn new(config: &EulerConfig, steps: usize) -> Result<Self> {
        if steps == 0 {
            return Err(EngineError::invalid(
                "num_inference_steps",
                "must be at least 1",
            ));
        }
        let train = config.beta.num_train_timesteps;
        let train_sigmas = training_sigmas(&config.beta)?;
        let log_sigmas = log_f32(&train_sigmas);
        let base = base_timesteps(config.timestep_spacing, train, steps, config.steps_offset);

        let mut ts: Vec<f64> = base.iter().map(|&t| t as f64).collect();
        let mut sigmas: Vec<f64> = match config.interpolation {
            Interpolation::Linear => {
                let fp: Vec<f64> = train_sigmas.iter().map(|&s| s as f64).collect();
                ts.iter().map(|&t| interp(t, &fp)).collect()
            }
            Interpolation::LogLinear => {
                let lo = (train_sigmas[train_sigmas.len() - 1] as f64).ln() as f32;
                let hi = (train_sigmas[0] as f64).ln() as f32;
                torch_linspace_f32(lo, hi, steps + 1)
                    .into_iter()
                    .map(|l| (l as f64).exp() as f32 as f64)
                    .collect()
            }
        };
        if config.ramp != SigmaRamp::Interpolated {
            let sigma_min = config.sigma_min.unwrap_or(sigmas[sigmas.len() - 1]);
            let sigma_max = config.sigma_max.unwrap_or(sigmas[0]);
            sigmas = match config.ramp {
                SigmaRamp::Karras => karras_sigmas(sigma_min, sigma_max, steps),
                _ => exponential_sigmas(sigma_min, sigma_max, steps),
            };
            ts = sigmas.iter().map(|&s| sigma_to_t(s, &log_sigmas)).collect();
        }
        let last = match config.final_sigma {
            FinalSigma::Zero => 0.0,
            FinalSigma::SigmaMin => train_sigmas[0] as f64,
        };
        sigmas.push(last);
        let sigmas32: Vec<f32> = sigmas.iter().map(|&s| s as f32).collect();

        let timesteps: Vec<f64> = if config.continuous_timesteps
            && config.prediction_type == PredictionType::VPrediction
        {
            sigmas32[..sigmas32.len() - 1]
                .iter()
                .map(|&s| (0.25 * s.ln()) as f64)
                .collect()
        } else {
            ts.iter().map(|&t| t as f32 as f64).collect()
        };
        let init_noise_sigma = init_noise_sigma(&sigmas32, config.timestep_spacing);
        Ok(EulerDiscreteScheduler {
            config: config.clone(),
            sigmas: sigmas32.iter().map(|&s| s as f64).collect(),
            sigmas32,
            timesteps,
            init_noise_sigma,
            cursor: StepCursor::default(),
        })
    }
}

impl Scheduler for EulerDiscreteScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
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
        let i = self.cursor.current_before_last(
            CLASS,
            &self.timesteps,
            timestep,
            self.sigmas32.len(),
        )?;
        let sigma = self.sigmas32[i];
        let x = ops::f32(sample)?;
        let out = ops::f32(model_output)?;
        let x0 = predict_x0(self.config.prediction_type, &x, &out, sigma)?;
        let derivative = ops::div(&(&x - x0)?, sigma)?;
        let dt = self.sigmas32[i + 1] - sigma;
        let prev = (&x + ops::mul(&derivative, dt)?)?;
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
