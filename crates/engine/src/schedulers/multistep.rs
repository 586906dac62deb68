//! What diffusers' exponential-integrator samplers (DPM-Solver multistep/singlestep, UniPC, DEIS) share:
//! reading their common config keys, building their integer timesteps and float32 sigmas, the
//! `alpha_t`/`sigma_t`/`lambda_t` scalars, the step cursor and `add_noise`.
//!
//! Precision: diffusers computes every per-step coefficient on 0-d float32 tensors, so the scalars here are
//! float32 with one rounding per operation, in diffusers' order; transcendental functions are evaluated in
//! float64 and rounded (correctly rounded in all but rare cases, like glibc's float functions torch calls).
//! Tensor updates are sums of scaled tensors evaluated left to right, each product rounded once.

use candle_core::Tensor;

use super::config::{BetaConfig, ConfigReader, PredictionType, TimestepSpacing};
use super::schedule::{
    exponential_sigmas, interp, karras_sigmas, log_f32, numpy_arange, numpy_linspace, sigma_to_t,
    NoiseSchedule,
};
use super::{ops, past_end, SchedulerOptions};
use crate::error::{EngineError, Result};

/// `exp` of a float32 scalar, rounded to float32.
pub(crate) fn exp(x: f32) -> f32 {
    (x as f64).exp() as f32
}

/// `expm1` of a float32 scalar, rounded to float32.
pub(crate) fn expm1(x: f32) -> f32 {
    (x as f64).exp_m1() as f32
}

/// Natural log of a float32 scalar, rounded to float32 (`ln(0) = -inf`).
pub(crate) fn ln(x: f32) -> f32 {
    (x as f64).ln() as f32
}

/// diffusers' `_sigma_to_alpha_sigma_t`: `alpha_t = 1 / sqrt(sigma² + 1)`, `sigma_t = sigma * alpha_t`.
pub(crate) fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0f32 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// `lambda = log(alpha_t) - log(sigma_t)` (infinite at sigma 0).
pub(crate) fn lambda(alpha: f32, sigma: f32) -> f32 {
    ln(alpha) - ln(sigma)
}

/// `sum_i c_i * x_i`, added left to right in float32 (a term `- c * x` is written as `(-c, x)`, which is
/// the same float32 result).
pub(crate) fn lin(terms: &[(f32, &Tensor)]) -> Result<Tensor> {
    let mut acc: Option<Tensor> = None;
    for &(c, x) in terms {
        let term = ops::mul(x, c)?;
        acc = Some(match acc {
            None => term,
            Some(a) => (a + term)?,
        });
    }
    acc.ok_or_else(|| EngineError::invalid("scheduler", "empty linear combination"))
}

/// The sigma ramp the schedule uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ramp {
    /// The training sigmas at the integer timesteps.
    Interpolated,
    /// Karras et al.'s rho = 7 ramp (`use_karras_sigmas`).
    Karras,
    /// Evenly spaced in log-sigma (`use_exponential_sigmas`).
    Exponential,
    /// Evenly spaced in lambda = -log(sigma) (`use_lu_lambdas`, DPM-Solver multistep only).
    Lu,
}

/// Reads `use_karras_sigmas` (the request's `Some(v)` wins), `use_exponential_sigmas`, `use_beta_sigmas`
/// and, where the class has it, `use_lu_lambdas`; refuses what this engine does not implement.
pub(crate) fn read_ramp(cfg: &ConfigReader, opts: &SchedulerOptions, has_lu: bool) -> Result<Ramp> {
    let class = cfg.class();
    let karras = match opts.use_karras_sigmas {
        Some(v) => v,
        None => cfg.bool("use_karras_sigmas", false)?,
    };
    let exponential = cfg.bool("use_exponential_sigmas", false)?;
    let beta = cfg.bool("use_beta_sigmas", false)?;
    if [karras, exponential, beta].iter().filter(|&&b| b).count() > 1 {
        let message = format!(
            "only one of use_karras_sigmas, use_exponential_sigmas and use_beta_sigmas can be used \
             (karras: {karras}, exponential: {exponential}, beta: {beta})"
        );
        return Err(if opts.use_karras_sigmas == Some(true) {
            EngineError::invalid("use_karras_sigmas", format!("{class}: {message}"))
        } else {
            cfg.error("use_karras_sigmas", message)
        });
    }
    if beta {
        return Err(cfg.unsupported("`use_beta_sigmas: true`"));
    }
    cfg.reject_true("use_flow_sigmas", false)?;
    let lu = has_lu && cfg.bool("use_lu_lambdas", false)?;
    Ok(if karras {
        Ramp::Karras
    } else if lu {
        // diffusers checks Karras first, then Lu, then exponential.
        Ramp::Lu
    } else if exponential {
        Ramp::Exponential
    } else {
        Ramp::Interpolated
    })
}

/// Refuses the options these classes share that this engine does not implement.
pub(crate) fn reject_common(cfg: &ConfigReader) -> Result<()> {
    cfg.reject_true("thresholding", false)?;
    if let Some(v) = cfg.raw("variance_type") {
        return Err(cfg.unsupported(format_args!(
            "`variance_type: {v}` (learned-variance models)"
        )));
    }
    Ok(())
}

/// `prediction_type` of these classes (epsilon, v_prediction, sample; `flow_prediction` is refused).
pub(crate) fn read_prediction_type(cfg: &ConfigReader) -> Result<PredictionType> {
    if cfg.raw("prediction_type").and_then(|v| v.as_str()) == Some("flow_prediction") {
        return Err(cfg.unsupported("`prediction_type: \"flow_prediction\"`"));
    }
    cfg.choice(
        "prediction_type",
        PredictionType::Epsilon,
        &[
            ("epsilon", PredictionType::Epsilon),
            ("v_prediction", PredictionType::VPrediction),
            ("sample", PredictionType::Sample),
        ],
    )
}

/// `final_sigmas_type`: `true` for "zero", `false` for "sigma_min".
pub(crate) fn read_final_zero(cfg: &ConfigReader) -> Result<bool> {
    cfg.choice(
        "final_sigmas_type",
        true,
        &[("zero", true), ("sigma_min", false)],
    )
}

/// `solver_order`, which must lie in `1..=max`.
pub(crate) fn read_solver_order(cfg: &ConfigReader, max: usize) -> Result<usize> {
    let order = cfg.usize_at_least("solver_order", 2, 1)?;
    if order > max {
        return Err(cfg.error(
            "solver_order",
            format!("must be between 1 and {max}, got {order}"),
        ));
    }
    Ok(order)
}

/// The training schedule of these classes: `alphas_cumprod` (with the zero-SNR fix-up of the last value to
/// 2^-24 when `rescale_betas_zero_snr`) and the float32 training sigmas, increasing with t.
pub(crate) fn training(beta: &BetaConfig) -> Result<(Vec<f32>, Vec<f32>)> {
    let mut schedule = NoiseSchedule::new(beta)?;
    if beta.rescale_betas_zero_snr {
        if let Some(last) = schedule.alphas_cumprod.last_mut() {
            *last = 2f32.powi(-24);
        }
    }
    let sigmas = schedule.sigmas();
    Ok((schedule.alphas_cumprod, sigmas))
}

/// diffusers' `searchsorted(flip(lambda_t), lambda_min_clipped)`: how many training timesteps (from the
/// end) have a log-SNR below the clip value.
pub(crate) fn clipped_count(alphas_cumprod: &[f32], lambda_min_clipped: Option<f64>) -> usize {
    let Some(clip) = lambda_min_clipped else {
        return 0;
    };
    alphas_cumprod
        .iter()
        .rev()
        .map(|&a| lambda(a.sqrt(), (1.0 - a).sqrt()) as f64)
        .take_while(|&l| l < clip)
        .count()
}

/// Integer timesteps, largest first, of diffusers' `timestep_spacing` for these classes: the grid runs
/// over `0..last_timestep` (`num_train_timesteps` unless clipped) with `steps + 1` points, the last dropped.
pub(crate) fn spaced_timesteps(
    spacing: TimestepSpacing,
    last_timestep: usize,
    num_train: usize,
    steps: usize,
    steps_offset: i64,
) -> Vec<i64> {
    match spacing {
        TimestepSpacing::Linspace => {
            let mut v: Vec<i64> = numpy_linspace(0.0, last_timestep as f64 - 1.0, steps + 1)
                .into_iter()
                .map(|t| t.round_ties_even() as i64)
                .collect();
            v.reverse();
            v.pop();
            v
        }
        TimestepSpacing::Leading => {
            let ratio = (last_timestep / (steps + 1)) as i64;
            (1..=steps as i64)
                .rev()
                .map(|i| i * ratio + steps_offset)
                .collect()
        }
        TimestepSpacing::Trailing => numpy_arange(
            last_timestep as f64,
            0.0,
            -(num_train as f64 / steps as f64),
        )
        .into_iter()
        .map(|t| t.round_ties_even() as i64 - 1)
        .collect(),
    }
}

/// What the appended final sigma is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FinalSigma {
    /// 0.
    Zero,
    /// The smallest training sigma.
    TrainMin,
    /// The last sigma of a Karras/exponential/Lu ramp, else the smallest training sigma (UniPC's
    /// `sigma_min` and DEIS).
    RampLast,
}

/// How a schedule is turned from timesteps and a ramp into timesteps and sigmas.
#[derive(Debug, Clone)]
pub(crate) struct ScheduleSpec {
    /// The spaced integer timesteps (used as is for [`Ramp::Interpolated`]).
    pub base: Vec<i64>,
    /// The requested step count (the ramps' length).
    pub steps: usize,
    /// The sigma ramp.
    pub ramp: Ramp,
    /// Whether timesteps mapped back from a Karras/Lu ramp are rounded (else truncated to int64, as
    /// `torch.from_numpy(...).to(int64)` does for the exponential ramp and for DPM-Solver with cosine betas).
    pub round_ramp_timesteps: bool,
    /// `sigma_min` / `sigma_max` overrides of the Karras/exponential ramps (UniPC only).
    pub sigma_min: Option<f64>,
    /// See `sigma_min`.
    pub sigma_max: Option<f64>,
    /// The final sigma.
    pub final_sigma: FinalSigma,
}

/// Timesteps (integers, as f64) and float32 sigmas (`steps + 1` values) after diffusers' `set_timesteps`.
pub(crate) fn make_schedule(spec: &ScheduleSpec, train_sigmas: &[f32]) -> (Vec<f64>, Vec<f32>) {
    let n = train_sigmas.len();
    let log_sigmas = log_f32(train_sigmas);
    let (timesteps, mut sigmas): (Vec<i64>, Vec<f64>) = match spec.ramp {
        Ramp::Interpolated => {
            let fp: Vec<f64> = train_sigmas.iter().map(|&s| s as f64).collect();
            let sigmas = spec.base.iter().map(|&t| interp(t as f64, &fp)).collect();
            (spec.base.clone(), sigmas)
        }
        ramp => {
            let sigmas: Vec<f64> = match ramp {
                Ramp::Lu => {
                    let lambda_min = log_sigmas[0] as f64;
                    let lambda_max = log_sigmas[n - 1] as f64;
                    numpy_linspace(0.0, 1.0, spec.steps)
                        .into_iter()
                        .map(|r| (lambda_max + r * (lambda_min - lambda_max)).exp())
                        .collect()
                }
                _ => {
                    let lo = spec.sigma_min.unwrap_or(train_sigmas[0] as f64);
                    let hi = spec.sigma_max.unwrap_or(train_sigmas[n - 1] as f64);
                    if ramp == Ramp::Karras {
                        karras_sigmas(lo, hi, spec.steps)
                    } else {
                        exponential_sigmas(lo, hi, spec.steps)
                    }
                }
            };
            let round = spec.round_ramp_timesteps && ramp != Ramp::Exponential;
            let ts = sigmas
                .iter()
                .map(|&s| {
                    let t = sigma_to_t(s, &log_sigmas);
                    if round {
                        t.round_ties_even() as i64
                    } else {
                        t as i64
                    }
                })
                .collect();
            (ts, sigmas)
        }
    };
    let last = match spec.final_sigma {
        FinalSigma::Zero => 0.0,
        FinalSigma::TrainMin => train_sigmas[0] as f64,
        FinalSigma::RampLast => match spec.ramp {
            Ramp::Interpolated => train_sigmas[0] as f64,
            _ => sigmas[sigmas.len() - 1],
        },
    };
    sigmas.push(last);
    (
        timesteps.into_iter().map(|t| t as f64).collect(),
        sigmas.into_iter().map(|s| s as f32).collect(),
    )
}

/// diffusers' `_step_index` / `_begin_index` for these classes.
#[derive(Debug, Clone, Default)]
pub(crate) struct Cursor {
    pub begin_index: Option<usize>,
    pub step_index: Option<usize>,
}

impl Cursor {
    /// diffusers' `index_for_timestep` here: the second match of a repeated timestep, and the last index
    /// when the timestep is not in the schedule at all.
    pub fn index_for_timestep(timesteps: &[f64], timestep: f64) -> usize {
        let hits: Vec<usize> = timesteps
            .iter()
            .enumerate()
            .filter(|(_, &t)| t == timestep)
            .map(|(i, _)| i)
            .collect();
        match hits.len() {
            0 => timesteps.len().saturating_sub(1),
            1 => hits[0],
            _ => hits[1],
        }
    }

    /// The index of the step about to run (`_init_step_index` when unset).
    pub fn current(&self, timesteps: &[f64], timestep: f64) -> usize {
        match (self.step_index, self.begin_index) {
            (Some(i), _) => i,
            (None, Some(b)) => b,
            (None, None) => Self::index_for_timestep(timesteps, timestep),
        }
    }

    /// [`Cursor::current`], refused as past the end when it is not an index of `timesteps`.
    pub fn checked_current(&self, class: &str, timesteps: &[f64], timestep: f64) -> Result<usize> {
        let i = self.current(timesteps, timestep);
        if i >= timesteps.len() {
            return Err(past_end(class, i));
        }
        Ok(i)
    }

    /// The index `add_noise` takes its sigma from.
    pub fn noise_index(&self, timesteps: &[f64], timestep: f64) -> usize {
        match (self.begin_index, self.step_index) {
            (None, _) => Self::index_for_timestep(timesteps, timestep),
            (Some(_), Some(i)) => i,
            (Some(b), None) => b,
        }
    }
}

/// `alpha_t * original + sigma_t * noise` at the sigma `add_noise` picks.
pub(crate) fn add_noise(
    class: &str,
    sigmas: &[f32],
    index: usize,
    original: &Tensor,
    noise: &Tensor,
) -> Result<Tensor> {
    let sigma = *sigmas.get(index).ok_or_else(|| past_end(class, index))?;
    let (alpha_t, sigma_t) = alpha_sigma(sigma);
    let noise = noise.to_dtype(original.dtype())?;
    Ok((ops::mul(original, alpha_t)? + ops::mul(&noise, sigma_t)?)?)
}

/// The data prediction x0 (DPM-Solver++, UniPC with `predict_x0`, DEIS before its conversion), float32.
pub(crate) fn data_prediction(
    kind: PredictionType,
    sample: &Tensor,
    model_output: &Tensor,
    sigma: f32,
) -> Result<Tensor> {
    let (alpha_t, sigma_t) = alpha_sigma(sigma);
    Ok(match kind {
        PredictionType::Epsilon => {
            ops::div(&(sample - ops::mul(model_output, sigma_t)?)?, alpha_t)?
        }
        PredictionType::Sample => model_output.clone(),
        PredictionType::VPrediction => lin(&[(alpha_t, sample), (-sigma_t, model_output)])?,
    })
}

/// The noise prediction epsilon (UniPC without `predict_x0`), float32.
pub(crate) fn noise_prediction(
    kind: PredictionType,
    sample: &Tensor,
    model_output: &Tensor,
    sigma: f32,
) -> Result<Tensor> {
    let (alpha_t, sigma_t) = alpha_sigma(sigma);
    Ok(match kind {
        PredictionType::Epsilon => model_output.clone(),
        PredictionType::Sample => ops::div(&(sample - ops::mul(model_output, alpha_t)?)?, sigma_t)?,
        PredictionType::VPrediction => lin(&[(alpha_t, model_output), (sigma_t, sample)])?,
    })
}

/// Shifts a history of model outputs left and appends `latest` (diffusers' `model_outputs` list).
pub(crate) fn push_history(history: &mut [Option<Tensor>], latest: Tensor) {
    let n = history.len();
    for i in 0..n.saturating_sub(1) {
        history[i] = history[i + 1].take();
    }
    history[n - 1] = Some(latest);
}

/// The `k`-th most recent entry (1 = latest) of a history that must be present.
pub(crate) fn recent<'a>(
    history: &'a [Option<Tensor>],
    k: usize,
    class: &str,
) -> Result<&'a Tensor> {
    history[history.len() - k].as_ref().ok_or_else(|| {
        EngineError::invalid(
            "scheduler",
            format!("{class}: model output history is missing an entry"),
        )
    })
}
