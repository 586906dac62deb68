//! A tiny random model in valid diffusers layout, so a new user can try every command with no download.
//!
//! Its weights are random (deterministic for a seed), so it draws noise-like pictures, quickly: the point
//! is to exercise the whole path — loading, tokenizer, text encoder, UNet, VAE, schedulers, outputs —
//! not to make art. Its shape follows SD 1.x (8× VAE, epsilon prediction, PNDM scheduler) at a fraction of
//! the width, and it handles 512 × 512 in seconds on a CPU.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde_json::json;

use crate::assets::{CLIP_MERGES_TXT, CLIP_VOCAB_JSON};
use crate::config::{ClipTextConfig, UNetConfig, VaeConfig};
use crate::error::{EngineError, Result};
use crate::models::{AutoencoderKl, ClipTextModel, UNet};
use crate::rng::TorchGenerator;

fn unet_config(in_channels: usize) -> serde_json::Value {
    json!({
        "_class_name": "UNet2DConditionModel",
        "in_channels": in_channels,
        "out_channels": 4,
        "block_out_channels": [32, 64, 64],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "layers_per_block": 1,
        "attention_head_dim": 4,
        "cross_attention_dim": 64,
        "norm_num_groups": 32,
        "sample_size": 64
    })
}

fn vae_config() -> serde_json::Value {
    json!({
        "_class_name": "AutoencoderKL",
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": [32, 32, 64, 64],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "scaling_factor": 0.18215,
        "sample_size": 512
    })
}

fn text_config() -> serde_json::Value {
    json!({
        "architectures": ["CLIPTextModel"],
        "vocab_size": 49408,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 1
    })
}

fn scheduler_config(pix2pix: bool) -> serde_json::Value {
    let class = if pix2pix {
        "EulerAncestralDiscreteScheduler"
    } else {
        "PNDMScheduler"
    };
    json!({
        "_class_name": class,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "set_alpha_to_one": false,
        "skip_prk_steps": true,
        "steps_offset": 1,
        "clip_sample": false,
        "prediction_type": "epsilon"
    })
}

fn write(path: &Path, contents: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| EngineError::io(parent, e))?;
    }
    std::fs::write(path, contents).map_err(|e| EngineError::io(path, e))
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("JSON values always serialise");
    write(path, text.as_bytes())
}

/// Gives every weight of `varmap` deterministic values: matrices and kernels normal / √fan-in, biases
/// zero, norm scales one.
fn randomise(varmap: &VarMap, rng: &mut TorchGenerator) -> Result<()> {
    let data = varmap.data().lock().expect("varmap lock");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let dims = var.dims().to_vec();
        let value = if dims.len() >= 2 {
            let fan_in: usize = dims[1..].iter().product();
            let scale = if name.contains("embedding") {
                0.5
            } else {
                1.0 / (fan_in as f64).sqrt()
            };
            (rng.randn_tensor(dims.as_slice(), DType::F32, &Device::Cpu)? * scale)?
        } else if name.ends_with("bias") {
            Tensor::zeros(dims.as_slice(), DType::F32, &Device::Cpu)?
        } else {
            Tensor::ones(dims.as_slice(), DType::F32, &Device::Cpu)?
        };
        var.set(&value)?;
    }
    Ok(())
}

/// Builds one component with random weights and saves them as `<dir>/<file>`.
fn save_component(
    dir: &Path,
    file: &str,
    rng: &mut TorchGenerator,
    build: impl FnOnce(VarBuilder) -> candle_core::Result<()>,
) -> Result<()> {
    let varmap = VarMap::new();
    build(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))?;
    randomise(&varmap, rng)?;
    std::fs::create_dir_all(dir).map_err(|e| EngineError::io(dir, e))?;
    varmap.save(dir.join(file))?;
    Ok(())
}

/// Writes a tiny random model in diffusers layout to `dir` (an img2img model, or an InstructPix2Pix one
/// with `pix2pix`). Refuses to overwrite an existing folder.
pub fn make_demo_model(dir: &Path, pix2pix: bool, seed: u64) -> Result<()> {
    if dir.exists() {
        return Err(EngineError::io(
            dir,
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "already exists; choose a new folder",
            ),
        ));
    }
    let tmp = dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&tmp);
    let mut rng = TorchGenerator::new(seed);
    let pipeline = if pix2pix {
        "StableDiffusionInstructPix2PixPipeline"
    } else {
        "StableDiffusionPipeline"
    };
    let scheduler = scheduler_config(pix2pix);
    write_json(
        &tmp.join("model_index.json"),
        &json!({
            "_class_name": pipeline,
            "_pictor_demo": "random weights: a demo model that draws noise-like pictures",
            "scheduler": ["diffusers", scheduler["_class_name"]],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "requires_safety_checker": false
        }),
    )?;
    let unet = unet_config(if pix2pix { 8 } else { 4 });
    let vae = vae_config();
    let text = text_config();
    write_json(&tmp.join("unet/config.json"), &unet)?;
    write_json(&tmp.join("vae/config.json"), &vae)?;
    write_json(&tmp.join("text_encoder/config.json"), &text)?;
    write_json(&tmp.join("scheduler/scheduler_config.json"), &scheduler)?;
    write(
        &tmp.join("tokenizer/vocab.json"),
        CLIP_VOCAB_JSON.as_bytes(),
    )?;
    write(
        &tmp.join("tokenizer/merges.txt"),
        CLIP_MERGES_TXT.as_bytes(),
    )?;
    write_json(
        &tmp.join("tokenizer/tokenizer_config.json"),
        &json!({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "pad_token": "<|endoftext|>",
                "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}),
    )?;
    write_json(
        &tmp.join("tokenizer/special_tokens_map.json"),
        &json!({"pad_token": "<|endoftext|>", "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}),
    )?;

    let unet_cfg: UNetConfig = serde_json::from_value(unet).expect("demo config is valid");
    let vae_cfg: VaeConfig = serde_json::from_value(vae).expect("demo config is valid");
    let text_cfg: ClipTextConfig = serde_json::from_value(text).expect("demo config is valid");
    save_component(
        &tmp.join("text_encoder"),
        "model.safetensors",
        &mut rng,
        |vb| ClipTextModel::new(&text_cfg, vb).map(|_| ()),
    )?;
    save_component(
        &tmp.join("unet"),
        "diffusion_pytorch_model.safetensors",
        &mut rng,
        |vb| UNet::new(&unet_cfg, vb).map(|_| ()),
    )?;
    save_component(
        &tmp.join("vae"),
        "diffusion_pytorch_model.safetensors",
        &mut rng,
        |vb| AutoencoderKl::new(&vae_cfg, vb).map(|_| ()),
    )?;
    std::fs::rename(&tmp, dir).map_err(|e| EngineError::io(dir, e))
}
