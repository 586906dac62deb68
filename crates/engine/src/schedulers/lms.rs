//! Linear multistep (k-diffusion `sample_lms`, order 4): each step integrates the Lagrange polynomial through
//! the last derivatives over the next sigma interval.
//!
//! Quirks kept from diffusers' `LMSDiscreteScheduler`:
//! - The coefficients are integrated numerically, as diffusers does with `scipy.integrate.quad` (QUADPACK
//!   QAGS, `epsrel=1e-4`): a 21-point Gauss–Kronrod rule over the interval, which is exact for these cubic
//!   polynomials. The integrand is evaluated in float32, because diffusers builds it from float32 tensor
//!   scalars; the same rounding is reproduced here so the coefficients agree to the last bits.
//! - The order used at a step is `min(step_index + 1, 4)`, counted from the start of the schedule, while the
//!   derivative history starts at the first step actually run. An img2img run that starts part-way therefore
//!   takes its first steps with the coefficient(s) of a higher-order polynomial but only the derivatives it
//!   has (Python's `zip` truncates), which is not a consistent integrator. Kept for parity.
//! - Karras sigmas ignore `sigma_min`/`sigma_max` (unlike Heun/KDPM2); timesteps, `init_noise_sigma` and
//!   `add_noise` behave as in [`super::euler`].

use candle_core::Tensor;
use serde_json::Value;

use super::config::{BetaConfig, PredictionType, ALL_PREDICTION_TYPES};
use super::euler::{add_noise_at_cursor, init_noise_sigma, predict_x0, scale_at_cursor};
use super::k_common::{k_schedule, KConfig};
use super::{ops, Scheduler, SchedulerOptions, StepCursor};
use crate::error::Result;
use crate::rng::TorchGenerator;

const CLASS: &str = "LMSDiscreteScheduler";

/// The order diffusers' pipelines use (`step(..., order=4)` by default).
pub const LMS_ORDER: usize = 4;

/// The constructor arguments of diffusers' `LMSDiscreteScheduler`.
#[derive(Debug, Clone, PartialEq)]
pub struct LmsConfig {
    /// The shared k-diffusion keys (beta defaults 0.0001..0.02 linear).
    pub k: KConfig,
}

impl LmsConfig {
    /// Reads a scheduler config with diffusers' `from_config` semantics (`opts.use_karras_sigmas` as in Euler).
    pub fn from_config(config: &Value, opts: &SchedulerOptions) -> Result<Self> {
        Ok(LmsConfig {
            k: KConfig::from_config(
                CLASS,
                config,
                opts,
                &BetaConfig::DIFFUSERS_DEFAULT,
                ALL_PREDICTION_TYPES,
            )?,
        })
    }
}

/// diffusers' `LMSDiscreteScheduler` after `set_timesteps`.
#[derive(Debug, Clone)]
pub struct LmsDiscreteScheduler {
    prediction_type: PredictionType,
    sigmas32: Vec<f32>,
    sigmas: Vec<f64>,
    timesteps: Vec<f64>,
    init_noise_sigma: f64,
    cursor: StepCursor,
    derivatives: Vec<Tensor>,
    order: usize,
}

impl LmsDiscreteScheduler {
    /// The scheduler for `config`, set up for `steps` inference steps.
    pub fn new(config: &LmsConfig, steps: usize) -> Result<Self> {
        let ks = k_schedule(&config.k, steps, false)?;
        let mut sigmas32: Vec<f32> = ks.sigmas.iter().map(|&s| s as f32).collect();
        sigmas32.push(0.0);
        Ok(LmsDiscreteScheduler {
            prediction_type: config.k.prediction_type,
            sigmas: sigmas32.iter().map(|&s| s as f64).collect(),
            init_noise_sigma: init_noise_sigma(&sigmas32, config.k.timestep_spacing),
            sigmas32,
            timesteps: ks.timesteps.iter().map(|&t| t as f32 as f64).collect(),
            cursor: StepCursor::default(),
            derivatives: Vec::new(),
            order: LMS_ORDER,
        })
    }

    /// diffusers' `get_lms_coefficient(order, t, current_order)`.
    pub fn lms_coefficient(&self, order: usize, t: usize, current: usize) -> f64 {
        lms_coefficient(&self.sigmas32, order, t, current)
    }
}

/// The integral over `[sigmas[t], sigmas[t + 1]]` of the Lagrange basis polynomial of node `t - current` over
/// the nodes `sigmas[t - k]`, `k < order`, evaluated in float32 as diffusers' integrand is.
pub fn lms_coefficient(sigmas: &[f32], order: usize, t: usize, current: usize) -> f64 {
    let integrand = |tau: f64| -> f64 {
        let tau32 = tau as f32;
        let mut prod: Option<f32> = None;
        for k in 0..order {
            if k == current {
                continue;
            }
            let q = (tau32 - sigmas[t - k]) / (sigmas[t - current] - sigmas[t - k]);
            prod = Some(match prod {
                None => q,
                Some(p) => p * q,
            });
        }
        prod.map_or(1.0, |p| p as f64)
    };
    quad(
        &integrand,
        sigmas[t] as f64,
        sigmas[t + 1] as f64,
        1.49e-8,
        1e-4,
    )
}

/// QUADPACK's 21-point Gauss–Kronrod rule (`qk21`): the Kronrod estimate, its error estimate and the
/// integral of |f| (`result, abserr, resabs`).
fn qk21(f: &dyn Fn(f64) -> f64, a: f64, b: f64) -> (f64, f64, f64) {
    const XGK: [f64; 11] = [
        0.995_657_163_025_808_1,
        0.973_906_528_517_171_7,
        0.930_157_491_355_708_2,
        0.865_063_366_688_984_5,
        0.780_817_726_586_416_9,
        0.679_409_568_299_024_4,
        0.562_757_134_668_604_7,
        0.433_395_394_129_247_2,
        0.294_392_862_701_460_2,
        0.148_874_338_981_631_22,
        0.000000000000000000000000000000000,
    ];
    const WGK: [f64; 11] = [
        0.011_694_638_867_371_874,
        0.032_558_162_307_964_725,
        0.054_755_896_574_351_995,
        0.075_039_674_810_919_96,
        0.093_125_454_583_697_6,
        0.109_387_158_802_297_64,
        0.123_491_976_262_065_84,
        0.134_709_217_311_473_34,
        0.142_775_938_577_060_09,
        0.147_739_104_901_338_49,
        0.149_445_554_002_916_9,
    ];
    const WG: [f64; 5] = [
        0.066_671_344_308_688_14,
        0.149_451_349_150_580_6,
        0.219_086_362_515_982_04,
        0.269_266_719_309_996_35,
        0.295_524_224_714_752_87,
    ];
    let epmach = f64::EPSILON;
    let uflow = f64::MIN_POSITIVE;
    let centr = 0.5 * (a + b);
    let hlgth = 0.5 * (b - a);
    let dhlgth = hlgth.abs();
    let mut resg = 0.0;
    let fc = f(centr);
    let mut resk = WGK[10] * fc;
    let mut resabs = resk.abs();
    let mut fv1 = [0.0f64; 10];
    let mut fv2 = [0.0f64; 10];
    #[allow(clippy::needless_range_loop)] // parallel arrays indexed by the same k
    for j in 0..5 {
        let jtw = 2 * j + 1;
        let absc = hlgth * XGK[jtw];
        let (f1, f2) = (f(centr - absc), f(centr + absc));
        fv1[jtw] = f1;
        fv2[jtw] = f2;
        let fsum = f1 + f2;
        resg += WG[j] * fsum;
        resk += WGK[jtw] * fsum;
        resabs += WGK[jtw] * (f1.abs() + f2.abs());
    }
    for j in 0..5 {
        let jtwm1 = 2 * j;
        let absc = hlgth * XGK[jtwm1];
        let (f1, f2) = (f(centr - absc), f(centr + absc));
        fv1[jtwm1] = f1;
        fv2[jtwm1] = f2;
        let fsum = f1 + f2;
        resk += WGK[jtwm1] * fsum;
        resabs += WGK[jtwm1] * (f1.abs() + f2.abs());
    }
    let reskh = resk * 0.5;
    let mut resasc = WGK[10] * (fc - reskh).abs();
    for j in 0..10 {
        resasc += WGK[j] * ((fv1[j] - reskh).abs() + (fv2[j] - reskh).abs());
    }
    let result = resk * hlgth;
    resabs *= dhlgth;
    resasc *= dhlgth;
    let mut abserr = ((resk - resg) * hlgth).abs();
    if resasc != 0.0 && abserr != 0.0 {
        abserr = resasc * (200.0 * abserr / resasc).powf(1.5).min(1.0);
    }
    if resabs > uflow / (50.0 * epmach) {
        abserr = abserr.max(epmach * 50.0 * resabs);
    }
    (result, abserr, resabs)
}

/// `scipy.integrate.quad` for the smooth integrands used here: QAGS' first 21-point rule and its acceptance
/// test; when that fails, plain adaptive bisection (QAGS would also extrapolate, which the low-degree
/// polynomials of LMS never need).
fn quad(f: &dyn Fn(f64) -> f64, a: f64, b: f64, epsabs: f64, epsrel: f64) -> f64 {
    let epmach = f64::EPSILON;
    let (result, abserr, defabs) = qk21(f, a, b);
    let errbnd = epsabs.max(epsrel * result.abs());
    let roundoff = abserr <= 100.0 * epmach * defabs && abserr > errbnd;
    if roundoff || (abserr <= errbnd && abserr != defabs) || abserr == 0.0 {
        return result;
    }
    // Bisect the interval with the largest error until the total error is small enough.
    let mut parts = vec![(a, b, result, abserr)];
    for _ in 0..50 {
        let total: f64 = parts.iter().map(|p| p.2).sum();
        let err: f64 = parts.iter().map(|p| p.3).sum();
        if err <= epsabs.max(epsrel * total.abs()) {
            return total;
        }
        let (i, _) = parts
            .iter()
            .enumerate()
            .max_by(|x, y| x.1 .3.total_cmp(&y.1 .3))
            .unwrap();
        let (lo, hi, _, _) = parts.swap_remove(i);
        let mid = 0.5 * (lo + hi);
        let (r1, e1, _) = qk21(f, lo, mid);
        let (r2, e2, _) = qk21(f, mid, hi);
        parts.push((lo, mid, r1, e1));
        parts.push((mid, hi, r2, e2));
    }
    parts.iter().map(|p| p.2).sum()
}

impl Scheduler for LmsDiscreteScheduler {
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
        let x0 = predict_x0(self.prediction_type, &x, &out, sigma)?;
        let derivative = ops::div(&(&x - x0)?, sigma)?;
        self.derivatives.push(derivative);
        if self.derivatives.len() > self.order {
            self.derivatives.remove(0);
        }
        let order = (i + 1).min(self.order);
        let coeffs: Vec<f64> = (0..order)
            .map(|c| lms_coefficient(&self.sigmas32, order, i, c))
            .collect();
        // Python's sum(): 0 + first term, then each further term; zip stops at the shorter list.
        let mut acc: Option<Tensor> = None;
        for (coeff, d) in coeffs.iter().zip(self.derivatives.iter().rev()) {
            let term = ops::mul(d, *coeff as f32)?;
            acc = Some(match acc {
                None => term,
                Some(a) => (a + term)?,
            });
        }
        let prev = match acc {
            Some(a) => (&x + a)?,
            None => x,
        };
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
