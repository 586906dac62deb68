//! What LMS, Heun, KDPM2 and KDPM2-ancestral share: their config keys and the sigma schedule they build in
//! `set_timesteps` before each of them rearranges it (diffusers copies the same code into the four classes).

use serde_json::Value;

use super::config::{BetaConfig, BetaSchedule, ConfigReader, PredictionType, TimestepSpacing};
use super::euler::{base_timesteps, training_sigmas, SigmaRamp};
use super::schedule::{exponential_sigmas, interp, karras_sigmas, log_f32, sigma_to_t};
use super::SchedulerOptions;
use crate::error::{EngineError, Result};

/// The constructor arguments LMS, Heun, KDPM2 and KDPM2-ancestral have in common.
#[derive(Debug, Clone, PartialEq)]
pub struct KConfig {
    /// The training noise schedule (none of these classes takes `rescale_betas_zero_snr`).
    pub beta: BetaConfig,
    /// `prediction_type` (default epsilon).
    pub prediction_type: PredictionType,
    /// `use_karras_sigmas` / `use_exponential_sigmas`.
    pub ramp: SigmaRamp,
    /// `sigma_min` / `sigma_max` of the Karras/exponential ramps. They are not constructor arguments: diffusers
    /// finds them in the config only when the file carries them (its "hidden" keys); LMS ignores them for
    /// Karras sigmas.
    pub sigma_min: Option<f64>,
    /// See `sigma_min`.
    pub sigma_max: Option<f64>,
    /// `timestep_spacing` (default linspace).
    pub timestep_spacing: TimestepSpacing,
    /// `steps_offset` (default 0).
    pub steps_offset: i64,
}

/// The beta defaults of Heun, KDPM2 and KDPM2-ancestral ("sensible defaults" for SD in diffusers).
pub const K_BETA_DEFAULT: BetaConfig = BetaConfig {
    num_train_timesteps: 1000,
    beta_start: 0.00085,
    beta_end: 0.012,
    beta_schedule: BetaSchedule::Linear,
    trained_betas: None,
    rescale_betas_zero_snr: false,
};

impl KConfig {
    /// Reads the shared keys for `cfg`'s class; `beta_defaults` are the class's defaults and `allowed` the
    /// prediction types it implements (others are refused as diffusers refuses them).
    pub fn read(
        cfg: &ConfigReader,
        opts: &SchedulerOptions,
        beta_defaults: &BetaConfig,
        allowed: &[(&str, PredictionType)],
    ) -> Result<Self> {
        let ramp = SigmaRamp::read(cfg, opts)?;
        let prediction_type = PredictionType::read(cfg, allowed)?;
        Ok(KConfig {
            beta: BetaConfig::read(cfg, beta_defaults, false)?,
            prediction_type,
            ramp,
            sigma_min: cfg.opt_f64("sigma_min")?,
            sigma_max: cfg.opt_f64("sigma_max")?,
            timestep_spacing: TimestepSpacing::read(cfg, TimestepSpacing::Linspace)?,
            steps_offset: cfg.i64("steps_offset", 0)?,
        })
    }

    /// Convenience for classes with no further keys.
    pub fn from_config(
        class: &'static str,
        config: &Value,
        opts: &SchedulerOptions,
        beta_defaults: &BetaConfig,
        allowed: &[(&str, PredictionType)],
    ) -> Result<Self> {
        let cfg = ConfigReader::new(class, config)?;
        Self::read(&cfg, opts, beta_defaults, allowed)
    }
}

/// The schedule every one of these classes computes first in `set_timesteps`.
#[derive(Debug, Clone)]
pub struct KSchedule {
    /// The timesteps in float64 as numpy has them (float32 grid values, or `_sigma_to_t` results for ramps).
    pub timesteps: Vec<f64>,
    /// The `steps` sigmas in float64, before the final 0 is appended and they are cast to float32.
    pub sigmas: Vec<f64>,
    /// The float32 log-sigmas of the training schedule (increasing).
    pub log_sigmas: Vec<f32>,
}

/// diffusers' shared `set_timesteps` prologue: timestep grid, interpolated sigmas, optional ramp.
/// `ramp_bounds_from_config` says whether the class reads `sigma_min`/`sigma_max` for Karras sigmas.
pub fn k_schedule(
    config: &KConfig,
    steps: usize,
    ramp_bounds_from_config: bool,
) -> Result<KSchedule> {
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
    let fp: Vec<f64> = train_sigmas.iter().map(|&s| s as f64).collect();
    let mut timesteps: Vec<f64> = base.iter().map(|&t| t as f64).collect();
    let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| interp(t, &fp)).collect();
    if config.ramp != SigmaRamp::Interpolated {
        let (cfg_min, cfg_max) = match (config.ramp, ramp_bounds_from_config) {
            (SigmaRamp::Karras, false) => (None, None),
            _ => (config.sigma_min, config.sigma_max),
        };
        let sigma_min = cfg_min.unwrap_or(sigmas[sigmas.len() - 1]);
        let sigma_max = cfg_max.unwrap_or(sigmas[0]);
        sigmas = match config.ramp {
            SigmaRamp::Karras => karras_sigmas(sigma_min, sigma_max, steps),
            _ => exponential_sigmas(sigma_min, sigma_max, steps),
        };
        timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &log_sigmas)).collect();
    }
    Ok(KSchedule {
        timesteps,
        sigmas,
        log_sigmas,
    })
}

/// `_sigma_to_t` as diffusers' KDPM2 classes call it on a float32 torch scalar with torch log-sigmas: the
/// whole computation then runs in float32.
pub fn sigma_to_t_f32(sigma: f32, log_sigmas: &[f32]) -> f32 {
    if sigma.is_nan() {
        return f32::NAN;
    }
    let log_sigma = sigma.max(1e-10).ln();
    let mut count = 0usize;
    let mut best = 0usize;
    let mut best_count = 0usize;
    for (i, &ls) in log_sigmas.iter().enumerate() {
        if log_sigma - ls >= 0.0 {
            count += 1;
        }
        if count > best_count {
            best_count = count;
            best = i;
        }
    }
    let low_idx = best.min(log_sigmas.len() - 2);
    let high_idx = low_idx + 1;
    let low = log_sigmas[low_idx];
    let high = log_sigmas[high_idx];
    let w = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f32 + w * high_idx as f32
}

/// `a.lerp(b, 0.5)` in float32 as torch computes it (`b - (b - a) * 0.5`).
pub fn lerp_half(a: f32, b: f32) -> f32 {
    (-0.5f32).mul_add(b - a, b)
}

/// `x[:1]`, then every later entry twice, then `x[-1:]`: the `repeat_interleave` layout of diffusers'
/// KDPM2 classes (Heun's leaves out the last input entry's repetition; see `heun`).
pub fn interleave_repeat<T: Copy>(x: &[T]) -> Vec<T> {
    let mut out = Vec::with_capacity(2 * x.len());
    out.push(x[0]);
    for &v in &x[1..] {
        out.push(v);
        out.push(v);
    }
    out.push(x[x.len() - 1]);
    out
}
