//! Attention as the UNet and VAE use it: multi-head (cross-)attention, the GEGLU feed-forward, the
//! transformer block, and the spatial transformer that wraps them around a feature map.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{LayerNorm, VarBuilder};

use crate::kernels;

use super::layers::{self, conv2d, group_norm, linear_maybe_conv, Conv2d, GroupNorm, Linear};
use super::tome::{BlockStage, TokenMerging};

/// softmax(q kᵀ · scale) v over `heads` heads; q is (b, n, heads·d), k and v are (b, m, heads·d).
/// Scores are computed in float32 whatever the input type (diffusers' upcast, harmless in fp32). On the
/// CPU this is [`kernels::attention::attention`], which never holds the whole score matrix.
pub fn scaled_dot_product(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    if q.device().is_cpu() {
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        return kernels::attention::attention(&f32(q)?, &f32(k)?, &f32(v)?, heads)?
            .to_dtype(q.dtype());
    }
    let (b, n, inner) = q.dims3()?;
    let m = k.dim(1)?;
    let d = inner / heads;
    let dtype = q.dtype();
    let split = |t: &Tensor, len: usize| -> Result<Tensor> {
        t.reshape((b, len, heads, d))?
            .transpose(1, 2)?
            .reshape((b * heads, len, d))?
            .to_dtype(DType::F32)?
            .contiguous()
    };
    let (q, k, v) = (split(q, n)?, split(k, m)?, split(v, m)?);
    let scale = 1.0 / (d as f64).sqrt();
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    probs
        .matmul(&v)?
        .reshape((b, heads, n, d))?
        .transpose(1, 2)?
        .reshape((b, n, inner))?
        .to_dtype(dtype)
}

/// diffusers' `Attention` with separate q/k/v projections (no bias in the UNet) and one output projection.
#[derive(Debug)]
pub struct CrossAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

impl CrossAttention {
    /// Loads an attention over `query_dim` features with `heads` heads of `head_dim`, reading keys and values
    /// from `context_dim` features (self-attention when it equals `query_dim`).
    pub fn new(
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        Ok(CrossAttention {
            to_q: layers::linear_no_bias(query_dim, inner, vb.pp("to_q"))?,
            to_k: layers::linear_no_bias(context_dim, inner, vb.pp("to_k"))?,
            to_v: layers::linear_no_bias(context_dim, inner, vb.pp("to_v"))?,
            to_out: layers::linear(inner, query_dim, vb.pp("to_out").pp("0"))?,
            heads,
        })
    }

    /// Attends from `xs` (b, n, query_dim) to `context` (b, m, context_dim), or to itself.
    pub fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let context = context.unwrap_or(xs);
        let q = self.to_q.forward(xs)?;
        let k = self.to_k.forward(context)?;
        let v = self.to_v.forward(context)?;
        self.to_out
            .forward(&scaled_dot_product(&q, &k, &v, self.heads)?)
    }
}

/// The GEGLU feed-forward: a projection to twice the inner width, one half gating the other through GELU.
#[derive(Debug)]
struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        let inner = dim * 4;
        Ok(FeedForward {
            proj: layers::linear(dim, inner * 2, vb.pp("net.0.proj"))?,
            out: layers::linear(inner, dim, vb.pp("net.2"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.proj.forward(xs)?;
        if kernels::accepts(&h) {
            return self.out.forward(&kernels::geglu::geglu(&h)?);
        }
        let half = h.dim(D::Minus1)? / 2;
        let value = h.narrow(D::Minus1, 0, half)?;
        let gate = h.narrow(D::Minus1, half, half)?.gelu_erf()?;
        self.out.forward(&(value * gate)?)
    }
}

/// `BasicTransformerBlock`: self-attention, cross-attention to the text, feed-forward; pre-norm, residual.
#[derive(Debug)]
struct TransformerBlock {
    norm1: LayerNorm,
    attn1: CrossAttention,
    norm2: LayerNorm,
    attn2: CrossAttention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl TransformerBlock {
    fn new(
        dim: usize,
        heads: usize,
        head_dim: usize,
        context_dim: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(TransformerBlock {
            norm1: candle_nn::layer_norm(dim, 1e-5, vb.pp("norm1"))?,
            attn1: CrossAttention::new(dim, dim, heads, head_dim, vb.pp("attn1"))?,
            norm2: candle_nn::layer_norm(dim, 1e-5, vb.pp("norm2"))?,
            attn2: CrossAttention::new(dim, context_dim, heads, head_dim, vb.pp("attn2"))?,
            norm3: candle_nn::layer_norm(dim, 1e-5, vb.pp("norm3"))?,
            ff: FeedForward::new(dim, vb.pp("ff"))?,
        })
    }

    /// Runs the block on `xs` (b, h·w, dim). With token merging, the matching is computed once from the
    /// block's input (tomesd's metric) and wraps the operations the settings name.
    fn forward(
        &self,
        xs: &Tensor,
        context: &Tensor,
        tome: Option<&mut TokenMerging>,
        grid: (usize, usize),
    ) -> Result<Tensor> {
        let merge = match tome {
            Some(tome) => tome.plan(xs, grid)?,
            None => None,
        };
        let wrapped = |stage: BlockStage,
                       input: Tensor,
                       op: &dyn Fn(&Tensor) -> Result<Tensor>|
         -> Result<Tensor> {
            match merge.as_ref().filter(|m| m.applies(stage)) {
                Some(m) => m.plan().unmerge(&op(&m.plan().merge(&input)?)?),
                None => op(&input),
            }
        };
        let attn1 = wrapped(BlockStage::SelfAttention, self.norm1.forward(xs)?, &|t| {
            self.attn1.forward(t, None)
        })?;
        let xs = (attn1 + xs)?;
        let attn2 = wrapped(BlockStage::CrossAttention, self.norm2.forward(&xs)?, &|t| {
            self.attn2.forward(t, Some(context))
        })?;
        let xs = (attn2 + xs)?;
        let ff = wrapped(BlockStage::FeedForward, self.norm3.forward(&xs)?, &|t| {
            self.ff.forward(t)
        })?;
        ff + xs
    }
}

/// How a spatial transformer moves between the feature map and the token sequence.
#[derive(Debug)]
enum Projection {
    /// SD 1.x: 1×1 convolutions on the feature map.
    Conv(Conv2d),
    /// SD 2.x (`use_linear_projection`): linear layers on the token sequence.
    Linear(Linear),
}

/// `Transformer2DModel`: group norm, projection in, transformer blocks over the h·w tokens, projection out,
/// residual.
#[derive(Debug)]
pub struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<TransformerBlock>,
    proj_out: Projection,
    inner: usize,
}

impl SpatialTransformer {
    /// Loads a transformer over `channels` features with `heads` heads and `depth` blocks.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        channels: usize,
        heads: usize,
        depth: usize,
        context_dim: usize,
        groups: usize,
        linear_projection: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let head_dim = channels / heads;
        let inner = heads * head_dim;
        let (proj_in, proj_out) = if linear_projection {
            (
                Projection::Linear(layers::linear(channels, inner, vb.pp("proj_in"))?),
                Projection::Linear(layers::linear(inner, channels, vb.pp("proj_out"))?),
            )
        } else {
            (
                Projection::Conv(conv2d(channels, inner, 1, 1, 0, vb.pp("proj_in"))?),
                Projection::Conv(conv2d(inner, channels, 1, 1, 0, vb.pp("proj_out"))?),
            )
        };
        let blocks = (0..depth)
            .map(|i| {
                TransformerBlock::new(
                    inner,
                    heads,
                    head_dim,
                    context_dim,
                    vb.pp(format!("transformer_blocks.{i}")),
                )
            })
            .collect::<Result<_>>()?;
        Ok(SpatialTransformer {
            norm: group_norm(groups, channels, 1e-6, vb.pp("norm"))?,
            proj_in,
            blocks,
            proj_out,
            inner,
        })
    }

    /// Applies the transformer to a (b, c, h, w) feature map, attending to `context` (b, tokens, dim),
    /// merging tokens inside its blocks when `tome` is given.
    pub fn forward(
        &self,
        xs: &Tensor,
        context: &Tensor,
        mut tome: Option<&mut TokenMerging>,
    ) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let normed = self.norm.forward(xs)?;
        let to_tokens = |t: &Tensor, ch: usize| -> Result<Tensor> {
            t.permute((0, 2, 3, 1))?.reshape((b, h * w, ch))
        };
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(&conv.forward(&normed)?, self.inner)?,
            Projection::Linear(lin) => lin.forward(&to_tokens(&normed, c)?)?,
        };
        for block in &self.blocks {
            tokens = block.forward(&tokens, context, tome.as_deref_mut(), (h, w))?;
        }
        let to_map = |t: &Tensor, ch: usize| -> Result<Tensor> {
            t.reshape((b, h, w, ch))?
                .permute((0, 3, 1, 2))?
                .contiguous()
        };
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&to_map(&tokens, self.inner)?)?,
            Projection::Linear(lin) => to_map(&lin.forward(&tokens)?, c)?,
        };
        out + xs
    }
}

/// The VAE's single-head self-attention over the pixels of its mid block (new or old diffusers key names).
#[derive(Debug)]
pub struct VaeAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl VaeAttention {
    /// Loads the attention over `channels` features.
    pub fn new(channels: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        let old = vb.contains_tensor("query.weight");
        let name = |new: &'static str, legacy: &'static str| if old { legacy } else { new };
        Ok(VaeAttention {
            group_norm: group_norm(groups, channels, 1e-6, vb.pp("group_norm"))?,
            to_q: linear_maybe_conv(channels, channels, true, vb.pp(name("to_q", "query")))?,
            to_k: linear_maybe_conv(channels, channels, true, vb.pp(name("to_k", "key")))?,
            to_v: linear_maybe_conv(channels, channels, true, vb.pp(name("to_v", "value")))?,
            to_out: linear_maybe_conv(
                channels,
                channels,
                true,
                vb.pp(name("to_out.0", "proj_attn")),
            )?,
        })
    }

    /// Applies attention and the residual to a (b, c, h, w) feature map.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let tokens = self
            .group_norm
            .forward(xs)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            // candle 0.11's batched matmul mis-reads a transposed left operand when batch > 1.
            .contiguous()?;
        let q = self.to_q.forward(&tokens)?;
        let k = self.to_k.forward(&tokens)?;
        let v = self.to_v.forward(&tokens)?;
        let out = self.to_out.forward(&scaled_dot_product(&q, &k, &v, 1)?)?;
        let out = out.transpose(1, 2)?.reshape((b, c, h, w))?;
        out + xs
    }
}
