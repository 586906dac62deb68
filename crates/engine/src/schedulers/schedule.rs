//! The training noise schedule and the pieces of timestep/sigma arithmetic every sampler shares.
//!
//! Precision follows diffusers exactly where it matters for bit-level agreement: betas and `alphas_cumprod`
//! are float32 as torch computes them (torch's `linspace` evaluates `start + step * i` with a fused
//! multiply-add, `cumprod` accumulates in float64); timestep grids and interpolated sigmas are float64 as
//! numpy computes them, and are rounded to float32 where diffusers turns them into float32 tensors.

use super::config::{BetaConfig, BetaSchedule, TimestepSpacing};
use crate::error::{EngineError, Result};

/// The betas and cumulative alpha products of a training schedule (index = training timestep).
#[derive(Debug, Clone, PartialEq)]
pub struct NoiseSchedule {
    /// `beta_t` for t in 0..num_train_timesteps.
    pub betas: Vec<f32>,
    /// `prod_{s<=t} (1 - beta_s)`.
    pub alphas_cumprod: Vec<f32>,
}

impl NoiseSchedule {
    /// The schedule described by `cfg` (diffusers' constructor code for DDPM-family schedulers).
    pub fn new(cfg: &BetaConfig) -> Result<Self> {
        let n = cfg.num_train_timesteps;
        let mut betas: Vec<f32> = match (&cfg.trained_betas, cfg.beta_schedule) {
            (Some(trained), _) => trained.iter().map(|&b| b as f32).collect(),
            (None, BetaSchedule::Linear) => {
                torch_linspace_f32(cfg.beta_start as f32, cfg.beta_end as f32, n)
            }
            (None, BetaSchedule::ScaledLinear) => {
                torch_linspace_f32(cfg.beta_start.sqrt() as f32, cfg.beta_end.sqrt() as f32, n)
                    .into_iter()
                    .map(|b| b * b)
                    .collect()
            }
            (None, BetaSchedule::SquaredCosCapV2) => cosine_betas(n, 0.999),
        };
        if cfg.rescale_betas_zero_snr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
        let alphas_cumprod = cumprod_f32(&alphas);
        Ok(NoiseSchedule {
            betas,
            alphas_cumprod,
        })
    }

    /// Number of training timesteps.
    pub fn len(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// Whether the schedule is empty (never, for a valid config).
    pub fn is_empty(&self) -> bool {
        self.alphas_cumprod.is_empty()
    }

    /// `sqrt((1 - alphas_cumprod) / alphas_cumprod)` in float32: the k-diffusion sigma of every training
    /// timestep, increasing with t.
    pub fn sigmas(&self) -> Vec<f32> {
        self.alphas_cumprod
            .iter()
            .map(|&a| ((1.0 - a) / a).sqrt())
            .collect()
    }
}

/// torch.linspace(start, end, n, dtype=float32) on the CPU: the first half counts up from `start`, the second
/// half down from `end`, each with a fused multiply-add.
pub fn torch_linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    match n {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (end - start) / (n - 1) as f32;
            let half = n / 2;
            (0..n)
                .map(|i| {
                    if i < half {
                        step.mul_add(i as f32, start)
                    } else {
                        (-step).mul_add((n - 1 - i) as f32, end)
                    }
                })
                .collect()
        }
    }
}

/// torch.cumprod on float32 values (the CPU kernel accumulates in float64 and rounds each output).
pub fn cumprod_f32(values: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    values
        .iter()
        .map(|&v| {
            acc *= v as f64;
            acc as f32
        })
        .collect()
}

/// The Glide cosine schedule (diffusers' `betas_for_alpha_bar` with the cosine transform).
fn cosine_betas(n: usize, max_beta: f64) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        let c = ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos();
        c * c
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(max_beta) as f32
        })
        .collect()
}

/// Rescales betas so the last timestep has zero SNR ("Common Diffusion Noise Schedules and Sample Steps are
/// Flawed", algorithm 1), in float32 as diffusers does it.
pub fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let mut sqrt_bar: Vec<f32> = cumprod_f32(&alphas).iter().map(|a| a.sqrt()).collect();
    let first = sqrt_bar[0];
    let last = sqrt_bar[sqrt_bar.len() - 1];
    let scale = first / (first - last);
    for v in sqrt_bar.iter_mut() {
        *v -= last;
        *v *= scale;
    }
    let bar: Vec<f32> = sqrt_bar.iter().map(|v| v * v).collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    for i in 1..bar.len() {
        out.push(1.0 - bar[i] / bar[i - 1]);
    }
    out
}

/// numpy.linspace(start, stop, n) in float64 (endpoint included; `i * step + start`, last value exact).
pub fn numpy_linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    match n {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (stop - start) / (n - 1) as f64;
            let mut v: Vec<f64> = (0..n).map(|i| i as f64 * step + start).collect();
            v[n - 1] = stop;
            v
        }
    }
}

/// numpy.arange(start, stop, step) in float64 (numpy fills `start + i * (x1 - start)` with `x1 = start + step`).
pub fn numpy_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let mut out = Vec::with_capacity(len);
    out.push(start);
    if len > 1 {
        let second = start + step;
        let delta = second - start;
        out.push(second);
        for i in 2..len {
            out.push(start + i as f64 * delta);
        }
    }
    out
}

/// Integer timesteps for "leading" spacing, largest first: `round(i * (T // n)) + steps_offset`.
pub fn leading_timesteps(num_train: usize, steps: usize, steps_offset: i64) -> Vec<i64> {
    let ratio = (num_train / steps) as f64;
    (0..steps)
        .rev()
        .map(|i| (i as f64 * ratio).round_ties_even() as i64 + steps_offset)
        .collect()
}

/// Integer timesteps for "trailing" spacing, largest first: `round(arange(T, 0, -T / n)) - 1`.
pub fn trailing_timesteps(num_train: usize, steps: usize) -> Vec<i64> {
    let ratio = num_train as f64 / steps as f64;
    numpy_arange(num_train as f64, 0.0, -ratio)
        .into_iter()
        .map(|t| t.round_ties_even() as i64 - 1)
        .collect()
}

/// Timesteps for "linspace" spacing before any rounding, largest first: `linspace(0, T - 1, n)` reversed.
pub fn linspace_timesteps(num_train: usize, steps: usize) -> Vec<f64> {
    let mut v = numpy_linspace(0.0, (num_train - 1) as f64, steps);
    v.reverse();
    v
}

/// The integer timestep grid of DDIM and DDPM for `spacing` (linspace rounded half to even), largest first;
/// `steps` must be 1 to `num_train`.
pub fn integer_timesteps(
    class: &str,
    spacing: TimestepSpacing,
    num_train: usize,
    steps: usize,
    steps_offset: i64,
) -> Result<Vec<f64>> {
    if steps == 0 || steps > num_train {
        return Err(EngineError::invalid(
            "num_inference_steps",
            format!("{class} can run 1 to {num_train} steps (num_train_timesteps), not {steps}"),
        ));
    }
    Ok(match spacing {
        TimestepSpacing::Linspace => linspace_timesteps(num_train, steps)
            .into_iter()
            .map(f64::round_ties_even)
            .collect(),
        TimestepSpacing::Leading => leading_timesteps(num_train, steps, steps_offset)
            .into_iter()
            .map(|t| t as f64)
            .collect(),
        TimestepSpacing::Trailing => trailing_timesteps(num_train, steps)
            .into_iter()
            .map(|t| t as f64)
            .collect(),
    })
}

/// numpy.interp(x, arange(len(fp)), fp) for one x (fp in float64).
pub fn interp(x: f64, fp: &[f64]) -> f64 {
    let n = fp.len();
    if n == 0 || x.is_nan() {
        return f64::NAN;
    }
    if x <= 0.0 {
        return fp[0];
    }
    let last = (n - 1) as f64;
    if x >= last {
        return fp[n - 1];
    }
    let j = x.floor() as usize;
    let xj = j as f64;
    if x == xj {
        return fp[j];
    }
    let slope = (fp[j + 1] - fp[j]) / ((j + 1) as f64 - xj);
    let v = slope * (x - xj) + fp[j];
    if v.is_nan() {
        slope * (x - (j + 1) as f64) + fp[j + 1]
    } else {
        v
    }
}

/// diffusers' `_sigma_to_t`: the fractional training timestep whose log-sigma interpolates `sigma`, given
/// the float32 log-sigmas of the training schedule (increasing).
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // cumsum(dists >= 0).argmax(): the first index where the count of log_sigmas <= log_sigma is reached.
    let mut count = 0usize;
    let mut best = 0usize;
    let mut best_count = 0usize;
    for (i, &ls) in log_sigmas.iter().enumerate() {
        if log_sigma - ls as f64 >= 0.0 {
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
    let w = ((low as f64 - log_sigma) / (low - high) as f64).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// The Karras et al. (2022) sigma ramp with rho = 7, from `sigma_max` down to `sigma_min`, `n` values.
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0f64;
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    numpy_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (max_inv_rho + r * (min_inv_rho - max_inv_rho)).powf(rho))
        .collect()
}

/// Sigmas evenly spaced in log space from `sigma_max` down to `sigma_min`, `n` values.
pub fn exponential_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    numpy_linspace(sigma_max.ln(), sigma_min.ln(), n)
        .into_iter()
        .map(f64::exp)
        .collect()
}

/// The float32 natural log of each value, as `np.log` of a float32 array gives (up to its last bit).
pub fn log_f32(values: &[f32]) -> Vec<f32> {
    values.iter().map(|&v| (v as f64).ln() as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arange_and_linspace_follow_numpy() {
        assert_eq!(
            numpy_arange(1000.0, 0.0, -250.0),
            vec![1000.0, 750.0, 500.0, 250.0]
        );
        assert_eq!(numpy_linspace(0.0, 999.0, 1), vec![0.0]);
        assert_eq!(
            numpy_linspace(0.0, 999.0, 4),
            vec![0.0, 333.0, 666.0, 999.0]
        );
        assert_eq!(trailing_timesteps(1000, 4), vec![999, 749, 499, 249]);
        assert_eq!(leading_timesteps(1000, 4, 1), vec![751, 501, 251, 1]);
    }

    #[test]
    fn interp_matches_numpy_at_edges() {
        let fp = [1.0, 2.0, 4.0];
        assert_eq!(interp(-1.0, &fp), 1.0);
        assert_eq!(interp(0.5, &fp), 1.5);
        assert_eq!(interp(1.0, &fp), 2.0);
        assert_eq!(interp(1.25, &fp), 2.5);
        assert_eq!(interp(2.0, &fp), 4.0);
        assert_eq!(interp(7.0, &fp), 4.0);
    }
}
