//! img2img exactly as diffusers' StableDiffusionImg2ImgPipeline runs it.

use std::time::Instant;

use candle_core::Tensor;

use super::prompt::split_batch;
use super::{
    check_common, random_seed, unet_options, Generation, Img2ImgRequest, ModelKind, Progress,
    StableDiffusion,
};
use crate::error::{EngineError, Result};
use crate::image_io::{fit_to_size, image_to_tensor};
use crate::rng::TorchGenerator;

/// Where img2img starts in a schedule of `steps` for `strength`: (first step index, steps that run).
pub(crate) fn start_step(steps: usize, strength: f64) -> (usize, usize) {
    let run = ((steps as f64 * strength).floor() as usize).min(steps);
    (steps - run, run)
}

impl StableDiffusion {
    /// Runs img2img: encode the init image, noise it to the strength's timestep, denoise with guidance,
    /// decode. Random draws follow diffusers: VAE posterior sample, added noise, then per-step noise.
    pub fn img2img(&self, req: &Img2ImgRequest, progress: &mut dyn Progress) -> Result<Generation> {
        if self.kind() != ModelKind::Img2Img {
            return Err(EngineError::invalid(
                "model_id",
                format!(
                    "{} is an InstructPix2Pix model; use pix2pix with it",
                    self.id
                ),
            ));
        }
        check_common(
            req.width,
            req.height,
            req.samples,
            req.num_inference_steps,
            req.clip_skip,
            self.max_clip_skip(),
        )?;
        if !(0.0..=1.0).contains(&req.strength) {
            return Err(EngineError::invalid(
                "strength",
                format!("must be between 0 and 1, got {}", req.strength),
            ));
        }
        if !req.guidance_scale.is_finite() || req.guidance_scale < 0.0 {
            return Err(EngineError::invalid(
                "guidance_scale",
                "must be a non-negative number",
            ));
        }
        let (t_start, run) = start_step(req.num_inference_steps, req.strength);
        if run == 0 {
            return Err(EngineError::invalid(
                "strength",
                format!(
                    "strength {} × num_inference_steps {} leaves no denoising step; raise either",
                    req.strength, req.num_inference_steps
                ),
            ));
        }
        let started = Instant::now();
        let seed = req.seed.unwrap_or_else(random_seed);
        let mut rng = TorchGenerator::new(seed);
        let mut unet_options = unet_options(req.tome.as_ref(), seed)?;
        let samples = req.samples;
        let guided = req.guidance_scale > 1.0;

        super::check_prompt_size(&req.prompt, "prompt")?;
        if guided {
            // Checked here so that a syntax error names the right field.
            super::check_prompt_size(&req.negative_prompt, "negative_prompt")?;
        }
        // diffusers applies clip skip to the prompt only; the negative prompt uses the last layer (SDXL: the
        // penultimate one).
        let zero_negative = self
            .sdxl
            .is_some_and(|s| s.force_zeros_for_empty_prompt && req.negative_prompt.is_empty());
        let (positive_ids, negative_ids) = self.time_ids(req.width, req.height);
        let (positive, context, added) = if guided {
            let mut prompts = vec![(req.prompt.as_str(), req.clip_skip)];
            if !zero_negative {
                prompts.push((req.negative_prompt.as_str(), 1));
            }
            let mut encoded = self.encode_prompts(&prompts, &req.embeddings)?;
            let negative = match encoded.pop() {
                Some(n) if !zero_negative => n,
                Some(p) => {
                    encoded.push(p);
                    encoded[0].zeros_like()?
                }
                None => unreachable!("one prompt was encoded"),
            };
            let positive = encoded.swap_remove(0);
            let context = self.guidance_batch(&[&negative.context, &positive.context], samples)?;
            let added = self.added_conditions(
                &[(&negative, &negative_ids), (&positive, &positive_ids)],
                samples,
            )?;
            (positive, context, added)
        } else {
            let mut encoded =
                self.encode_prompts(&[(&req.prompt, req.clip_skip)], &req.embeddings)?;
            let positive = encoded.swap_remove(0);
            let context = self.guidance_batch(&[&positive.context], samples)?;
            let added = self.added_conditions(&[(&positive, &positive_ids)], samples)?;
            (positive, context, added)
        };

        let mut scheduler = self.build_scheduler(
            &self.img2img_scheduler_config(),
            req.scheduler.as_deref(),
            req.num_inference_steps,
            &req.scheduler_options,
        )?;
        let begin = t_start * scheduler.order();
        let timesteps: Vec<f64> = scheduler.timesteps().get(begin..).unwrap_or(&[]).to_vec();
        let Some(&first) = timesteps.first() else {
            return Err(EngineError::invalid(
                "strength",
                "no timestep left to run at this strength",
            ));
        };
        scheduler.set_begin_index(begin);

        let image = fit_to_size(&req.init_image, req.width, req.height);
        let pixels = image_to_tensor(&image, &self.device)?.to_dtype(self.vae.dtype())?;
        let posterior = self.vae.encode(&pixels)?;
        let init = (posterior.sample(&mut rng)?.to_dtype(self.dtype)?
            * self.vae.config().scaling_factor)?
            .repeat((samples, 1, 1, 1))?;
        let noise = rng.randn_tensor(init.shape(), self.dtype, &self.device)?;
        let mut latents = match scheduler.inversion_timesteps(begin) {
            None => scheduler.add_noise(&init, &noise, first)?,
            // DDIMInverseScheduler: invert the init latents up to `first` with the (unguided) prompt embedding
            // instead of adding the noise (which is still drawn, so later draws keep their place).
            Some(inversion) => {
                let prompt_context = self.guidance_batch(&[&positive.context], samples)?;
                let prompt_added = self.added_conditions(&[(&positive, &positive_ids)], samples)?;
                let mut x = init.clone();
                for &t in &inversion {
                    if progress.cancelled() {
                        return Err(EngineError::Cancelled);
                    }
                    let input = scheduler.scale_model_input(&x, t)?;
                    let out = self.unet.forward_with(
                        &input,
                        t,
                        &prompt_context,
                        prompt_added.as_ref(),
                        &mut unet_options,
                    )?;
                    x = scheduler.invert_step(&out, t, &x)?;
                }
                x
            }
        };

        let total = timesteps.len();
        for (i, &t) in timesteps.iter().enumerate() {
            if progress.cancelled() {
                return Err(EngineError::Cancelled);
            }
            let input = if guided {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let input = scheduler.scale_model_input(&input, t)?;
            let out =
                self.unet
                    .forward_with(&input, t, &context, added.as_ref(), &mut unet_options)?;
            let noise_pred = if guided {
                let parts = split_batch(&out, 2)?;
                let (uncond, text) = (&parts[0], &parts[1]);
                (uncond + ((text - uncond)? * req.guidance_scale)?)?
            } else {
                out
            };
            latents = scheduler.step(&noise_pred, t, &latents, &mut rng)?;
            progress.on_step(i + 1, total);
        }

        self.finish(
            &latents,
            seed,
            req.scheduler.as_deref(),
            (req.width, req.height),
            run,
            started,
        )
    }
}
