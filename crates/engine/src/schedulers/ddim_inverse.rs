//! DDIM inversion for img2img: instead of adding fresh noise to the init latents, the deterministic DDIM ODE is
//! run backwards (image → noise) from the clean latents up to img2img's start timestep, then ordinary DDIM
//! (eta = 0) denoises from there. Same seed or not, the start point is the init image's own DDIM latent, so at
//! low strength the result stays very close to the init and the run is fully deterministic.
//!
//! diffusers' `DDIMInverseScheduler` is only the backward half (no `add_noise`; its `step` goes up in noise), so
//! no diffusers img2img pipeline can use it; this module pairs its inversion step with `DDIMScheduler`'s
//! denoising step over the same grid:
//! - Config: diffusers' `DDIMInverseScheduler` keys and defaults (`clip_sample` true, `set_alpha_to_one` true,
//!   `steps_offset` 0, `timestep_spacing` "leading" or "trailing"; "linspace" is rejected as diffusers'
//!   `set_timesteps` rejects it).
//! - `timesteps()` is the DDIM denoising grid (largest first), so the pipeline slices it as usual.
//! - [`Scheduler::inversion_timesteps`] returns `timesteps()[begin..]` reversed; for each of them the pipeline
//!   evaluates the model on the current sample and calls [`Scheduler::invert_step`], which is diffusers'
//!   `DDIMInverseScheduler.step`: from the level `t - T // steps` (the clean latents count as
//!   `initial_alpha_cumprod`: 1 with `set_alpha_to_one`, else `alphas_cumprod[0]`) up to `t`, with the model
//!   evaluated at the target timestep t (diffusers' convention).
//! - `step` is `DDIMScheduler.step` (eta 0) with the same config, so inversion and denoising use the same pairs
//!   of noise levels.
//! - Consequence: the inversion is (nearly) a bijection, so with the same model and no guidance the denoising
//!   reconstructs the init at any strength; the prompt changes the image through classifier-free guidance in
//!   the denoising loop (inversion is unguided, with the positive prompt's embedding), more so at higher
//!   strength. The `noise` the pipeline draws is not used (it is still drawn, so the seed's stream is unchanged).
//! - `add_noise` is the DDPM forward process, used only by pipelines that do not run the inversion (pix2pix,
//!   where this then behaves as plain DDIM).

use candle_core::Tensor;
use serde_json::Value;

use super::config::{
    BetaConfig, ConfigReader, PredictionType, TimestepSpacing, ALL_PREDICTION_TYPES,
};
use super::ddim::{add_noise_ddpm, clip_x0, x0_and_eps, DdimConfig, DdimScheduler};
use super::{ops, train_index, Scheduler};
use crate::error::Result;
use crate::rng::TorchGenerator;

const CLASS: &str = "DDIMInverseScheduler";

/// DDIM inversion up to the start timestep, then DDIM denoising.
#[derive(Debug, Clone)]
pub struct DdimInverseScheduler {
    config: DdimConfig,
    ddim: DdimScheduler,
    initial_alpha_cumprod: f32,
    num_inference_steps: usize,
}

impl DdimInverseScheduler {
    /// Reads the config with diffusers' `DDIMInverseScheduler` defaults and sets up `steps` steps.
    pub fn from_config(config: &Value, steps: usize) -> Result<Self> {
        let cfg = ConfigReader::new(CLASS, config)?;
        let timestep_spacing = TimestepSpacing::read(&cfg, TimestepSpacing::Leading)?;
        if timestep_spacing == TimestepSpacing::Linspace {
            return Err(cfg.error(
                "timestep_spacing",
                "is \"linspace\"; DDIMInverseScheduler supports \"leading\" or \"trailing\"",
            ));
        }
        let config = DdimConfig {
            beta: BetaConfig::read(&cfg, &BetaConfig::DIFFUSERS_DEFAULT, true)?,
            clip_sample: cfg.bool("clip_sample", true)?,
            clip_sample_range: cfg.f64("clip_sample_range", 1.0)?,
            set_alpha_to_one: cfg.bool("set_alpha_to_one", true)?,
            steps_offset: cfg.i64("steps_offset", 0)?,
            prediction_type: PredictionType::read(&cfg, ALL_PREDICTION_TYPES)?,
            timestep_spacing,
        };
        let ddim = DdimScheduler::new(&config, steps)?;
        let initial_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            ddim.alphas_cumprod()[0]
        };
        Ok(DdimInverseScheduler {
            config,
            ddim,
            initial_alpha_cumprod,
            num_inference_steps: steps,
        })
    }
}

impl Scheduler for DdimInverseScheduler {
    fn timesteps(&self) -> &[f64] {
        self.ddim.timesteps()
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn set_begin_index(&mut self, _index: usize) {}

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
        self.ddim.step(model_output, timestep, sample, rng)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        add_noise_ddpm(CLASS, self.ddim.alphas_cumprod(), original, noise, timestep)
    }

    fn inversion_timesteps(&self, begin: usize) -> Option<Vec<f64>> {
        let ts = self.ddim.timesteps();
        Some(
            ts.get(begin..)
                .unwrap_or(&[])
                .iter()
                .rev()
                .copied()
                .collect(),
        )
    }

    fn invert_step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
    ) -> Result<Tensor> {
        let ac = self.ddim.alphas_cumprod();
        let train = ac.len();
        let target = train_index(CLASS, timestep, train)?;
        let source =
            (target as i64 - (train / self.num_inference_steps) as i64).min(train as i64 - 1);
        let alpha_t = if source >= 0 {
            ac[source as usize]
        } else {
            self.initial_alpha_cumprod
        };
        let alpha_next = ac[target];
        let beta_t = 1.0 - alpha_t;
        let (sqrt_a, sqrt_b) = (alpha_t.sqrt(), beta_t.sqrt());

        let out = ops::f32(model_output)?;
        let x = ops::f32(sample)?;
        let (x0, eps) = x0_and_eps(self.config.prediction_type, &x, out, sqrt_a, sqrt_b)?;
        let x0 = clip_x0(x0, self.config.clip_sample, self.config.clip_sample_range)?;
        let next =
            (ops::mul(&x0, alpha_next.sqrt())? + ops::mul(&eps, (1.0 - alpha_next).sqrt())?)?;
        Ok(next.to_dtype(model_output.dtype())?)
    }
}
