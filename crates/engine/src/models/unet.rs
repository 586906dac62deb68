//! `UNet2DConditionModel`: the noise predictor, built block by block from `unet/config.json`.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::attention::SpatialTransformer;
use super::layers::{
    self, conv2d, conv2d_with, group_norm, group_norm_silu, Bf16Conv, Conv2d, GroupNorm, Linear,
};
use super::resnet::ResnetBlock;
use super::tome::TokenMerging;
use crate::config::UNetConfig;

/// Sinusoidal embeddings (n, dim) of `values` (timesteps, or SDXL's time ids), computed in float32 as
/// diffusers' `get_timestep_embedding` does.
fn sinusoidal_embedding(
    values: &[f64],
    dim: usize,
    flip_sin_to_cos: bool,
    shift: f64,
    device: &Device,
) -> Result<Tensor> {
    let half = dim / 2;
    let mut rows = Vec::with_capacity(values.len() * half * 2);
    for &value in values {
        let t = value as f32;
        let mut sin = Vec::with_capacity(half);
        let mut cos = Vec::with_capacity(half);
        for i in 0..half {
            let exponent = -(10000f32.ln()) * i as f32 / (half as f32 - shift as f32);
            let arg = t * exponent.exp();
            sin.push(arg.sin());
            cos.push(arg.cos());
        }
        if flip_sin_to_cos {
            rows.extend(cos.into_iter().chain(sin));
        } else {
            rows.extend(sin.into_iter().chain(cos));
        }
    }
    Tensor::from_vec(rows, (values.len(), half * 2), device)
}

/// SDXL's extra conditioning of one UNet call, one row per batch entry: the pooled, projected text
/// embedding and the micro-conditioning ids (original size, crop top-left, then target size or an
/// aesthetic score).
#[derive(Debug, Clone)]
pub struct AddedConditions {
    /// (batch, projection width) pooled text embeddings.
    pub text_embeds: Tensor,
    /// The time ids of each batch entry (6 for a base model, 5 for a refiner).
    pub time_ids: Vec<Vec<f64>>,
}

/// SDXL's `add_embedding`: [pooled text embedding, sinusoidal embeddings of the time ids] through two
/// linear layers, added to the time embedding.
#[derive(Debug)]
struct AddEmbedding {
    time_dim: usize,
    linear_1: Linear,
    linear_2: Linear,
}

/// Per-call options of [`UNet::forward_with`].
#[derive(Debug, Default)]
pub struct UNetOptions {
    /// Token merging in the transformer blocks (tomesd); its generator advances with every merged block, so
    /// one value is kept for all the UNet calls of a generation.
    pub tome: Option<TokenMerging>,
}

/// One down block: ResNets, optional spatial transformers, optional stride-2 down-sampling.
#[derive(Debug)]
struct DownBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
    downsampler: Option<Conv2d>,
}

/// One up block: ResNets reading the skip connections, optional transformers, optional up-sampling.
#[derive(Debug)]
struct UpBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
    upsampler: Option<Conv2d>,
}

/// The middle: ResNet, transformer, ResNet.
#[derive(Debug)]
struct MidBlock {
    resnet0: ResnetBlock,
    attention: SpatialTransformer,
    resnet1: ResnetBlock,
}

/// The conditional UNet of Stable Diffusion 1.x / 2.x (and InstructPix2Pix's 8-channel variant).
#[derive(Debug)]
pub struct UNet {
    config: UNetConfig,
    conv_in: Conv2d,
    time_linear_1: Linear,
    time_linear_2: Linear,
    add_embedding: Option<AddEmbedding>,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<MidBlock>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet {
    /// Builds the UNet that `config` describes from weights under `vb` (diffusers names).
    pub fn new(config: &UNetConfig, vb: VarBuilder) -> Result<Self> {
        config.validate().map_err(candle_core::Error::msg)?;
        let ch = &config.block_out_channels;
        let n = ch.len();
        let heads = config.heads();
        let layers = config.layers_per_block.expand(n);
        let depth = config.transformer_layers_per_block.expand(n);
        let groups = config.norm_num_groups;
        let eps = config.norm_eps;
        let temb = ch[0] * 4;
        let context = config.cross_attention_dim;
        let linear = config.use_linear_projection;
        let transformer = |c: usize, i: usize, vb: VarBuilder| {
            SpatialTransformer::new(c, heads[i], depth[i], context, groups, linear, vb)
        };
        // Every UNet resnet: the time embedding, and Winograd for its 3×3 convolutions in bf16.
        let resnet = |c_in: usize, c_out: usize, vb: VarBuilder| {
            ResnetBlock::new(c_in, c_out, Some(temb), groups, eps, Bf16Conv::Winograd, vb)
        };

        let conv_in = conv2d(
            config.in_channels,
            ch[0],
            config.conv_in_kernel,
            1,
            config.conv_in_kernel / 2,
            vb.pp("conv_in"),
        )?;
        let time_linear_1 = layers::linear(ch[0], temb, vb.pp("time_embedding.linear_1"))?;
        let time_linear_2 = layers::linear(temb, temb, vb.pp("time_embedding.linear_2"))?;
        let add_embedding = match (
            config.is_sdxl(),
            config.addition_time_embed_dim,
            config.projection_class_embeddings_input_dim,
        ) {
            (true, Some(time_dim), Some(input)) => Some(AddEmbedding {
                time_dim,
                linear_1: layers::linear(input, temb, vb.pp("add_embedding.linear_1"))?,
                linear_2: layers::linear(temb, temb, vb.pp("add_embedding.linear_2"))?,
            }),
            _ => None,
        };

        let mut down_blocks = Vec::with_capacity(n);
        for i in 0..n {
            let vb = vb.pp(format!("down_blocks.{i}"));
            let in_ch = if i == 0 { ch[0] } else { ch[i - 1] };
            let out_ch = ch[i];
            let cross = config.down_block_types[i] == "CrossAttnDownBlock2D";
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..layers[i] {
                let rin = if j == 0 { in_ch } else { out_ch };
                let rvb = vb.pp(format!("resnets.{j}"));
                resnets.push(resnet(rin, out_ch, rvb)?);
                if cross {
                    attentions.push(transformer(out_ch, i, vb.pp(format!("attentions.{j}")))?);
                }
            }
            let downsampler = if i + 1 < n {
                let dvb = vb.pp("downsamplers.0.conv");
                Some(conv2d(
                    out_ch,
                    out_ch,
                    3,
                    2,
                    config.downsample_padding,
                    dvb,
                )?)
            } else {
                None
            };
            down_blocks.push(DownBlock {
                resnets,
                attentions,
                downsampler,
            });
        }

        let mid_block = match config.mid_block_type {
            Some(_) => {
                let vb = vb.pp("mid_block");
                let c = ch[n - 1];
                Some(MidBlock {
                    resnet0: resnet(c, c, vb.pp("resnets.0"))?,
                    attention: transformer(c, n - 1, vb.pp("attentions.0"))?,
                    resnet1: resnet(c, c, vb.pp("resnets.1"))?,
                })
            }
            None => None,
        };

        let mut up_blocks = Vec::with_capacity(n);
        let mut out_ch = ch[n - 1];
        for i in 0..n {
            let vb = vb.pp(format!("up_blocks.{i}"));
            let level = n - 1 - i;
            let prev_out = out_ch;
            out_ch = ch[level];
            let in_ch = ch[level.saturating_sub(1)];
            let cross = config.up_block_types[i] == "CrossAttnUpBlock2D";
            let num = layers[level] + 1;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..num {
                let skip = if j == num - 1 { in_ch } else { out_ch };
                let rin = if j == 0 { prev_out } else { out_ch };
                let rvb = vb.pp(format!("resnets.{j}"));
                resnets.push(resnet(rin + skip, out_ch, rvb)?);
                if cross {
                    attentions.push(transformer(
                        out_ch,
                        level,
                        vb.pp(format!("attentions.{j}")),
                    )?);
                }
            }
            let upsampler = if i + 1 < n {
                Some(conv2d_with(
                    out_ch,
                    out_ch,
                    3,
                    1,
                    1,
                    Bf16Conv::Winograd,
                    vb.pp("upsamplers.0.conv"),
                )?)
            } else {
                None
            };
            up_blocks.push(UpBlock {
                resnets,
                attentions,
                upsampler,
            });
        }

        Ok(UNet {
            config: config.clone(),
            conv_in,
            time_linear_1,
            time_linear_2,
            add_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: group_norm(groups, ch[0], eps, vb.pp("conv_norm_out"))?,
            conv_out: conv2d_with(
                ch[0],
                config.out_channels,
                config.conv_out_kernel,
                1,
                config.conv_out_kernel / 2,
                Bf16Conv::Winograd,
                vb.pp("conv_out"),
            )?,
        })
    }

    /// The config this UNet was built from.
    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// Predicts the noise (or v) for latents `xs` (b, in_channels, h, w) at `timestep`, conditioned on the text
    /// embeddings `context` (b, tokens, cross_attention_dim). Any latent size works: up-sampling follows the
    /// skip connections' sizes as diffusers does for sizes that are not a multiple of 2^(blocks − 1).
    /// SD 1/2 only: an SDXL UNet needs [`UNet::forward_with`] and its added conditions.
    pub fn forward(&self, xs: &Tensor, timestep: f64, context: &Tensor) -> Result<Tensor> {
        self.forward_with(xs, timestep, context, None, &mut UNetOptions::default())
    }

    /// [`UNet::forward`] with SDXL's added conditions (required by, and only accepted by, an SDXL UNet) and
    /// options (token merging).
    pub fn forward_with(
        &self,
        xs: &Tensor,
        timestep: f64,
        context: &Tensor,
        added: Option<&AddedConditions>,
        options: &mut UNetOptions,
    ) -> Result<Tensor> {
        let (batch, _, latent_h, latent_w) = xs.dims4()?;
        let mut tome = options.tome.as_mut();
        if let Some(tome) = tome.as_deref_mut() {
            tome.set_latent_size(latent_h, latent_w);
        }
        let dtype = xs.dtype();
        let t_emb = sinusoidal_embedding(
            &[timestep],
            self.config.block_out_channels[0],
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
            xs.device(),
        )?
        .to_dtype(dtype)?;
        let emb = self
            .time_linear_2
            .forward(&self.time_linear_1.forward(&t_emb)?.silu()?)?
            .broadcast_as((batch, self.config.block_out_channels[0] * 4))?
            .contiguous()?;
        let emb = match (&self.add_embedding, added) {
            (None, None) => emb,
            (Some(add), Some(added)) => (emb + self.added_embedding(add, added, batch, dtype)?)?,
            (Some(_), None) => {
                candle_core::bail!("an SDXL UNet needs the pooled text embedding and time ids")
            }
            (None, Some(_)) => candle_core::bail!("this UNet takes no added conditions"),
        };
        let emb = Some(&emb);

        let mut h = self.conv_in.forward(xs)?;
        let mut skips = vec![h.clone()];
        for block in &self.down_blocks {
            for (j, resnet) in block.resnets.iter().enumerate() {
                h = resnet.forward(&h, emb)?;
                if let Some(attn) = block.attentions.get(j) {
                    h = attn.forward(&h, context, tome.as_deref_mut())?;
                }
                skips.push(h.clone());
            }
            if let Some(down) = &block.downsampler {
                h = down.forward(&h)?;
                skips.push(h.clone());
            }
        }
        if let Some(mid) = &self.mid_block {
            h = mid.resnet0.forward(&h, emb)?;
            h = mid.attention.forward(&h, context, tome.as_deref_mut())?;
            h = mid.resnet1.forward(&h, emb)?;
        }
        for block in &self.up_blocks {
            for (j, resnet) in block.resnets.iter().enumerate() {
                let skip = skips.pop().expect("one skip per up-block resnet");
                h = resnet.forward(&Tensor::cat(&[&h, &skip], 1)?, emb)?;
                if let Some(attn) = block.attentions.get(j) {
                    h = attn.forward(&h, context, tome.as_deref_mut())?;
                }
            }
            if let Some(up) = &block.upsampler {
                let (_, _, sh, sw) = skips
                    .last()
                    .expect("skip left for the next block")
                    .dims4()?;
                let (_, _, hh, ww) = h.dims4()?;
                h = if (sh, sw) == (2 * hh, 2 * ww) {
                    up.forward_upsampled(&h)?
                } else {
                    up.forward(&h.upsample_nearest2d(sh, sw)?)?
                };
            }
        }
        let h = group_norm_silu(&self.conv_norm_out, &h)?;
        self.conv_out.forward(&h)
    }

    /// SDXL's `aug_emb`: the add embedding of [pooled text embedding, time-id embeddings] (batch, temb).
    fn added_embedding(
        &self,
        add: &AddEmbedding,
        added: &AddedConditions,
        batch: usize,
        dtype: DType,
    ) -> Result<Tensor> {
        if added.time_ids.len() != batch || added.text_embeds.dim(0)? != batch {
            candle_core::bail!(
                "added conditions for {} / {} batch entries, latents have {batch}",
                added.time_ids.len(),
                added.text_embeds.dim(0)?
            );
        }
        let ids: Vec<f64> = added.time_ids.iter().flatten().copied().collect();
        let time_embeds = sinusoidal_embedding(
            &ids,
            add.time_dim,
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
            added.text_embeds.device(),
        )?
        .reshape((batch, ()))?;
        let input = Tensor::cat(&[added.text_embeds.to_dtype(DType::F32)?, time_embeds], 1)?
            .to_dtype(dtype)?;
        add.linear_2.forward(&add.linear_1.forward(&input)?.silu()?)
    }

    /// The dtype the weights were loaded in.
    pub fn dtype(&self) -> DType {
        self.conv_in.dtype()
    }
}
