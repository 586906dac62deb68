//! The generation pipelines over a loaded model: text-to-image (diffusers' StableDiffusionPipeline), img2img
//! (StableDiffusionImg2ImgPipeline) and InstructPix2Pix (StableDiffusionInstructPix2PixPipeline), and their
//! SDXL forms, step for step and draw for draw, through one loop ([`StableDiffusion::generate`]).

mod generate;
mod prompt;
mod prompt_chunks;
mod prompt_limits;

pub use prompt_limits::{check_prompt_size, MAX_PROMPT_BYTES, MAX_PROMPT_WINDOWS};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use serde::Serialize;

use crate::config::VaeConfig;
use crate::embeddings::TextualInversion;
use crate::error::{EngineError, Result};
use crate::lora::{self, Lora, LoraTarget};
use crate::models::{AutoencoderKl, ClipTextModel, TokenMerging, TomeSettings, UNet, UNetOptions};
use crate::schedulers::{self, Scheduler, SchedulerOptions};
use crate::tokenizer::ClipTokenizer;
use crate::weights::NamedWeights;

/// Largest width or height the engine accepts.
pub const MAX_SIDE: u32 = 1024;
/// Most images one request may ask for.
pub const MAX_SAMPLES: usize = 4;

/// What a UNet's input channels make a model good for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// 4 input channels: text-to-image and img2img.
    Img2Img,
    /// 8 input channels: InstructPix2Pix.
    Pix2Pix,
}

/// One text encoder with its tokenizer.
#[derive(Clone)]
pub(crate) struct TextTower {
    pub(crate) tokenizer: ClipTokenizer,
    pub(crate) encoder: Arc<ClipTextModel>,
}

/// What makes a model SDXL: how its conditioning is built beyond the text encoders' hidden states.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SdxlSettings {
    /// A missing negative prompt gives zero unconditional embeddings (the base: true; the refiner: false).
    pub force_zeros_for_empty_prompt: bool,
    /// The refiner's micro-conditioning: (original size, crop, aesthetic score) instead of (original size,
    /// crop, target size).
    pub requires_aesthetics_score: bool,
}

/// The aesthetic score of the prompt's half of the refiner's time ids (diffusers' default).
pub const AESTHETIC_SCORE: f64 = 6.0;
/// The aesthetic score of the negative half (diffusers' default).
pub const NEGATIVE_AESTHETIC_SCORE: f64 = 2.5;

/// A loaded Stable Diffusion model: tokenizer(s), text encoder(s), UNet, VAE and its scheduler config.
///
/// The networks are shared (reference counted): a variant with LoRAs merged in ([`Self::with_loras`]) or
/// another VAE ([`Self::with_vae`]) shares every part it does not change with the model it came from, and
/// never changes that model.
#[derive(Clone)]
pub struct StableDiffusion {
    /// The model id (folder or file name) it was loaded as.
    pub id: String,
    /// The text encoders in the order their hidden states are concatenated: SD 1/2 one (CLIP-L or
    /// OpenCLIP-H), an SDXL base two (CLIP-L, OpenCLIP-bigG with projection), an SDXL refiner the second
    /// alone.
    pub(crate) towers: Vec<TextTower>,
    /// Present for SDXL models.
    pub(crate) sdxl: Option<SdxlSettings>,
    pub(crate) unet: Arc<UNet>,
    pub(crate) vae: Arc<AutoencoderKl>,
    pub(crate) scheduler_config: serde_json::Value,
    pub(crate) device: Device,
    pub(crate) dtype: DType,
    /// The unpatched networks' tensors, to merge LoRAs from (absent: LoRAs cannot be used).
    base_weights: Option<Arc<BaseWeights>>,
    /// Bytes of weights this model holds that the model it was derived from does not (0 for a loaded model).
    extra_bytes: u64,
}

/// The tensors the UNet and text encoders were built from (one per tower, in tower order).
struct BaseWeights {
    unet: NamedWeights,
    text_encoders: Vec<NamedWeights>,
}

impl StableDiffusion {
    /// Assembles an SD 1/2 model from its loaded parts (used by the model loader).
    #[allow(clippy::too_many_arguments)]
    pub fn from_parts(
        id: String,
        tokenizer: ClipTokenizer,
        text_encoder: ClipTextModel,
        unet: UNet,
        vae: AutoencoderKl,
        scheduler_config: serde_json::Value,
        device: Device,
        dtype: DType,
    ) -> Self {
        Self::assemble(
            id,
            vec![(tokenizer, text_encoder)],
            None,
            (unet, vae),
            scheduler_config,
            device,
            dtype,
        )
    }

    /// Assembles an SDXL model: its text encoders with their tokenizers in concatenation order (the last
    /// one with its projection), UNet, VAE, scheduler config and conditioning settings.
    #[allow(clippy::too_many_arguments)]
    pub fn sdxl_from_parts(
        id: String,
        encoders: Vec<(ClipTokenizer, ClipTextModel)>,
        unet: UNet,
        vae: AutoencoderKl,
        scheduler_config: serde_json::Value,
        settings: SdxlSettings,
        device: Device,
        dtype: DType,
    ) -> Self {
        Self::assemble(
            id,
            encoders,
            Some(settings),
            (unet, vae),
            scheduler_config,
            device,
            dtype,
        )
    }

    /// What both constructors share.
    fn assemble(
        id: String,
        encoders: Vec<(ClipTokenizer, ClipTextModel)>,
        sdxl: Option<SdxlSettings>,
        (unet, vae): (UNet, AutoencoderKl),
        scheduler_config: serde_json::Value,
        device: Device,
        dtype: DType,
    ) -> Self {
        StableDiffusion {
            id,
            towers: encoders
                .into_iter()
                .map(|(tokenizer, encoder)| TextTower {
                    tokenizer,
                    encoder: Arc::new(encoder),
                })
                .collect(),
            sdxl,
            unet: Arc::new(unet),
            vae: Arc::new(vae),
            scheduler_config,
            device,
            dtype,
            base_weights: None,
            extra_bytes: 0,
        }
    }

    /// The SDXL conditioning settings, for an SDXL model.
    pub fn sdxl(&self) -> Option<SdxlSettings> {
        self.sdxl
    }

    /// The first text encoder (the only one of SD 1/2 models).
    pub(crate) fn text_encoder(&self) -> &Arc<ClipTextModel> {
        &self.towers[0].encoder
    }

    /// The dtype of the UNet's activations: float16 on a GPU, float32 on the CPU (also in bf16 mode, whose
    /// bf16 products happen inside the kernels).
    pub fn unet_dtype(&self) -> DType {
        self.unet.dtype()
    }

    /// Bytes of merged weights this variant added to the model it was made from ([`Self::with_loras`]; a
    /// swapped VAE is not counted); 0 for a model loaded from disk.
    pub fn extra_bytes(&self) -> u64 {
        self.extra_bytes
    }

    /// Keeps the tensors the UNet and text encoders (in tower order) were built from (see
    /// [`crate::weights::Recorder`]), which [`Self::with_loras`] needs.
    pub fn with_base_weights(
        mut self,
        unet: NamedWeights,
        text_encoders: Vec<NamedWeights>,
    ) -> Self {
        self.base_weights = Some(Arc::new(BaseWeights {
            unet,
            text_encoders,
        }));
        self
    }

    /// Which LoRA target each text tower is: SD 1/2's one encoder and SDXL's CLIP-L are `TextEncoder`,
    /// SDXL's ViT-bigG (a refiner's only one) is `TextEncoder2`.
    fn tower_targets(&self) -> Vec<LoraTarget> {
        match (self.sdxl, self.towers.len()) {
            (Some(_), 1) => vec![LoraTarget::TextEncoder2],
            (Some(_), _) => vec![LoraTarget::TextEncoder, LoraTarget::TextEncoder2],
            (None, _) => vec![LoraTarget::TextEncoder],
        }
    }

    /// This model with `loras` (each with its strength) merged into its UNet and text encoder: a new model
    /// sharing the VAE, the tokenizer and every unchanged tensor with this one, which stays as it was.
    pub fn with_loras(&self, loras: &[(&Lora, f64)]) -> Result<StableDiffusion> {
        if loras.is_empty() {
            return Ok(self.clone());
        }
        let targets = self.tower_targets();
        for (lora, _) in loras {
            for (target, what) in [
                (LoraTarget::TextEncoder, "first (CLIP-L) text encoder"),
                (LoraTarget::TextEncoder2, "second text encoder"),
            ] {
                if lora.patches(target) && !targets.contains(&target) {
                    let this = if self.sdxl.is_some() {
                        "an SDXL refiner, which has only the second"
                    } else {
                        "Stable Diffusion 1.x/2.x, with one text encoder (is it an SDXL LoRA?)"
                    };
                    return Err(EngineError::invalid(
                        "lora_model",
                        format!(
                            "LoRA {} has layers for a {what}; model {} is {this}",
                            lora.name, self.id
                        ),
                    ));
                }
            }
        }
        let base = self.base_weights.as_ref().ok_or_else(|| {
            EngineError::invalid(
                "lora_model",
                format!(
                    "model {} was loaded without its named weights; LoRAs cannot be merged",
                    self.id
                ),
            )
        })?;
        let unet_patch = lora::merged_weights(
            &base.unet,
            LoraTarget::Unet,
            loras,
            Some(self.unet.config()),
        )?;
        let text_patches = targets
            .iter()
            .zip(&base.text_encoders)
            .map(|(&target, weights)| lora::merged_weights(weights, target, loras, None))
            .collect::<Result<Vec<_>>>()?;
        let mut model = self.clone();
        model.extra_bytes += unet_patch
            .values()
            .chain(text_patches.iter().flat_map(|p| p.values()))
            .map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
            .sum::<u64>();
        if !unet_patch.is_empty() {
            let vb = base
                .unet
                .var_builder_with(unet_patch, self.unet.dtype(), &self.device);
            model.unet = Arc::new(UNet::new(self.unet.config(), vb)?);
        }
        for (k, (patch, weights)) in text_patches
            .into_iter()
            .zip(&base.text_encoders)
            .enumerate()
        {
            if patch.is_empty() {
                continue;
            }
            let encoder = &self.towers[k].encoder;
            let vb = weights.var_builder_with(patch, encoder.dtype(), &self.device);
            model.towers[k].encoder = Arc::new(ClipTextModel::new(encoder.config(), vb)?);
        }
        // The variant's own tensors are not a base for further merges: LoRA sets are merged from the
        // original model, never stacked.
        model.base_weights = None;
        Ok(model)
    }

    /// This model with another VAE (the rest shared). The VAE must use the same latent channels.
    pub fn with_vae(&self, vae: AutoencoderKl) -> Result<StableDiffusion> {
        let ours = self.vae.config();
        let theirs = vae.config();
        if ours.latent_channels != theirs.latent_channels {
            return Err(EngineError::invalid(
                "vae",
                format!(
                    "this VAE has {} latent channels; model {} works with {}",
                    theirs.latent_channels, self.id, ours.latent_channels
                ),
            ));
        }
        let mut model = self.clone();
        model.vae = Arc::new(vae);
        Ok(model)
    }

    /// img2img or InstructPix2Pix, from the UNet's input channels.
    pub fn kind(&self) -> ModelKind {
        if self.unet.config().in_channels == 8 {
            ModelKind::Pix2Pix
        } else {
            ModelKind::Img2Img
        }
    }

    /// The scheduler class named in the model's own scheduler config (the default sampler).
    pub fn default_scheduler(&self) -> String {
        self.scheduler_config
            .get("_class_name")
            .and_then(|v| v.as_str())
            .unwrap_or("PNDMScheduler")
            .to_string()
    }

    /// The dtype the VAE runs in: the model's, except an SDXL VAE upcast to float32 in a float16 model.
    pub fn vae_dtype(&self) -> DType {
        self.vae.dtype()
    }

    /// The VAE's config (scale factor, scaling factor).
    pub fn vae_config(&self) -> &VaeConfig {
        self.vae.config()
    }

    /// The largest clip skip this model's text encoders allow.
    pub fn max_clip_skip(&self) -> usize {
        self.towers
            .iter()
            .map(|t| match self.sdxl {
                Some(_) => t.encoder.max_sdxl_clip_skip(),
                None => t.encoder.max_clip_skip(),
            })
            .min()
            .unwrap_or(1)
    }

    pub(crate) fn build_scheduler(
        &self,
        config: &serde_json::Value,
        name: Option<&str>,
        steps: usize,
        opts: &SchedulerOptions,
    ) -> Result<Box<dyn Scheduler>> {
        let name = match name {
            Some(n) => n.to_string(),
            None => self.default_scheduler(),
        };
        schedulers::build(&name, config, steps, opts)
    }

    /// The scheduler config as diffusers' pipeline for `mode` rewrites it when it is constructed: the SD
    /// text-to-image and img2img pipelines turn a `steps_offset` other than 1 into 1, and `clip_sample` that is
    /// on (explicitly, or by the class default of DDIM/DDPM) off. InstructPix2Pix and SDXL (whose pipelines do
    /// not rewrite it) keep the config as it is.
    pub(crate) fn scheduler_config_for(&self, mode: &Mode) -> serde_json::Value {
        let mut config = self.scheduler_config.clone();
        if self.sdxl.is_some() || matches!(mode, Mode::Pix2Pix { .. }) {
            // diffusers' SDXL pipelines use the scheduler config as it is.
            return config;
        }
        if let Some(map) = config.as_object_mut() {
            let class = map
                .get("_class_name")
                .and_then(|v| v.as_str())
                .unwrap_or("");
            let class_clips = matches!(class, "DDIMScheduler" | "DDPMScheduler");
            let clips = match map.get("clip_sample") {
                Some(serde_json::Value::Bool(b)) => *b,
                Some(serde_json::Value::Null) | None => class_clips,
                Some(_) => false,
            };
            map.insert("steps_offset".into(), 1.into());
            if clips {
                map.insert("clip_sample".into(), false.into());
            }
        }
        config
    }
}

/// Receives progress and may cancel a generation between steps.
pub trait Progress {
    /// Called after each denoising step with the number done and the total.
    fn on_step(&mut self, _done: usize, _total: usize) {}
    /// Polled before each step; returning true stops the generation with [`EngineError::Cancelled`].
    fn cancelled(&self) -> bool {
        false
    }
}

/// A progress sink that ignores everything and never cancels.
pub struct NoProgress;
impl Progress for NoProgress {}

/// A cancellation flag that callers can set from another thread.
#[derive(Default)]
pub struct CancelFlag(pub AtomicBool);

impl CancelFlag {
    /// Asks the running generation to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed)
    }
    /// Whether cancellation was asked for.
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// What a generation starts from, and the values only that mode has.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Text-to-image: the latents start as noise.
    Text2Img,
    /// img2img: the init image's latents, noised to `strength`.
    Img2Img {
        /// The starting image, any size: it is fitted to width × height (cover and centre-crop).
        init_image: RgbImage,
        /// How much of the init image is replaced by noise, 0 to 1 (`floor(steps × strength)` steps run).
        strength: f64,
    },
    /// InstructPix2Pix: the image's latents condition every step.
    Pix2Pix {
        /// The image to edit, fitted to width × height.
        init_image: RgbImage,
        /// How closely to keep the input image.
        image_guidance_scale: f64,
    },
}

impl Mode {
    /// The mode's name as the API and the CLI spell it.
    pub fn name(&self) -> &'static str {
        match self {
            Mode::Text2Img => "txt2img",
            Mode::Img2Img { .. } => "img2img",
            Mode::Pix2Pix { .. } => "pix2pix",
        }
    }
}

/// One generation request in engine terms (the API's field names, already parsed and defaulted), whatever its
/// mode.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// Text-to-image, img2img or InstructPix2Pix, with that mode's own values.
    pub mode: Mode,
    /// What the image should show (InstructPix2Pix: the edit instruction).
    pub prompt: String,
    /// What it should not show; empty for none.
    pub negative_prompt: String,
    /// Output width in pixels, a multiple of 8 up to [`MAX_SIDE`].
    pub width: u32,
    /// Output height in pixels, a multiple of 8 up to [`MAX_SIDE`].
    pub height: u32,
    /// Images to make in one batch, 1 to [`MAX_SAMPLES`].
    pub samples: usize,
    /// Denoising steps of the full schedule.
    pub num_inference_steps: usize,
    /// Classifier-free guidance scale; 1 or less turns guidance off as in diffusers.
    pub guidance_scale: f64,
    /// The seed; `None` picks a random one, reported in the result.
    pub seed: Option<u64>,
    /// Scheduler name as the API spells it; `None` uses the model's own.
    pub scheduler: Option<String>,
    /// Sampler options (Karras sigmas, DPM-Solver algorithm).
    pub scheduler_options: SchedulerOptions,
    /// A1111 clip skip: 1 = last CLIP layer.
    pub clip_skip: usize,
    /// Textual-inversion embeddings the prompts may call up by name.
    pub embeddings: Vec<TextualInversion>,
    /// Token merging (the API's `tomesd`); `None` runs the UNet on every token.
    pub tome: Option<TomeSettings>,
}

/// What a generation made, with what was actually used.
#[derive(Debug, Clone)]
pub struct Generation {
    /// The images, `samples` of them, each width × height.
    pub images: Vec<RgbImage>,
    /// Facts about the run, for the API's `meta`.
    pub meta: GenerationMeta,
}

/// Facts about a finished generation.
#[derive(Debug, Clone, Serialize)]
pub struct GenerationMeta {
    /// The model used.
    pub model_id: String,
    /// The seed used (random when the request had none).
    pub seed: u64,
    /// The scheduler used.
    pub scheduler: String,
    /// Output width.
    #[serde(rename = "W")]
    pub width: u32,
    /// Output height.
    #[serde(rename = "H")]
    pub height: u32,
    /// Denoising steps run (img2img: floor(steps × strength)).
    pub steps_run: usize,
    /// Wall-clock seconds spent generating.
    pub generation_time: f64,
}

/// A fresh random seed in 0…2³²−1, as the API reports them.
pub fn random_seed() -> u64 {
    rand::random::<u32>() as u64
}

pub(crate) fn check_common(
    width: u32,
    height: u32,
    samples: usize,
    steps: usize,
    clip_skip: usize,
    max_clip_skip: usize,
) -> Result<()> {
    crate::image_io::validate_size(width, height, MAX_SIDE)?;
    if samples == 0 || samples > MAX_SAMPLES {
        return Err(EngineError::invalid(
            "samples",
            format!("must be between 1 and {MAX_SAMPLES}, got {samples}"),
        ));
    }
    if steps == 0 {
        return Err(EngineError::invalid(
            "num_inference_steps",
            "must be at least 1",
        ));
    }
    if clip_skip == 0 || clip_skip > max_clip_skip {
        return Err(EngineError::invalid(
            "clip_skip",
            format!("must be between 1 and {max_clip_skip} for this model, got {clip_skip}"),
        ));
    }
    Ok(())
}

/// The UNet options of one generation: token merging seeded with the request's seed.
pub(crate) fn unet_options(tome: Option<&TomeSettings>, seed: u64) -> Result<UNetOptions> {
    let tome = match tome {
        Some(settings) => {
            settings
                .validate()
                .map_err(|msg| EngineError::invalid("tomesd", msg))?;
            Some(TokenMerging::new(*settings, seed))
        }
        None => None,
    };
    Ok(UNetOptions { tome })
}

impl StableDiffusion {
    /// Decodes the final (scaled) latents to images and records what the run used.
    pub(crate) fn finish(
        &self,
        latents: &Tensor,
        seed: u64,
        scheduler: Option<&str>,
        (width, height): (u32, u32),
        steps_run: usize,
        started: std::time::Instant,
    ) -> Result<Generation> {
        let scaled = (latents / self.vae.config().scaling_factor)?.to_dtype(self.vae.dtype())?;
        let decoded = self.vae.decode(&scaled)?.to_dtype(DType::F32)?;
        Ok(Generation {
            images: crate::image_io::tensor_to_images(&decoded)?,
            meta: GenerationMeta {
                model_id: self.id.clone(),
                seed,
                scheduler: scheduler
                    .map(str::to_string)
                    .unwrap_or_else(|| self.default_scheduler()),
                width,
                height,
                steps_run,
                generation_time: started.elapsed().as_secs_f64(),
            },
        })
    }
}
