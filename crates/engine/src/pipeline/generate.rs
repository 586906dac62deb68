//! The one denoising loop behind every mode, step for step and draw for draw as diffusers runs it:
//! text-to-image (`StableDiffusionPipeline` / `StableDiffusionXLPipeline`), img2img
//! (`StableDiffusionImg2ImgPipeline` / `StableDiffusionXLImg2ImgPipeline`) and InstructPix2Pix
//! (`StableDiffusionInstructPix2PixPipeline`). The modes differ only in where the latents start, which
//! guidance branches the batch holds and what is concatenated to the UNet's input.

use std::time::Instant;

use candle_core::Tensor;

use super::prompt::{split_batch, PromptEmbedding};
use super::{
    check_common, random_seed, unet_options, GenerateRequest, Generation, Mode, ModelKind,
    Progress, StableDiffusion,
};
use crate::error::{EngineError, Result};
use crate::image_io::{fit_to_size, image_to_tensor};
use crate::models::AddedConditions;
use crate::rng::TorchGenerator;

/// Where img2img starts in a schedule of `steps` for `strength`: (first step index, steps that run).
pub(crate) fn start_step(steps: usize, strength: f64) -> (usize, usize) {
    let run = ((steps as f64 * strength).floor() as usize).min(steps);
    (steps - run, run)
}

/// Which branches the guidance batch holds, in diffusers' order.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Branches {
    /// No guidance: the prompt alone.
    Prompt,
    /// Classifier-free guidance: [negative, prompt].
    NegativeAndPrompt,
    /// InstructPix2Pix's three-way guidance: [prompt + image, image only, neither].
    PromptImageNeither,
}

impl Branches {
    fn of(req: &GenerateRequest) -> Self {
        match req.mode {
            Mode::Pix2Pix {
                image_guidance_scale,
                ..
            } if req.guidance_scale > 1.0 && image_guidance_scale >= 1.0 => {
                Branches::PromptImageNeither
            }
            Mode::Pix2Pix { .. } => Branches::Prompt,
            _ if req.guidance_scale > 1.0 => Branches::NegativeAndPrompt,
            _ => Branches::Prompt,
        }
    }

    fn count(self) -> usize {
        match self {
            Branches::Prompt => 1,
            Branches::NegativeAndPrompt => 2,
            Branches::PromptImageNeither => 3,
        }
    }
}

/// The text conditioning of one generation: the guidance batch's context and SDXL's added conditions, and the
/// prompt's own (for DDIM inversion, which runs unguided).
struct Conditioning {
    context: Tensor,
    added: Option<AddedConditions>,
    prompt_context: Tensor,
    prompt_added: Option<AddedConditions>,
}

impl StableDiffusion {
    /// Checks everything about `req` that does not need the networks: that the model can run its mode, sizes,
    /// counts, scales, strength × steps, clip skip, token merging, the scheduler (name and options) and that
    /// the embeddings fit the text encoders. The init image is not read. A request that passes runs unless its
    /// prompt is wrong.
    pub fn validate(&self, req: &GenerateRequest) -> Result<()> {
        match (&req.mode, self.kind()) {
            (Mode::Pix2Pix { .. }, ModelKind::Img2Img) => {
                return Err(EngineError::invalid(
                    "model_id",
                    format!(
                        "{} is not an InstructPix2Pix model (its UNet takes {} channels, pix2pix needs 8)",
                        self.id,
                        self.unet.config().in_channels
                    ),
                ))
            }
            (Mode::Text2Img | Mode::Img2Img { .. }, ModelKind::Pix2Pix) => {
                return Err(EngineError::invalid(
                    "model_id",
                    format!(
                        "{} is an InstructPix2Pix model; use pix2pix with it",
                        self.id
                    ),
                ))
            }
            (Mode::Text2Img, _) if self.sdxl.is_some_and(|s| s.requires_aesthetics_score) => {
                return Err(EngineError::invalid(
                    "model_id",
                    format!(
                        "{} is an SDXL refiner: it only refines an image (img2img), it cannot start from text",
                        self.id
                    ),
                ))
            }
            _ => {}
        }
        check_common(
            req.width,
            req.height,
            req.samples,
            req.num_inference_steps,
            req.clip_skip,
            self.max_clip_skip(),
        )?;
        if !req.guidance_scale.is_finite() || req.guidance_scale < 0.0 {
            return Err(EngineError::invalid(
                "guidance_scale",
                "must be a non-negative number",
            ));
        }
        match req.mode {
            Mode::Text2Img => {}
            Mode::Img2Img { strength, .. } => {
                if !(0.0..=1.0).contains(&strength) {
                    return Err(EngineError::invalid(
                        "strength",
                        format!("must be between 0 and 1, got {strength}"),
                    ));
                }
                if start_step(req.num_inference_steps, strength).1 == 0 {
                    return Err(EngineError::invalid(
                        "strength",
                        format!(
                            "strength {strength} × num_inference_steps {} leaves no denoising step; raise either",
                            req.num_inference_steps
                        ),
                    ));
                }
            }
            Mode::Pix2Pix {
                image_guidance_scale,
                ..
            } => {
                if !image_guidance_scale.is_finite() || image_guidance_scale < 0.0 {
                    return Err(EngineError::invalid(
                        "image_guidance_scale",
                        "must be a non-negative number",
                    ));
                }
            }
        }
        self.check_embeddings(&req.embeddings)?;
        if let Some(tome) = &req.tome {
            tome.validate()
                .map_err(|msg| EngineError::invalid("tomesd", msg))?;
        }
        self.build_scheduler(
            &self.scheduler_config_for(&req.mode),
            req.scheduler.as_deref(),
            req.num_inference_steps,
            &req.scheduler_options,
        )?;
        Ok(())
    }

    /// Runs one generation in its mode: encode the prompts, start the latents (noise, the noised init image, or
    /// noise beside the image's latents), denoise with guidance, decode.
    pub fn generate(
        &self,
        req: &GenerateRequest,
        progress: &mut dyn Progress,
    ) -> Result<Generation> {
        self.validate(req)?;
        let started = Instant::now();
        let seed = req.seed.unwrap_or_else(random_seed);
        let mut rng = TorchGenerator::new(seed);
        let mut unet_options = unet_options(req.tome.as_ref(), seed)?;
        let samples = req.samples;
        let branches = Branches::of(req);

        super::check_prompt_size(&req.prompt, "prompt")?;
        if branches != Branches::Prompt {
            // Checked here so that a syntax error names the right field.
            super::check_prompt_size(&req.negative_prompt, "negative_prompt")?;
        }
        let cond = self.conditioning(req, branches)?;

        let mut scheduler = self.build_scheduler(
            &self.scheduler_config_for(&req.mode),
            req.scheduler.as_deref(),
            req.num_inference_steps,
            &req.scheduler_options,
        )?;
        let (begin, steps_run) = match req.mode {
            Mode::Img2Img { strength, .. } => {
                let (t_start, run) = start_step(req.num_inference_steps, strength);
                (t_start * scheduler.order(), Some(run))
            }
            _ => (0, None),
        };
        let timesteps: Vec<f64> = scheduler.timesteps().get(begin..).unwrap_or(&[]).to_vec();
        let Some(&first) = timesteps.first() else {
            return Err(EngineError::invalid(
                "strength",
                "no timestep left to run at this strength",
            ));
        };
        if steps_run.is_some() {
            // diffusers' img2img pipelines set it (even to 0); the others leave it to the scheduler.
            scheduler.set_begin_index(begin);
        }

        let vae_scale = self.vae.config().scale_factor();
        let (lh, lw) = (
            req.height as usize / vae_scale,
            req.width as usize / vae_scale,
        );
        let channels = self.vae.config().latent_channels;
        let (mut latents, image_latents) = match &req.mode {
            Mode::Text2Img => {
                let noise =
                    rng.randn_tensor((samples, channels, lh, lw), self.dtype, &self.device)?;
                ((noise * scheduler.init_noise_sigma())?, None)
            }
            Mode::Img2Img { init_image, .. } => {
                let posterior = self.vae.encode(&self.pixels(init_image, req)?)?;
                let init = (posterior.sample(&mut rng)?.to_dtype(self.dtype)?
                    * self.vae.config().scaling_factor)?
                    .repeat((samples, 1, 1, 1))?;
                let noise = rng.randn_tensor(init.shape(), self.dtype, &self.device)?;
                let latents = match scheduler.inversion_timesteps(begin) {
                    None => scheduler.add_noise(&init, &noise, first)?,
                    // DDIMInverseScheduler: invert the init latents up to `first` with the (unguided) prompt
                    // embedding instead of adding the noise (which is still drawn, so later draws keep their
                    // place).
                    Some(inversion) => {
                        let mut x = init;
                        for &t in &inversion {
                            if progress.cancelled() {
                                return Err(EngineError::Cancelled);
                            }
                            let input = scheduler.scale_model_input(&x, t)?;
                            let out = self.unet.forward_with(
                                &input,
                                t,
                                &cond.prompt_context,
                                cond.prompt_added.as_ref(),
                                &mut unet_options,
                            )?;
                            x = scheduler.invert_step(&out, t, &x)?;
                        }
                        x
                    }
                };
                (latents, None)
            }
            Mode::Pix2Pix { init_image, .. } => {
                // The posterior's mode, unscaled: no random draw.
                let image = self
                    .vae
                    .encode(&self.pixels(init_image, req)?)?
                    .mode()
                    .to_dtype(self.dtype)?
                    .repeat((samples, 1, 1, 1))?;
                let image = if branches == Branches::PromptImageNeither {
                    let zeros = image.zeros_like()?;
                    Tensor::cat(&[&image, &image, &zeros], 0)?
                } else {
                    image
                };
                let (_, _, ih, iw) = image.dims4()?;
                let noise =
                    rng.randn_tensor((samples, channels, ih, iw), self.dtype, &self.device)?;
                ((noise * scheduler.init_noise_sigma())?, Some(image))
            }
        };

        let total = timesteps.len();
        let n = branches.count();
        for (i, &t) in timesteps.iter().enumerate() {
            if progress.cancelled() {
                return Err(EngineError::Cancelled);
            }
            let input = if n > 1 {
                Tensor::cat(&vec![&latents; n], 0)?
            } else {
                latents.clone()
            };
            let input = scheduler.scale_model_input(&input, t)?;
            let input = match &image_latents {
                Some(image) => Tensor::cat(&[&input, image], 1)?,
                None => input,
            };
            let out = self.unet.forward_with(
                &input,
                t,
                &cond.context,
                cond.added.as_ref(),
                &mut unet_options,
            )?;
            let noise_pred = match (branches, &req.mode) {
                (Branches::Prompt, _) => out,
                (Branches::NegativeAndPrompt, _) => {
                    let parts = split_batch(&out, 2)?;
                    let (uncond, text) = (&parts[0], &parts[1]);
                    (uncond + ((text - uncond)? * req.guidance_scale)?)?
                }
                (
                    Branches::PromptImageNeither,
                    Mode::Pix2Pix {
                        image_guidance_scale,
                        ..
                    },
                ) => {
                    let parts = split_batch(&out, 3)?;
                    let (text, image, uncond) = (&parts[0], &parts[1], &parts[2]);
                    let text_term = ((text - image)? * req.guidance_scale)?;
                    let image_term = ((image - uncond)? * *image_guidance_scale)?;
                    ((uncond + text_term)? + image_term)?
                }
                (Branches::PromptImageNeither, _) => unreachable!("three branches are pix2pix's"),
            };
            latents = scheduler.step(&noise_pred, t, &latents, &mut rng)?;
            progress.on_step(i + 1, total);
        }

        self.finish(
            &latents,
            seed,
            req.scheduler.as_deref(),
            (req.width, req.height),
            steps_run.unwrap_or(total),
            started,
        )
    }

    /// The init image fitted to the output size, as the VAE's input.
    fn pixels(&self, image: &image::RgbImage, req: &GenerateRequest) -> Result<Tensor> {
        let image = fit_to_size(image, req.width, req.height);
        Ok(image_to_tensor(&image, &self.device)?.to_dtype(self.vae.dtype())?)
    }

    /// Encodes the prompts the branches need and batches them. diffusers applies clip skip to the prompt only;
    /// the negative prompt uses the last layer (SDXL: the penultimate one).
    fn conditioning(&self, req: &GenerateRequest, branches: Branches) -> Result<Conditioning> {
        let samples = req.samples;
        let (positive_ids, negative_ids) = self.time_ids(req.width, req.height);
        // SDXL base: an empty negative prompt is zeros, not the empty prompt's encoding.
        let zero_negative = self
            .sdxl
            .is_some_and(|s| s.force_zeros_for_empty_prompt && req.negative_prompt.is_empty());
        let mut prompts = vec![(req.prompt.as_str(), req.clip_skip)];
        if branches != Branches::Prompt && !zero_negative {
            prompts.push((req.negative_prompt.as_str(), 1));
        }
        let mut encoded = self.encode_prompts(&prompts, &req.embeddings)?;
        let positive = encoded.swap_remove(0);
        let negative: Option<PromptEmbedding> = match branches {
            Branches::Prompt => None,
            _ if zero_negative => Some(positive.zeros_like()?),
            _ => encoded.pop(),
        };
        let prompt_context = self.guidance_batch(&[&positive.context], samples)?;
        let prompt_added = self.added_conditions(&[(&positive, &positive_ids)], samples)?;
        let (context, added) = match (branches, &negative) {
            (Branches::NegativeAndPrompt, Some(negative)) => (
                self.guidance_batch(&[&negative.context, &positive.context], samples)?,
                self.added_conditions(
                    &[(negative, &negative_ids), (&positive, &positive_ids)],
                    samples,
                )?,
            ),
            (Branches::PromptImageNeither, Some(negative)) => (
                self.guidance_batch(
                    &[&positive.context, &negative.context, &negative.context],
                    samples,
                )?,
                self.added_conditions(
                    &[
                        (&positive, &positive_ids),
                        (negative, &negative_ids),
                        (negative, &negative_ids),
                    ],
                    samples,
                )?,
            ),
            _ => (prompt_context.clone(), prompt_added.clone()),
        };
        Ok(Conditioning {
            context,
            added,
            prompt_context,
            prompt_added,
        })
    }
}
