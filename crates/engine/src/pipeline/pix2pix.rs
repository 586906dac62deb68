//! InstructPix2Pix exactly as diffusers' StableDiffusionInstructPix2PixPipeline runs it.

use std::time::Instant;

use candle_core::Tensor;

use super::prompt::split_batch;
use super::{
    check_common, random_seed, unet_options, Generation, ModelKind, Pix2PixRequest, Progress,
    StableDiffusion,
};
use crate::error::{EngineError, Result};
use crate::image_io::{fit_to_size, image_to_tensor};
use crate::rng::TorchGenerator;

impl StableDiffusion {
    /// Runs InstructPix2Pix: the image's latent mode conditions every step through the UNet's extra input
    /// channels; guidance is three-way (text + image, image only, neither).
    pub fn pix2pix(&self, req: &Pix2PixRequest, progress: &mut dyn Progress) -> Result<Generation> {
        if self.kind() != ModelKind::Pix2Pix {
            return Err(EngineError::invalid(
                "model_id",
                format!(
                    "{} is not an InstructPix2Pix model (its UNet takes {} channels, pix2pix needs 8)",
                    self.id,
                    self.unet.config().in_channels
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
        for (field, value) in [
            ("guidance_scale", req.guidance_scale),
            ("image_guidance_scale", req.image_guidance_scale),
        ] {
            if !value.is_finite() || value < 0.0 {
                return Err(EngineError::invalid(field, "must be a non-negative number"));
            }
        }
        let started = Instant::now();
        let seed = req.seed.unwrap_or_else(random_seed);
        let mut rng = TorchGenerator::new(seed);
        let mut unet_options = unet_options(req.tome.as_ref(), seed)?;
        let samples = req.samples;
        let guided = req.guidance_scale > 1.0 && req.image_guidance_scale >= 1.0;

        super::check_prompt_size(&req.prompt, "prompt")?;
        if guided {
            // Checked here so that a syntax error names the right field.
            super::check_prompt_size(&req.negative_prompt, "negative_prompt")?;
        }
        let context = if guided {
            // diffusers applies clip skip to the prompt only; the negative prompt uses the last layer.
            let encoded = self.encode_prompts(
                &[(&req.prompt, req.clip_skip), (&req.negative_prompt, 1)],
                &req.embeddings,
            )?;
            self.guidance_batch(
                &[
                    &encoded[0].context,
                    &encoded[1].context,
                    &encoded[1].context,
                ],
                samples,
            )?
        } else {
            let encoded = self.encode_prompts(&[(&req.prompt, req.clip_skip)], &req.embeddings)?;
            self.guidance_batch(&[&encoded[0].context], samples)?
        };

        let mut scheduler = self.build_scheduler(
            &self.scheduler_config,
            req.scheduler.as_deref(),
            req.num_inference_steps,
            &req.scheduler_options,
        )?;
        let timesteps = scheduler.timesteps().to_vec();

        let image = fit_to_size(&req.init_image, req.width, req.height);
        let pixels = image_to_tensor(&image, &self.device)?.to_dtype(self.vae.dtype())?;
        let image_latents = self
            .vae
            .encode(&pixels)?
            .mode()
            .to_dtype(self.dtype)?
            .repeat((samples, 1, 1, 1))?;
        let image_latents = if guided {
            let zeros = image_latents.zeros_like()?;
            Tensor::cat(&[&image_latents, &image_latents, &zeros], 0)?
        } else {
            image_latents
        };
        let (_, _, lh, lw) = image_latents.dims4()?;
        let channels = self.vae.config().latent_channels;
        let noise = rng.randn_tensor((samples, channels, lh, lw), self.dtype, &self.device)?;
        let mut latents = (noise * scheduler.init_noise_sigma())?;

        let total = timesteps.len();
        for (i, &t) in timesteps.iter().enumerate() {
            if progress.cancelled() {
                return Err(EngineError::Cancelled);
            }
            let input = if guided {
                Tensor::cat(&[&latents, &latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let input = scheduler.scale_model_input(&input, t)?;
            let input = Tensor::cat(&[&input, &image_latents], 1)?;
            let out = self
                .unet
                .forward_with(&input, t, &context, None, &mut unet_options)?;
            let noise_pred = if guided {
                let parts = split_batch(&out, 3)?;
                let (text, image, uncond) = (&parts[0], &parts[1], &parts[2]);
                let text_term = ((text - image)? * req.guidance_scale)?;
                let image_term = ((image - uncond)? * req.image_guidance_scale)?;
                ((uncond + text_term)? + image_term)?
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
            total,
            started,
        )
    }
}
