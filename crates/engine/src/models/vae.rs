//! `AutoencoderKL`: the VAE that maps images to latents and back, built from `vae/config.json`.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::attention::VaeAttention;
use super::layers::{conv2d, group_norm, group_norm_silu, Bf16Conv, Conv2d, GroupNorm};
use super::resnet::ResnetBlock;
use crate::config::VaeConfig;
use crate::rng::TorchGenerator;

const EPS: f64 = 1e-6;

/// A VAE resnet block: no time embedding, and the direct product for its 3×3 convolutions in bf16
/// (see [`Bf16Conv`]).
fn resnet(c_in: usize, c_out: usize, groups: usize, vb: VarBuilder) -> Result<ResnetBlock> {
    ResnetBlock::new(c_in, c_out, None, groups, EPS, Bf16Conv::Direct, vb)
}

/// The VAE's middle: ResNet, optional attention, ResNet.
#[derive(Debug)]
struct MidBlock {
    resnet0: ResnetBlock,
    attention: Option<VaeAttention>,
    resnet1: ResnetBlock,
}

impl MidBlock {
    fn new(c: usize, groups: usize, attention: bool, vb: VarBuilder) -> Result<Self> {
        Ok(MidBlock {
            resnet0: resnet(c, c, groups, vb.pp("resnets.0"))?,
            attention: if attention {
                Some(VaeAttention::new(c, groups, vb.pp("attentions.0"))?)
            } else {
                None
            },
            resnet1: resnet(c, c, groups, vb.pp("resnets.1"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut h = self.resnet0.forward(xs, None)?;
        if let Some(attn) = &self.attention {
            h = attn.forward(&h)?;
        }
        self.resnet1.forward(&h, None)
    }
}

/// A block of ResNets followed by an optional resampling convolution.
#[derive(Debug)]
struct Block {
    resnets: Vec<ResnetBlock>,
    resample: Option<Conv2d>,
}

/// Image → the mean and log-variance of the latent distribution.
#[derive(Debug)]
struct Encoder {
    conv_in: Conv2d,
    blocks: Vec<Block>,
    mid: MidBlock,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let groups = cfg.norm_num_groups;
        let mut blocks = Vec::new();
        let mut out_ch = ch[0];
        for (i, &c) in ch.iter().enumerate() {
            let vb = vb.pp(format!("down_blocks.{i}"));
            let in_ch = out_ch;
            out_ch = c;
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    let rin = if j == 0 { in_ch } else { out_ch };
                    resnet(rin, out_ch, groups, vb.pp(format!("resnets.{j}")))
                })
                .collect::<Result<_>>()?;
            let resample = if i + 1 < ch.len() {
                Some(conv2d(
                    out_ch,
                    out_ch,
                    3,
                    2,
                    0,
                    vb.pp("downsamplers.0.conv"),
                )?)
            } else {
                None
            };
            blocks.push(Block { resnets, resample });
        }
        let last = ch[ch.len() - 1];
        Ok(Encoder {
            conv_in: conv2d(cfg.in_channels, ch[0], 3, 1, 1, vb.pp("conv_in"))?,
            blocks,
            mid: MidBlock::new(
                last,
                groups,
                cfg.mid_block_add_attention,
                vb.pp("mid_block"),
            )?,
            norm_out: group_norm(groups, last, EPS, vb.pp("conv_norm_out"))?,
            conv_out: conv2d(last, 2 * cfg.latent_channels, 3, 1, 1, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(xs)?;
        for block in &self.blocks {
            for resnet in &block.resnets {
                h = resnet.forward(&h, None)?;
            }
            if let Some(down) = &block.resample {
                // diffusers pads right and bottom by one before the unpadded stride-2 convolution.
                h = down.forward(&crate::kernels::pad_bottom_right(&h, 1)?)?;
            }
        }
        let h = self.mid.forward(&h)?;
        self.conv_out.forward(&group_norm_silu(&self.norm_out, &h)?)
    }
}

/// Latent → image.
#[derive(Debug)]
struct Decoder {
    conv_in: Conv2d,
    mid: MidBlock,
    blocks: Vec<Block>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let ch: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let groups = cfg.norm_num_groups;
        let mut blocks = Vec::new();
        let mut out_ch = ch[0];
        for (i, &c) in ch.iter().enumerate() {
            let vb = vb.pp(format!("up_blocks.{i}"));
            let prev = out_ch;
            out_ch = c;
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| {
                    let rin = if j == 0 { prev } else { out_ch };
                    resnet(rin, out_ch, groups, vb.pp(format!("resnets.{j}")))
                })
                .collect::<Result<_>>()?;
            let resample = if i + 1 < ch.len() {
                Some(conv2d(out_ch, out_ch, 3, 1, 1, vb.pp("upsamplers.0.conv"))?)
            } else {
                None
            };
            blocks.push(Block { resnets, resample });
        }
        let last = ch[ch.len() - 1];
        Ok(Decoder {
            conv_in: conv2d(cfg.latent_channels, ch[0], 3, 1, 1, vb.pp("conv_in"))?,
            mid: MidBlock::new(
                ch[0],
                groups,
                cfg.mid_block_add_attention,
                vb.pp("mid_block"),
            )?,
            blocks,
            norm_out: group_norm(groups, last, EPS, vb.pp("conv_norm_out"))?,
            conv_out: conv2d(last, cfg.out_channels, 3, 1, 1, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut h = self.mid.forward(&self.conv_in.forward(xs)?)?;
        for block in &self.blocks {
            for resnet in &block.resnets {
                h = resnet.forward(&h, None)?;
            }
            if let Some(up) = &block.resample {
                h = up.forward_upsampled(&h)?;
            }
        }
        self.conv_out.forward(&group_norm_silu(&self.norm_out, &h)?)
    }
}

/// The diagonal Gaussian the encoder predicts for each latent cell.
#[derive(Debug, Clone)]
pub struct LatentDistribution {
    /// The mean (diffusers' `mode()`).
    pub mean: Tensor,
    /// The standard deviation, from the log-variance clamped to [−30, 20].
    pub std: Tensor,
}

impl LatentDistribution {
    /// The most likely latent (InstructPix2Pix conditions on this).
    pub fn mode(&self) -> &Tensor {
        &self.mean
    }

    /// A sample `mean + std · ε`, with ε drawn from `rng` as diffusers draws it.
    pub fn sample(&self, rng: &mut TorchGenerator) -> Result<Tensor> {
        let eps = rng.randn_tensor(self.mean.shape(), self.mean.dtype(), self.mean.device())?;
        self.mean.add(&self.std.mul(&eps)?)
    }
}

/// The variational auto-encoder with its 1×1 quantisation convolutions.
#[derive(Debug)]
pub struct AutoencoderKl {
    config: VaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
}

impl AutoencoderKl {
    /// Builds the VAE that `config` describes from weights under `vb` (diffusers names).
    pub fn new(config: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let l = config.latent_channels;
        Ok(AutoencoderKl {
            config: config.clone(),
            encoder: Encoder::new(config, vb.pp("encoder"))?,
            decoder: Decoder::new(config, vb.pp("decoder"))?,
            quant_conv: if config.use_quant_conv {
                Some(conv2d(2 * l, 2 * l, 1, 1, 0, vb.pp("quant_conv"))?)
            } else {
                None
            },
            post_quant_conv: if config.use_post_quant_conv {
                Some(conv2d(l, l, 1, 1, 0, vb.pp("post_quant_conv"))?)
            } else {
                None
            },
        })
    }

    /// The config this VAE was built from.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// The dtype of its weights (and of what it takes and gives).
    pub fn dtype(&self) -> candle_core::DType {
        self.encoder.conv_in.dtype()
    }

    /// Encodes images in [−1, 1] (b, 3, h, w) to the latent distribution (unscaled).
    pub fn encode(&self, images: &Tensor) -> Result<LatentDistribution> {
        let mut moments = self.encoder.forward(images)?;
        if let Some(q) = &self.quant_conv {
            moments = q.forward(&moments)?;
        }
        let l = self.config.latent_channels;
        let mean = moments.narrow(1, 0, l)?;
        let logvar = moments.narrow(1, l, l)?.clamp(-30f32, 20f32)?;
        let std = (logvar * 0.5)?.exp()?;
        Ok(LatentDistribution { mean, std })
    }

    /// Decodes unscaled latents to images in roughly [−1, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let latents = match &self.post_quant_conv {
            Some(q) => q.forward(latents)?,
            None => latents.clone(),
        };
        self.decoder.forward(&latents)
    }
}
