//! The architecture of a model, read from its own diffusers config files (`unet/config.json`,
//! `vae/config.json`, `text_encoder/config.json`, `scheduler/scheduler_config.json`). Fields missing from a
//! file take diffusers' / transformers' class defaults, so any SD-family config loads as diffusers loads it.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};

/// A config value that diffusers accepts either as one number for every block or as a list per block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    /// The same value for every block.
    One(usize),
    /// One value per down block (up blocks use the list reversed).
    Each(Vec<usize>),
}

impl PerBlock {
    /// The value for down block `index` of `blocks`.
    pub fn get(&self, index: usize) -> usize {
        match self {
            PerBlock::One(v) => *v,
            PerBlock::Each(list) => list[index.min(list.len() - 1)],
        }
    }

    /// The values for all `blocks` down blocks.
    pub fn expand(&self, blocks: usize) -> Vec<usize> {
        (0..blocks).map(|i| self.get(i)).collect()
    }
}

fn default_4() -> usize {
    4
}
fn default_3() -> usize {
    3
}
fn default_1() -> usize {
    1
}
fn default_groups() -> usize {
    32
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}
fn default_unet_channels() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn default_heads() -> PerBlock {
    PerBlock::One(8)
}
fn default_transformer_layers() -> PerBlock {
    PerBlock::One(1)
}
fn default_layers_per_block() -> PerBlock {
    PerBlock::One(2)
}
fn default_cross_attention_dim() -> usize {
    1280
}
fn default_down_blocks() -> Vec<String> {
    vec![
        "CrossAttnDownBlock2D".into(),
        "CrossAttnDownBlock2D".into(),
        "CrossAttnDownBlock2D".into(),
        "DownBlock2D".into(),
    ]
}
fn default_up_blocks() -> Vec<String> {
    vec![
        "UpBlock2D".into(),
        "CrossAttnUpBlock2D".into(),
        "CrossAttnUpBlock2D".into(),
        "CrossAttnUpBlock2D".into(),
    ]
}
fn default_mid_block() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn default_silu() -> String {
    "silu".into()
}

/// `unet/config.json` of a `UNet2DConditionModel`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UNetConfig {
    /// Latent channels in: 4 for text/img2img models, 8 for InstructPix2Pix, 9 for inpainting.
    #[serde(default = "default_4")]
    pub in_channels: usize,
    /// Latent channels out.
    #[serde(default = "default_4")]
    pub out_channels: usize,
    /// Channels of each down block (up blocks mirror them).
    #[serde(default = "default_unet_channels")]
    pub block_out_channels: Vec<usize>,
    /// Kind of each down block: `CrossAttnDownBlock2D` or `DownBlock2D`.
    #[serde(default = "default_down_blocks")]
    pub down_block_types: Vec<String>,
    /// Kind of each up block: `CrossAttnUpBlock2D` or `UpBlock2D`.
    #[serde(default = "default_up_blocks")]
    pub up_block_types: Vec<String>,
    /// `UNetMidBlock2DCrossAttn` (the only one SD uses) or none.
    #[serde(default = "default_mid_block")]
    pub mid_block_type: Option<String>,
    /// ResNet layers in each down block (up blocks have one more).
    #[serde(default = "default_layers_per_block")]
    pub layers_per_block: PerBlock,
    /// diffusers' legacy name: the number of attention heads per block, unless `num_attention_heads` is set.
    #[serde(default = "default_heads")]
    pub attention_head_dim: PerBlock,
    /// The number of attention heads per block, when the config states it under its proper name.
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    /// Transformer blocks inside each attention module.
    #[serde(default = "default_transformer_layers")]
    pub transformer_layers_per_block: PerBlock,
    /// Width of the text embeddings the cross-attention reads.
    #[serde(default = "default_cross_attention_dim")]
    pub cross_attention_dim: usize,
    /// SD 2.x: the attention modules project in and out with linear layers instead of 1×1 convolutions.
    #[serde(default)]
    pub use_linear_projection: bool,
    /// SD 2.x: attention scores computed in float32.
    #[serde(default)]
    pub upcast_attention: bool,
    /// Groups of every group norm.
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    /// Epsilon of every group norm.
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    /// Order of the sinusoidal time embedding halves.
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    /// Frequency shift of the sinusoidal time embedding.
    #[serde(default)]
    pub freq_shift: f64,
    /// Padding of the down-sampling convolutions.
    #[serde(default = "default_1")]
    pub downsample_padding: usize,
    /// Activation used throughout (SD: silu).
    #[serde(default = "default_silu")]
    pub act_fn: String,
    /// Kernel size of conv_in.
    #[serde(default = "default_3")]
    pub conv_in_kernel: usize,
    /// Kernel size of conv_out.
    #[serde(default = "default_3")]
    pub conv_out_kernel: usize,
    /// Nominal latent size the model was trained at (pixels = this × VAE scale factor).
    #[serde(default)]
    pub sample_size: Option<usize>,
    /// Must be false: the UNet centres its input only in pre-SD models.
    #[serde(default)]
    pub center_input_sample: bool,
    /// Must be false in SD models.
    #[serde(default)]
    pub only_cross_attention: bool,
    /// Must be "default" in SD models.
    #[serde(default)]
    pub resnet_time_scale_shift: Option<String>,
    /// SDXL: `text_time`, the pooled text embedding and the size/crop (or aesthetic-score) ids added to the
    /// time embedding; absent in SD 1/2.
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    /// SDXL: width of the sinusoidal embedding of each time id (256).
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    /// SDXL: input width of the add embedding, pooled projection width + time ids × `addition_time_embed_dim`
    /// (2816 for the base: 1280 + 6 × 256; 2560 for the refiner: 1280 + 5 × 256).
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    /// Must be absent in SD models.
    #[serde(default)]
    pub class_embed_type: Option<String>,
}

impl UNetConfig {
    /// Whether this is an SDXL UNet (pooled text embedding and time ids added to the time embedding).
    pub fn is_sdxl(&self) -> bool {
        self.addition_embed_type.as_deref() == Some("text_time")
    }

    /// The number of attention heads of each down block.
    pub fn heads(&self) -> Vec<usize> {
        let heads = self
            .num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim);
        heads.expand(self.block_out_channels.len())
    }

    /// Checks that this is a UNet the engine can build, naming the first thing it cannot.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err("block_out_channels is empty".into());
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err("down_block_types/up_block_types do not match block_out_channels".into());
        }
        for t in &self.down_block_types {
            if t != "CrossAttnDownBlock2D" && t != "DownBlock2D" {
                return Err(format!("unsupported down block {t}"));
            }
        }
        for t in &self.up_block_types {
            if t != "CrossAttnUpBlock2D" && t != "UpBlock2D" {
                return Err(format!("unsupported up block {t}"));
            }
        }
        if let Some(m) = &self.mid_block_type {
            if m != "UNetMidBlock2DCrossAttn" {
                return Err(format!("unsupported mid block {m}"));
            }
        }
        if self.class_embed_type.is_some() {
            return Err("class embeddings (class_embed_type) are not supported".into());
        }
        match self.addition_embed_type.as_deref() {
            None => {}
            Some("text_time") => {
                let (Some(time), Some(input)) = (
                    self.addition_time_embed_dim,
                    self.projection_class_embeddings_input_dim,
                ) else {
                    return Err(
                        "addition_embed_type text_time needs addition_time_embed_dim and \
                                projection_class_embeddings_input_dim"
                            .into(),
                    );
                };
                if time == 0 || time % 2 != 0 || input <= time {
                    return Err(format!(
                        "addition_time_embed_dim {time} / projection_class_embeddings_input_dim {input} \
                         do not describe an SDXL add embedding"
                    ));
                }
            }
            Some(other) => return Err(format!("unsupported addition_embed_type {other}")),
        }
        if self.center_input_sample || self.only_cross_attention {
            return Err("center_input_sample / only_cross_attention are not supported".into());
        }
        if matches!(self.resnet_time_scale_shift.as_deref(), Some(s) if s != "default") {
            return Err("resnet_time_scale_shift other than \"default\" is not supported".into());
        }
        if self.act_fn != "silu" {
            return Err(format!("unsupported act_fn {}", self.act_fn));
        }
        for (i, (&c, h)) in self.block_out_channels.iter().zip(self.heads()).enumerate() {
            if h == 0 || c % h != 0 {
                return Err(format!(
                    "block {i}: {c} channels cannot be split in {h} heads"
                ));
            }
            if c % self.norm_num_groups != 0 {
                return Err(format!(
                    "block {i}: {c} channels not divisible by {} groups",
                    self.norm_num_groups
                ));
            }
        }
        Ok(())
    }
}

fn default_vae_channels() -> Vec<usize> {
    vec![64]
}
fn default_scaling_factor() -> f64 {
    0.18215
}

/// `vae/config.json` of an `AutoencoderKL`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VaeConfig {
    /// Image channels in (3).
    #[serde(default = "default_3")]
    pub in_channels: usize,
    /// Image channels out (3).
    #[serde(default = "default_3")]
    pub out_channels: usize,
    /// Channels of each encoder block (the decoder mirrors them); scale factor = 2^(len − 1).
    #[serde(default = "default_vae_channels")]
    pub block_out_channels: Vec<usize>,
    /// ResNet layers per encoder block (decoder blocks have one more).
    #[serde(default = "default_1")]
    pub layers_per_block: usize,
    /// Channels of the latent.
    #[serde(default = "default_4")]
    pub latent_channels: usize,
    /// Groups of every group norm.
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    /// Latents are multiplied by this after encoding (SD 1/2: 0.18215).
    #[serde(default = "default_scaling_factor")]
    pub scaling_factor: f64,
    /// Subtracted before scaling when present (not used by SD 1/2).
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// Whether the 1×1 quant_conv exists.
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    /// Whether the 1×1 post_quant_conv exists.
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    /// SDXL: the VAE overflows in float16, so SDXL pipelines run it in float32 when the model runs in float16
    /// (diffusers' class default: true; the fp16-fix VAE says false).
    #[serde(default = "default_true")]
    pub force_upcast: bool,
    /// Whether the mid blocks have their attention layer.
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
    /// Activation (SD: silu).
    #[serde(default = "default_silu")]
    pub act_fn: String,
}

impl VaeConfig {
    /// Pixels per latent cell along each side: 2^(blocks − 1).
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len().max(1) - 1)
    }
}

fn default_vocab() -> usize {
    49408
}
fn default_hidden() -> usize {
    512
}
fn default_intermediate() -> usize {
    2048
}
fn default_layers() -> usize {
    12
}
fn default_text_heads() -> usize {
    8
}
fn default_positions() -> usize {
    77
}
fn default_quick_gelu() -> String {
    "quick_gelu".into()
}
fn default_pad_token_id() -> u32 {
    1
}
fn default_eos_token_id() -> u32 {
    2
}

/// `text_encoder/config.json` of a transformers `CLIPTextModel`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClipTextConfig {
    /// Size of the token embedding table.
    #[serde(default = "default_vocab")]
    pub vocab_size: usize,
    /// Width of the hidden states (SD 1: 768, SD 2: 1024).
    #[serde(default = "default_hidden")]
    pub hidden_size: usize,
    /// Width of the MLP.
    #[serde(default = "default_intermediate")]
    pub intermediate_size: usize,
    /// Transformer layers (SD 2 ships 23 of OpenCLIP's 24).
    #[serde(default = "default_layers")]
    pub num_hidden_layers: usize,
    /// Attention heads.
    #[serde(default = "default_text_heads")]
    pub num_attention_heads: usize,
    /// Positions (77).
    #[serde(default = "default_positions")]
    pub max_position_embeddings: usize,
    /// MLP activation: `quick_gelu` (SD 1) or `gelu` (SD 2).
    #[serde(default = "default_quick_gelu")]
    pub hidden_act: String,
    /// Epsilon of the layer norms.
    #[serde(default = "default_norm_eps")]
    pub layer_norm_eps: f64,
    /// Pad token id written in the config (the tokenizer's own pad token is what padding uses).
    #[serde(default = "default_pad_token_id")]
    pub pad_token_id: u32,
    /// End-of-text token id.
    #[serde(default = "default_eos_token_id")]
    pub eos_token_id: u32,
    /// Width of the pooled-output projection (`CLIPTextModelWithProjection`, SDXL's second encoder).
    #[serde(default)]
    pub projection_dim: Option<usize>,
}

impl ClipTextConfig {
    /// Checks that this is a text encoder the engine can build.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(format!(
                "hidden_size {} cannot be split in {} heads",
                self.hidden_size, self.num_attention_heads
            ));
        }
        match self.hidden_act.as_str() {
            "quick_gelu" | "gelu" => Ok(()),
            other => Err(format!("unsupported hidden_act {other}")),
        }
    }
}

/// `model_index.json` of a diffusers pipeline folder: which pipeline class it is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelIndex {
    /// e.g. `StableDiffusionPipeline` or `StableDiffusionInstructPix2PixPipeline`.
    #[serde(rename = "_class_name", default)]
    pub class_name: String,
    /// SDXL: a missing negative prompt gives a zero unconditional embedding (diffusers' default: true).
    #[serde(default)]
    pub force_zeros_for_empty_prompt: Option<bool>,
    /// SDXL refiner: the time ids end in an aesthetic score instead of the target size.
    #[serde(default)]
    pub requires_aesthetics_score: Option<bool>,
}

/// Reads and parses one JSON config file, naming the file in any error.
pub fn read_json<T: serde::de::DeserializeOwned>(model: &str, path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| EngineError::model(model, format!("cannot read {}: {e}", path.display())))?;
    serde_json::from_str(&text)
        .map_err(|e| EngineError::model(model, format!("invalid {}: {e}", path.display())))
}
