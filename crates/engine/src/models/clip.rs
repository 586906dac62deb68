//! The CLIP text encoder (transformers' `CLIPTextModel`) with A1111-style clip skip.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, LayerNorm, VarBuilder};

use super::layers::Linear;

use crate::config::ClipTextConfig;
use crate::kernels;

/// The MLP activation the config names (quick GELU for OpenAI CLIP, exact GELU for OpenCLIP).
pub(crate) use kernels::activation::Kind as Activation;

/// Applies `activation` to `xs`: the fused kernel for f32 CPU tensors, candle's ops otherwise.
fn activate(activation: Activation, xs: &Tensor) -> Result<Tensor> {
    if kernels::accepts(xs) {
        return kernels::activation::activation(xs, activation);
    }
    match activation {
        Activation::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
        Activation::Gelu => xs.gelu_erf(),
    }
}

/// A linear layer with a bias, always in f32 (see [`super::layers::linear_f32`]), its weights packed once
/// when `pack_once` (see [`Linear::packed_once`]).
fn f32_linear(in_dim: usize, out_dim: usize, pack_once: bool, vb: VarBuilder) -> Result<Linear> {
    let layer = super::layers::linear_f32(in_dim, out_dim, vb)?;
    Ok(if pack_once {
        layer.packed_once()
    } else {
        layer
    })
}

/// Text encoders up to this width keep their linear weights packed (CLIP-L, OpenCLIP-H: +0.35 / +1.3 GB for
/// about half the encoding time); wider ones (SDXL's ViT-bigG, 2.8 GB of weights) pack per call instead, so
/// that the copy does not raise an SDXL model's peak memory above PyTorch's.
const PACK_ONCE_UP_TO: usize = 1024;

/// The additive causal mask (1, 1, n, n): 0 on and below the diagonal, the lowest f32 above it.
fn causal_mask(n: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..n)
        .flat_map(|i| (0..n).map(move |j| if j > i { f32::MIN } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (1, 1, n, n), device)
}

/// One pre-norm transformer layer with self-attention (causal for the text encoder, unmasked for the vision
/// tower).
#[derive(Debug)]
pub(crate) struct EncoderLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    activation: Activation,
}

impl EncoderLayer {
    fn new(cfg: &ClipTextConfig, activation: Activation, vb: VarBuilder) -> Result<Self> {
        Self::with_sizes(
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_attention_heads,
            cfg.layer_norm_eps,
            activation,
            cfg.hidden_size <= PACK_ONCE_UP_TO,
            vb,
        )
    }

    /// Builds a layer of width `h` with an MLP of width `intermediate` and `heads` attention heads from
    /// transformers-named weights under `vb` (`layer_norm1`, `self_attn.{q,k,v,out}_proj`, `layer_norm2`,
    /// `mlp.fc1`, `mlp.fc2`); `pack_once` keeps the linear weights packed (see [`Linear::packed_once`]).
    pub(crate) fn with_sizes(
        h: usize,
        intermediate: usize,
        heads: usize,
        layer_norm_eps: f64,
        activation: Activation,
        pack_once: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let attn = vb.pp("self_attn");
        Ok(EncoderLayer {
            layer_norm1: candle_nn::layer_norm(h, layer_norm_eps, vb.pp("layer_norm1"))?,
            q_proj: f32_linear(h, h, pack_once, attn.pp("q_proj"))?,
            k_proj: f32_linear(h, h, pack_once, attn.pp("k_proj"))?,
            v_proj: f32_linear(h, h, pack_once, attn.pp("v_proj"))?,
            out_proj: f32_linear(h, h, pack_once, attn.pp("out_proj"))?,
            layer_norm2: candle_nn::layer_norm(h, layer_norm_eps, vb.pp("layer_norm2"))?,
            fc1: f32_linear(h, intermediate, pack_once, vb.pp("mlp.fc1"))?,
            fc2: f32_linear(intermediate, h, pack_once, vb.pp("mlp.fc2"))?,
            heads,
            activation,
        })
    }

    fn attention(&self, xs: &Tensor, causal: bool) -> Result<Tensor> {
        let (b, n, h) = xs.dims3()?;
        let d = h / self.heads;
        if kernels::accepts(xs) {
            let out = kernels::attention::attention_masked(
                &self.q_proj.forward(xs)?,
                &self.k_proj.forward(xs)?,
                &self.v_proj.forward(xs)?,
                self.heads,
                causal,
            )?;
            return self.out_proj.forward(&out);
        }
        let split = |t: Tensor| -> Result<Tensor> {
            t.reshape((b, n, self.heads, d))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split((self.q_proj.forward(xs)? * (1.0 / (d as f64).sqrt()))?)?;
        let k = split(self.k_proj.forward(xs)?)?;
        let v = split(self.v_proj.forward(xs)?)?;
        let scores = q.matmul(&k.t()?)?;
        let scores = if causal {
            scores.broadcast_add(&causal_mask(n, xs.device())?.to_dtype(scores.dtype())?)?
        } else {
            scores
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, h))?;
        self.out_proj.forward(&out)
    }

    /// One layer over hidden states (b, tokens, hidden); `causal` for the text encoder (token i attends to
    /// tokens 0..=i), not for the vision tower.
    pub(crate) fn forward(&self, xs: &Tensor, causal: bool) -> Result<Tensor> {
        let xs = (self.attention(&self.layer_norm1.forward(xs)?, causal)? + xs)?;
        let h = activate(
            self.activation,
            &self.fc1.forward(&self.layer_norm2.forward(&xs)?)?,
        )?;
        self.fc2.forward(&h)? + xs
    }
}

/// The text encoder: token + position embeddings, causal transformer layers, final layer norm.
#[derive(Debug)]
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    /// `CLIPTextModelWithProjection`'s projection of the pooled output (SDXL's second encoder).
    text_projection: Option<Linear>,
    config: ClipTextConfig,
}

impl ClipTextModel {
    /// Builds the encoder that `config` describes from transformers-named weights under `vb`
    /// (the `text_model.` prefix is added here).
    /// With a `projection_dim` in the config and a `text_projection.weight` beside `text_model.`, the
    /// pooled-output projection is loaded too (`CLIPTextModelWithProjection`).
    pub fn new(config: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        config.validate().map_err(candle_core::Error::msg)?;
        let text_projection = match config.projection_dim {
            Some(dim) if vb.contains_tensor("text_projection.weight") => {
                Some(super::layers::linear_f32_no_bias(
                    config.hidden_size,
                    dim,
                    vb.pp("text_projection"),
                )?)
            }
            _ => None,
        };
        let activation = match config.hidden_act.as_str() {
            "gelu" => Activation::Gelu,
            _ => Activation::QuickGelu,
        };
        let vb = vb.pp("text_model");
        let emb = vb.pp("embeddings");
        let h = config.hidden_size;
        let layers = (0..config.num_hidden_layers)
            .map(|i| EncoderLayer::new(config, activation, vb.pp(format!("encoder.layers.{i}"))))
            .collect::<Result<_>>()?;
        Ok(ClipTextModel {
            token_embedding: candle_nn::embedding(config.vocab_size, h, emb.pp("token_embedding"))?,
            position_embedding: candle_nn::embedding(
                config.max_position_embeddings,
                h,
                emb.pp("position_embedding"),
            )?,
            layers,
            final_layer_norm: candle_nn::layer_norm(
                h,
                config.layer_norm_eps,
                vb.pp("final_layer_norm"),
            )?,
            text_projection,
            config: config.clone(),
        })
    }

    /// The config this encoder was built from.
    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// The most clip skip this encoder allows: every layer skipped leaves the embeddings.
    pub fn max_clip_skip(&self) -> usize {
        self.layers.len() + 1
    }

    /// Encodes token ids (b, tokens) to hidden states (b, tokens, hidden). `clip_skip` follows AUTOMATIC1111:
    /// 1 is the last layer, 2 the penultimate one, …; the final layer norm is applied to the chosen layer's
    /// output, as diffusers does.
    pub fn forward(&self, ids: &Tensor, clip_skip: usize) -> Result<Tensor> {
        self.forward_embeds(&self.embed_tokens(ids)?, clip_skip)
    }

    /// The token embeddings (b, tokens, hidden) of token ids (b, tokens), before position embeddings.
    pub fn embed_tokens(&self, ids: &Tensor) -> Result<Tensor> {
        self.token_embedding.forward(ids)
    }

    /// Like [`Self::forward`] from token embeddings (b, tokens, hidden) instead of ids, so that some of them
    /// can be replaced (textual inversion); position embeddings are added here.
    pub fn forward_embeds(&self, token_embeds: &Tensor, clip_skip: usize) -> Result<Tensor> {
        if clip_skip == 0 || clip_skip > self.max_clip_skip() {
            candle_core::bail!(
                "clip_skip must be between 1 and {} for this text encoder",
                self.max_clip_skip()
            );
        }
        let mut xs = self.with_positions(token_embeds)?;
        let keep = self.layers.len() + 1 - clip_skip;
        for layer in &self.layers[..keep] {
            xs = layer.forward(&xs, true)?;
        }
        self.final_layer_norm.forward(&xs)
    }

    /// Token embeddings (b, tokens, hidden) plus the position embeddings of their places.
    fn with_positions(&self, token_embeds: &Tensor) -> Result<Tensor> {
        let (_, n, _) = token_embeds.dims3()?;
        let positions = Tensor::arange(0u32, n as u32, token_embeds.device())?.unsqueeze(0)?;
        token_embeds.broadcast_add(&self.position_embedding.forward(&positions)?)
    }

    /// Whether the pooled output has its projection (SDXL's second encoder).
    pub fn has_projection(&self) -> bool {
        self.text_projection.is_some()
    }

    /// The most clip skip SDXL's use of this encoder allows: it starts from the penultimate layer, so every
    /// layer skipped leaves the embeddings one step sooner.
    pub fn max_sdxl_clip_skip(&self) -> usize {
        self.layers.len()
    }

    /// SDXL's use of the encoder: the hidden states (b, tokens, hidden) `clip_skip` layers before the last
    /// one (clip skip 1 = the penultimate layer, diffusers' `hidden_states[-(clip_skip + 1)]`), without the
    /// final layer norm; and, when the encoder has its projection, the pooled output: the final-layer-normed
    /// last hidden state at `eos_position`, projected (b, projection width).
    pub fn forward_sdxl(
        &self,
        token_embeds: &Tensor,
        clip_skip: usize,
        eos_position: usize,
    ) -> Result<(Tensor, Option<Tensor>)> {
        if clip_skip == 0 || clip_skip > self.max_sdxl_clip_skip() {
            candle_core::bail!(
                "clip_skip must be between 1 and {} for this text encoder",
                self.max_sdxl_clip_skip()
            );
        }
        let mut xs = self.with_positions(token_embeds)?;
        let keep = self.layers.len() - clip_skip;
        let mut hidden = xs.clone();
        let run = if self.text_projection.is_some() {
            self.layers.len()
        } else {
            keep
        };
        for (i, layer) in self.layers[..run].iter().enumerate() {
            xs = layer.forward(&xs, true)?;
            if i + 1 == keep {
                hidden = xs.clone();
            }
        }
        let pooled = match &self.text_projection {
            Some(projection) => {
                let last = self.final_layer_norm.forward(&xs)?;
                Some(projection.forward(&last.narrow(1, eos_position, 1)?.squeeze(1)?)?)
            }
            None => None,
        };
        Ok((hidden, pooled))
    }

    /// The dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.token_embedding.embeddings().dtype()
    }
}
