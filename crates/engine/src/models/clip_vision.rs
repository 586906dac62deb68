//! The CLIP vision tower (transformers' `CLIPVisionModel`): patch + class + position embeddings, a pre-norm,
//! the same transformer layers as the text encoder (unmasked), and the class token's final state as the
//! pooled output.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, LayerNorm, VarBuilder};
use serde::{Deserialize, Serialize};

use super::clip::{Activation, EncoderLayer};

fn default_hidden() -> usize {
    768
}
fn default_intermediate() -> usize {
    3072
}
fn default_layers() -> usize {
    12
}
fn default_heads() -> usize {
    12
}
fn default_channels() -> usize {
    3
}
fn default_image_size() -> usize {
    224
}
fn default_patch_size() -> usize {
    32
}
fn default_act() -> String {
    "quick_gelu".into()
}
fn default_eps() -> f64 {
    1e-5
}

/// `vision_config` of a CLIP model (transformers' `CLIPVisionConfig`); missing keys take transformers'
/// defaults (those of openai/clip-vit-base-patch32).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipVisionConfig {
    /// Width of the hidden states.
    #[serde(default = "default_hidden")]
    pub hidden_size: usize,
    /// Width of the MLP.
    #[serde(default = "default_intermediate")]
    pub intermediate_size: usize,
    /// Transformer layers.
    #[serde(default = "default_layers")]
    pub num_hidden_layers: usize,
    /// Attention heads.
    #[serde(default = "default_heads")]
    pub num_attention_heads: usize,
    /// Channels of the input image (3).
    #[serde(default = "default_channels")]
    pub num_channels: usize,
    /// Side of the square input image, in pixels.
    #[serde(default = "default_image_size")]
    pub image_size: usize,
    /// Side of one square patch, in pixels.
    #[serde(default = "default_patch_size")]
    pub patch_size: usize,
    /// MLP activation: `quick_gelu` (OpenAI CLIP) or `gelu`.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Epsilon of the layer norms.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

impl Default for ClipVisionConfig {
    fn default() -> Self {
        ClipVisionConfig {
            hidden_size: default_hidden(),
            intermediate_size: default_intermediate(),
            num_hidden_layers: default_layers(),
            num_attention_heads: default_heads(),
            num_channels: default_channels(),
            image_size: default_image_size(),
            patch_size: default_patch_size(),
            hidden_act: default_act(),
            layer_norm_eps: default_eps(),
        }
    }
}

impl ClipVisionConfig {
    /// Checks that this is a vision tower the engine can build.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(format!(
                "hidden_size {} cannot be split in {} heads",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.patch_size == 0 || !self.image_size.is_multiple_of(self.patch_size) {
            return Err(format!(
                "image_size {} is not a whole number of {}-pixel patches",
                self.image_size, self.patch_size
            ));
        }
        self.activation().map(|_| ())
    }

    /// Patches along one side of the image.
    pub fn patches_per_side(&self) -> usize {
        self.image_size / self.patch_size
    }

    fn activation(&self) -> std::result::Result<Activation, String> {
        match self.hidden_act.as_str() {
            "quick_gelu" => Ok(Activation::QuickGelu),
            "gelu" => Ok(Activation::Gelu),
            other => Err(format!("unsupported hidden_act {other}")),
        }
    }
}

/// The vision tower; [`ClipVisionModel::forward`] gives the pooled output.
#[derive(Debug)]
pub struct ClipVisionModel {
    class_embedding: Tensor,
    patch_embedding: Conv2d,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,
    config: ClipVisionConfig,
}

impl ClipVisionModel {
    /// Builds the tower that `config` describes from transformers-named weights under `vb` (the
    /// `vision_model.` prefix of `CLIPVisionModel` is added here).
    pub fn new(config: &ClipVisionConfig, vb: VarBuilder) -> Result<Self> {
        config.validate().map_err(candle_core::Error::msg)?;
        let activation = config.activation().map_err(candle_core::Error::msg)?;
        let vb = vb.pp("vision_model");
        let emb = vb.pp("embeddings");
        let h = config.hidden_size;
        let positions = config.patches_per_side().pow(2) + 1;
        let patch = Conv2dConfig {
            stride: config.patch_size,
            ..Default::default()
        };
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                EncoderLayer::with_sizes(
                    h,
                    config.intermediate_size,
                    config.num_attention_heads,
                    config.layer_norm_eps,
                    activation,
                    // 257 tokens per image: repacking per call is cheap enough, and the vision
                    // tower's weights are large.
                    false,
                    vb.pp(format!("encoder.layers.{i}")),
                )
            })
            .collect::<Result<_>>()?;
        Ok(ClipVisionModel {
            class_embedding: emb.get(h, "class_embedding")?,
            patch_embedding: candle_nn::conv2d_no_bias(
                config.num_channels,
                h,
                config.patch_size,
                patch,
                emb.pp("patch_embedding"),
            )?,
            position_embedding: emb.get((positions, h), "position_embedding.weight")?,
            pre_layrnorm: candle_nn::layer_norm(h, config.layer_norm_eps, vb.pp("pre_layrnorm"))?,
            layers,
            post_layernorm: candle_nn::layer_norm(
                h,
                config.layer_norm_eps,
                vb.pp("post_layernorm"),
            )?,
            config: config.clone(),
        })
    }

    /// The config this tower was built from.
    pub fn config(&self) -> &ClipVisionConfig {
        &self.config
    }

    /// The pooled output (b, hidden) of pixel values (b, channels, image_size, image_size), already
    /// normalised: the class token's last hidden state through `post_layernorm`.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (b, c, height, width) = pixel_values.dims4()?;
        let side = self.config.image_size;
        if c != self.config.num_channels || height != side || width != side {
            candle_core::bail!(
                "the vision model takes {} x {side} x {side} pixel values, got {c} x {height} x {width}",
                self.config.num_channels
            );
        }
        let dtype = self.class_embedding.dtype();
        let patches = self
            .patch_embedding
            .forward(&pixel_values.to_dtype(dtype)?)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let h = self.config.hidden_size;
        let class = self.class_embedding.reshape((1, 1, h))?.repeat((b, 1, 1))?;
        let xs = Tensor::cat(&[&class, &patches], 1)?
            .broadcast_add(&self.position_embedding.unsqueeze(0)?)?;
        let mut xs = self.pre_layrnorm.forward(&xs)?;
        for layer in &self.layers {
            xs = layer.forward(&xs, false)?;
        }
        self.post_layernorm
            .forward(&xs.narrow(1, 0, 1)?.squeeze(1)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_keys_take_transformers_defaults() {
        let cfg: ClipVisionConfig = serde_json::from_str(r#"{"hidden_size": 1024}"#).unwrap();
        assert_eq!(cfg.hidden_size, 1024);
        let defaults = ClipVisionConfig {
            hidden_size: 1024,
            ..Default::default()
        };
        assert_eq!(cfg, defaults);
        assert_eq!(cfg.image_size, 224);
        assert_eq!(cfg.patch_size, 32);
        assert_eq!(cfg.hidden_act, "quick_gelu");
        assert_eq!(cfg.patches_per_side(), 7);
    }

    #[test]
    fn bad_configs_are_refused() {
        let bad = |json: &str| {
            serde_json::from_str::<ClipVisionConfig>(json)
                .unwrap()
                .validate()
                .unwrap_err()
        };
        assert!(bad(r#"{"hidden_size": 30, "num_attention_heads": 4}"#).contains("heads"));
        assert!(bad(r#"{"image_size": 225, "patch_size": 14}"#).contains("patches"));
        assert!(bad(r#"{"hidden_act": "relu"}"#).contains("relu"));
        let vit_l14: ClipVisionConfig =
            serde_json::from_str(r#"{"image_size": 224, "patch_size": 14}"#).unwrap();
        assert_eq!(vit_l14.validate(), Ok(()));
        assert_eq!(vit_l14.patches_per_side(), 16);
    }
}
