//! Benchmarks of the full-size Stable Diffusion 1.5 networks with random weights: no model files needed,
//! the same arithmetic as the real model (the configs are SD 1.5's), so timings and memory are real.

use std::time::Instant;

use candle_core::{DType, Device, Shape, Tensor, D};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use image::RgbImage;
use serde::Serialize;
use serde_json::json;

use crate::config::{ClipTextConfig, UNetConfig, VaeConfig};
use crate::error::{EngineError, Result};
use crate::models::{
    AddedConditions, AutoencoderKl, ClipTextModel, TokenMerging, TomeSettings, UNet, UNetOptions,
};
use crate::pipeline::{GenerateRequest, Mode, NoProgress, StableDiffusion};
use crate::schedulers::SchedulerOptions;
use crate::tokenizer::ClipTokenizer;

/// SD 1.5's `unet/config.json` (the keys that shape the network).
pub fn sd15_unet_config() -> UNetConfig {
    serde_json::from_value(json!({
        "in_channels": 4, "out_channels": 4,
        "block_out_channels": [320, 640, 1280, 1280],
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 2, "attention_head_dim": 8, "cross_attention_dim": 768,
        "norm_num_groups": 32, "sample_size": 64
    }))
    .expect("SD 1.5 UNet config is valid")
}

/// SD 1.5's `vae/config.json`.
pub fn sd15_vae_config() -> VaeConfig {
    serde_json::from_value(json!({
        "in_channels": 3, "out_channels": 3,
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
        "layers_per_block": 2, "latent_channels": 4, "norm_num_groups": 32,
        "scaling_factor": 0.18215, "sample_size": 512
    }))
    .expect("SD 1.5 VAE config is valid")
}

/// CLIP ViT-L/14's text tower (SD 1.5's text encoder).
pub fn clip_l_config() -> ClipTextConfig {
    serde_json::from_value(json!({
        "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072,
        "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
        "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
        "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1
    }))
    .expect("CLIP-L config is valid")
}

/// stable-diffusion-xl-base-1.0's `unet/config.json` (the keys that shape the network).
pub fn sdxl_unet_config() -> UNetConfig {
    serde_json::from_value(json!({
        "in_channels": 4, "out_channels": 4,
        "block_out_channels": [320, 640, 1280],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "layers_per_block": 2, "attention_head_dim": [5, 10, 20],
        "transformer_layers_per_block": [1, 2, 10], "cross_attention_dim": 2048,
        "use_linear_projection": true, "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
        "norm_num_groups": 32, "sample_size": 128
    }))
    .expect("SDXL UNet config is valid")
}

/// SDXL's `vae/config.json`: SD 1.5's architecture with scaling factor 0.13025.
pub fn sdxl_vae_config() -> VaeConfig {
    VaeConfig {
        scaling_factor: 0.13025,
        ..sd15_vae_config()
    }
}

/// OpenCLIP ViT-bigG/14's text tower with its projection (SDXL's `text_encoder_2`).
pub fn clip_bigg_config() -> ClipTextConfig {
    serde_json::from_value(json!({
        "vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120,
        "num_hidden_layers": 32, "num_attention_heads": 20, "max_position_embeddings": 77,
        "hidden_act": "gelu", "layer_norm_eps": 1e-5, "projection_dim": 1280,
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1
    }))
    .expect("CLIP-bigG config is valid")
}

/// Builds a network over random weights: matrices and kernels N(0, 1/fan-in), embeddings N(0, 0.25),
/// biases zero, norm scales one. Each tensor is made as the network asks for it (see [`RandomWeights`]),
/// so a layer that keeps only a bf16 copy of its weights gets random ones to pack and nothing else
/// holds the f32 values.
fn random_network<T>(
    dtype: DType,
    device: &Device,
    build: impl FnOnce(VarBuilder) -> candle_core::Result<T>,
) -> Result<T> {
    let vb = VarBuilder::from_backend(Box::new(RandomWeights), dtype, device.clone());
    Ok(build(vb)?)
}

/// A candle backend that makes up every tensor asked of it (see [`random_network`]).
struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _hints: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let dims = shape.dims();
        let value = if dims.len() >= 2 {
            let fan_in: usize = dims[1..].iter().product();
            let std = if name.contains("embedding") {
                0.5
            } else {
                1.0 / (fan_in.max(1) as f64).sqrt()
            };
            Tensor::randn(0f32, std as f32, dims, device)?
        } else if name.ends_with("bias") {
            Tensor::zeros(dims, DType::F32, device)?
        } else {
            Tensor::ones(dims, DType::F32, device)?
        };
        value.to_dtype(dtype)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _device: &Device,
    ) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights: {name} has no known shape")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        // Optional tensors a network asks about before building them: CLIP's text projection exists in
        // the configs that give a projection width.
        name == "text_projection.weight"
    }
}

/// Arithmetic precision of a benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchPrecision {
    /// 32-bit floats.
    Fp32,
    /// Convolutions and linear layers multiply in bf16 on AMX ([`crate::kernels::set_bf16_products`]);
    /// weights and activations stay f32 tensors.
    Bf16,
    /// UNet and VAE weights and activations in float16, as a GPU runs them (the text encoder stays f32).
    Fp16,
}

impl BenchPrecision {
    /// The tensor type of the UNet and VAE (f32 for fp32 and bf16, f16 for fp16), after switching the
    /// engine's bf16 products on or off for this process.
    fn dtype(self) -> Result<DType> {
        crate::kernels::set_bf16_products(self == BenchPrecision::Bf16)
            .map_err(|reason| EngineError::invalid("precision", reason))?;
        Ok(match self {
            BenchPrecision::Fp16 => DType::F16,
            BenchPrecision::Fp32 | BenchPrecision::Bf16 => DType::F32,
        })
    }
}

/// Where a benchmark runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BenchDevice {
    /// The CPU.
    #[default]
    Cpu,
    /// CUDA GPU 0 (a `cuda` build; no fallback to the CPU).
    Cuda,
}

impl BenchDevice {
    fn open(self) -> Result<Device> {
        Ok(match self {
            BenchDevice::Cpu => Device::Cpu,
            BenchDevice::Cuda => crate::Runtime::cuda()?.device,
        })
    }
}

/// What to time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BenchComponent {
    /// One UNet call on a batch of latents (batch 2 = one classifier-free-guidance step of one image).
    Unet,
    /// The VAE encoder on a batch of images.
    VaeEncode,
    /// The VAE decoder on a batch of latents.
    VaeDecode,
    /// The CLIP text encoder on a batch of prompts.
    TextEncoder,
    /// A whole img2img request (text, VAE encode, `steps × strength` guided UNet steps, VAE decode).
    Img2img,
}

/// Which architecture's full-size networks to time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BenchArch {
    /// Stable Diffusion 1.5 (CLIP-L, the 4-level UNet).
    #[default]
    Sd15,
    /// SDXL base (CLIP-L + OpenCLIP-bigG, the 3-level UNet with the text_time add embedding).
    Sdxl,
}

/// A benchmark to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Which model's networks.
    pub arch: BenchArch,
    /// What to time.
    pub component: BenchComponent,
    /// Image side in pixels (latents are an eighth of it).
    pub resolution: usize,
    /// Batch size (img2img: images per request).
    pub batch: usize,
    /// Timed runs after one warm-up run.
    pub iterations: usize,
    /// Weight and activation precision.
    pub precision: BenchPrecision,
    /// Token merging (tomesd defaults) in the UNet.
    pub tome: bool,
    /// img2img: denoising steps of the full schedule (strength 0.75 runs three quarters of them).
    pub steps: usize,
    /// Where to run.
    pub device: BenchDevice,
}

/// What a benchmark measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// The architecture timed.
    pub arch: BenchArch,
    /// The component timed.
    pub component: BenchComponent,
    /// Image side in pixels.
    pub resolution: usize,
    /// Batch size.
    pub batch: usize,
    /// `fp32`, `bf16` or `fp16`.
    pub precision: BenchPrecision,
    /// `cpu` or `cuda`.
    pub device: BenchDevice,
    /// Whether token merging was on.
    pub tomesd: bool,
    /// The CPU tier the f32 kernels ran at (`portable`, `avx2`, `avx512`; see `kernels::tier`).
    pub cpu_tier: String,
    /// Seconds of each timed run.
    pub times_s: Vec<f64>,
    /// Median of `times_s`.
    pub median_s: f64,
    /// Peak resident memory of the process (VmHWM), MiB; `None` where /proc is missing.
    pub peak_rss_mib: Option<f64>,
}

/// How close the UNet output with token merging is to the one without (same weights, same inputs).
#[derive(Debug, Clone, Serialize)]
pub struct TomeCloseness {
    /// Image side in pixels.
    pub resolution: usize,
    /// Batch size.
    pub batch: usize,
    /// ‖merged − full‖ / ‖full‖.
    pub relative_l2: f64,
    /// Cosine similarity of the two outputs (flattened).
    pub cosine: f64,
    /// Largest absolute difference.
    pub max_abs_diff: f64,
    /// Seconds of the run without merging.
    pub full_s: f64,
    /// Seconds of the run with merging.
    pub merged_s: f64,
}

/// Peak resident set size of this process in MiB, from /proc/self/status (VmHWM).
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn median(times: &[f64]) -> f64 {
    let mut t = times.to_vec();
    t.sort_by(|a, b| a.total_cmp(b));
    let n = t.len();
    if !n.is_multiple_of(2) {
        t[n / 2]
    } else {
        (t[n / 2 - 1] + t[n / 2]) / 2.0
    }
}

fn check(opts: &BenchOptions) -> Result<()> {
    if opts.resolution == 0 || !opts.resolution.is_multiple_of(8) {
        return Err(EngineError::invalid(
            "resolution",
            "must be a positive multiple of 8",
        ));
    }
    if opts.batch == 0 || opts.iterations == 0 {
        return Err(EngineError::invalid(
            "batch",
            "batch and iterations must be at least 1",
        ));
    }
    Ok(())
}

/// Inputs of one UNet call: latents, a timestep and text embeddings, all random; for SDXL also the pooled
/// embedding (random) and the time ids of a `resolution`² image.
fn unet_inputs(
    arch: BenchArch,
    resolution: usize,
    batch: usize,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor, Option<AddedConditions>)> {
    let side = resolution / 8;
    let latents = Tensor::randn(0f32, 1f32, (batch, 4, side, side), device)?.to_dtype(dtype)?;
    let width = match arch {
        BenchArch::Sd15 => 768,
        BenchArch::Sdxl => 2048,
    };
    let context = Tensor::randn(0f32, 1f32, (batch, 77, width), device)?.to_dtype(dtype)?;
    let added = match arch {
        BenchArch::Sd15 => None,
        BenchArch::Sdxl => {
            let r = resolution as f64;
            Some(AddedConditions {
                text_embeds: Tensor::randn(0f32, 1f32, (batch, 1280), device)?.to_dtype(dtype)?,
                time_ids: vec![vec![r, r, 0.0, 0.0, r, r]; batch],
            })
        }
    };
    Ok((latents, context, added))
}

/// The architecture's UNet over random weights.
fn random_unet(arch: BenchArch, dtype: DType, device: &Device) -> Result<UNet> {
    let config = match arch {
        BenchArch::Sd15 => sd15_unet_config(),
        BenchArch::Sdxl => sdxl_unet_config(),
    };
    random_network(dtype, device, |vb| UNet::new(&config, vb))
}

/// Runs `opts`: one warm-up run, then `iterations` timed runs.
pub fn run_bench(opts: &BenchOptions) -> Result<BenchReport> {
    check(opts)?;
    let device = opts.device.open()?;
    let dtype = opts.precision.dtype()?;
    let (b, res) = (opts.batch, opts.resolution);
    let mut run: Box<dyn FnMut() -> Result<()>> = match opts.component {
        BenchComponent::Unet => {
            let unet = random_unet(opts.arch, dtype, &device)?;
            let (latents, context, added) = unet_inputs(opts.arch, res, b, dtype, &device)?;
            let tome = opts.tome;
            Box::new(move || {
                let mut options = UNetOptions {
                    tome: tome.then(|| TokenMerging::new(TomeSettings::default(), 0)),
                };
                unet.forward_with(&latents, 500.0, &context, added.as_ref(), &mut options)?;
                Ok(())
            })
        }
        BenchComponent::VaeEncode | BenchComponent::VaeDecode => {
            let config = match opts.arch {
                BenchArch::Sd15 => sd15_vae_config(),
                BenchArch::Sdxl => sdxl_vae_config(),
            };
            let vae = random_network(dtype, &device, |vb| AutoencoderKl::new(&config, vb))?;
            let encode = opts.component == BenchComponent::VaeEncode;
            let input = if encode {
                Tensor::randn(0f32, 0.5f32, (b, 3, res, res), &device)?
            } else {
                Tensor::randn(0f32, 1f32, (b, 4, res / 8, res / 8), &device)?
            }
            .to_dtype(dtype)?;
            Box::new(move || {
                if encode {
                    vae.encode(&input)?;
                } else {
                    vae.decode(&input)?;
                }
                Ok(())
            })
        }
        BenchComponent::TextEncoder => {
            let config = clip_l_config();
            let text = random_network(DType::F32, &device, |vb| ClipTextModel::new(&config, vb))?;
            let ids: Vec<u32> = (0..b * 77).map(|i| (i * 7919 % 49408) as u32).collect();
            let ids = Tensor::from_vec(ids, (b, 77), &device)?;
            match opts.arch {
                BenchArch::Sd15 => Box::new(move || {
                    text.forward(&ids, 1)?;
                    Ok(())
                }),
                // SDXL: both encoders, all layers (the bigG's pooled output needs its last one).
                BenchArch::Sdxl => {
                    let config = clip_bigg_config();
                    let bigg =
                        random_network(DType::F32, &device, |vb| ClipTextModel::new(&config, vb))?;
                    Box::new(move || {
                        text.forward_sdxl(&text.embed_tokens(&ids)?, 1, 76)?;
                        bigg.forward_sdxl(&bigg.embed_tokens(&ids)?, 1, 76)?;
                        Ok(())
                    })
                }
            }
        }
        BenchComponent::Img2img => {
            let model = random_model(opts.arch, dtype, &device)?;
            let side = res as u32;
            let init = RgbImage::from_fn(side, side, |x, y| {
                image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x + y) % 256) as u8])
            });
            let request = GenerateRequest {
                prompt: "a photo of a cat".into(),
                negative_prompt: String::new(),
                mode: Mode::Img2Img {
                    init_image: init,
                    strength: 0.75,
                },
                width: side,
                height: side,
                samples: b,
                num_inference_steps: opts.steps,
                guidance_scale: 7.5,
                seed: Some(0),
                scheduler: None,
                scheduler_options: SchedulerOptions::default(),
                clip_skip: 1,
                tome: opts.tome.then(TomeSettings::default),
                embeddings: Vec::new(),
            };
            Box::new(move || {
                model.generate(&request, &mut NoProgress)?;
                Ok(())
            })
        }
    };
    // A GPU runs its queue asynchronously: each run ends when the device has finished it.
    let mut run = move || -> Result<()> {
        run()?;
        device.synchronize()?;
        Ok(())
    };
    run()?;
    let mut times = Vec::with_capacity(opts.iterations);
    for _ in 0..opts.iterations {
        let start = Instant::now();
        run()?;
        times.push(start.elapsed().as_secs_f64());
    }
    Ok(BenchReport {
        arch: opts.arch,
        component: opts.component,
        resolution: res,
        batch: b,
        precision: opts.precision,
        device: opts.device,
        tomesd: opts.tome,
        cpu_tier: crate::kernels::tier::Tier::active().name().to_string(),
        median_s: median(&times),
        times_s: times,
        peak_rss_mib: peak_rss_mib(),
    })
}

/// A whole model with random weights: SD 1.5 (bundled tokenizer, PNDM scheduler as SD 1.5 ships it) or
/// SDXL base (both encoders, Euler as SDXL ships it).
fn random_model(arch: BenchArch, dtype: DType, device: &Device) -> Result<StableDiffusion> {
    let text_config = clip_l_config();
    let text = random_network(DType::F32, device, |vb| {
        ClipTextModel::new(&text_config, vb)
    })?;
    let unet = random_unet(arch, dtype, device)?;
    if arch == BenchArch::Sdxl {
        let vae_config = sdxl_vae_config();
        let vae = random_network(dtype, device, |vb| AutoencoderKl::new(&vae_config, vb))?;
        let bigg_config = clip_bigg_config();
        let bigg = random_network(DType::F32, device, |vb| {
            ClipTextModel::new(&bigg_config, vb)
        })?;
        let scheduler = json!({
            "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "steps_offset": 1,
            "timestep_spacing": "leading", "interpolation_type": "linear", "use_karras_sigmas": false
        });
        return Ok(StableDiffusion::sdxl_from_parts(
            "random-sdxl".into(),
            vec![
                (ClipTokenizer::bundled("<|endoftext|>")?, text),
                (ClipTokenizer::bundled("!")?, bigg),
            ],
            unet,
            vae,
            scheduler,
            crate::pipeline::SdxlSettings {
                force_zeros_for_empty_prompt: true,
                requires_aesthetics_score: false,
            },
            device.clone(),
            dtype,
        ));
    }
    let vae_config = sd15_vae_config();
    let vae = random_network(dtype, device, |vb| AutoencoderKl::new(&vae_config, vb))?;
    let scheduler = json!({
        "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": false,
        "skip_prk_steps": true, "steps_offset": 1, "clip_sample": false
    });
    Ok(StableDiffusion::from_parts(
        "random-sd15".into(),
        ClipTokenizer::bundled("<|endoftext|>")?,
        text,
        unet,
        vae,
        scheduler,
        device.clone(),
        dtype,
    ))
}

/// Runs one UNet call with and without token merging on the same random weights and inputs and measures
/// how far apart the outputs are (and each call's time, after a warm-up call).
pub fn compare_tome(
    resolution: usize,
    batch: usize,
    precision: BenchPrecision,
) -> Result<TomeCloseness> {
    let dtype = precision.dtype()?;
    check(&BenchOptions {
        arch: BenchArch::Sd15,
        component: BenchComponent::Unet,
        resolution,
        batch,
        iterations: 1,
        precision,
        tome: true,
        steps: 1,
        device: BenchDevice::Cpu,
    })?;
    let device = Device::Cpu;
    let unet = random_unet(BenchArch::Sd15, dtype, &device)?;
    let (latents, context, _) = unet_inputs(BenchArch::Sd15, resolution, batch, dtype, &device)?;
    let run = |tome: bool| -> Result<(Tensor, f64)> {
        let mut options = UNetOptions {
            tome: tome.then(|| TokenMerging::new(TomeSettings::default(), 0)),
        };
        let start = Instant::now();
        let out = unet.forward_with(&latents, 500.0, &context, None, &mut options)?;
        Ok((
            out.to_dtype(DType::F32)?.flatten_all()?,
            start.elapsed().as_secs_f64(),
        ))
    };
    run(false)?;
    let (full, full_s) = run(false)?;
    let (merged, merged_s) = run(true)?;
    let dot = |a: &Tensor, b: &Tensor| -> Result<f64> {
        Ok((a * b)?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?)
    };
    let diff = (&merged - &full)?;
    let full_norm = dot(&full, &full)?.sqrt();
    let merged_norm = dot(&merged, &merged)?.sqrt();
    Ok(TomeCloseness {
        resolution,
        batch,
        relative_l2: dot(&diff, &diff)?.sqrt() / full_norm,
        cosine: dot(&merged, &full)? / (merged_norm * full_norm),
        max_abs_diff: diff
            .abs()?
            .max(D::Minus1)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?,
        full_s,
        merged_s,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
    }

    #[test]
    fn peak_memory_is_read_from_proc() {
        let peak = peak_rss_mib().expect("Linux has /proc/self/status");
        assert!(peak > 1.0, "{peak}");
    }

    #[test]
    fn the_configs_are_sd15s() {
        let unet = sd15_unet_config();
        assert_eq!(unet.block_out_channels, [320, 640, 1280, 1280]);
        assert_eq!(unet.cross_attention_dim, 768);
        assert_eq!(sd15_vae_config().scale_factor(), 8);
        assert!(clip_l_config().validate().is_ok());
    }

    #[test]
    fn the_sdxl_configs_are_sdxl_bases() {
        let unet = sdxl_unet_config();
        assert!(unet.validate().is_ok() && unet.is_sdxl());
        assert_eq!(unet.heads(), [5, 10, 20]);
        assert_eq!(
            unet.cross_attention_dim,
            clip_l_config().hidden_size + clip_bigg_config().hidden_size
        );
        // 1280 pooled + 6 time ids × 256.
        assert_eq!(unet.projection_class_embeddings_input_dim, Some(2816));
        assert_eq!(sdxl_vae_config().scaling_factor, 0.13025);
        assert!(clip_bigg_config().validate().is_ok());
    }

    #[test]
    fn bad_sizes_are_refused() {
        let opts = BenchOptions {
            arch: BenchArch::Sd15,
            component: BenchComponent::Unet,
            resolution: 100,
            batch: 1,
            iterations: 1,
            precision: BenchPrecision::Fp32,
            tome: false,
            steps: 1,
            device: BenchDevice::Cpu,
        };
        assert!(run_bench(&opts).is_err());
        assert!(run_bench(&BenchOptions {
            resolution: 64,
            batch: 0,
            ..opts
        })
        .is_err());
    }
}
