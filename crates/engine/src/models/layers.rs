//! Small building blocks shared by the networks: convolutions, norms and activations as SD uses them.

use std::sync::{Arc, OnceLock};

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use half::bf16;

use crate::kernels;

/// A copy of a layer's weights in the order a product reads them (bf16 for the bf16 products, or f32 panels for
/// [`kernels::sgemm`]), made on first use (so runs that never take that path never pay for it) and
/// shared by clones of the layer.
#[derive(Debug)]
struct PackedWeights<T>(Arc<OnceLock<T>>);

impl<T> Clone for PackedWeights<T> {
    fn clone(&self) -> Self {
        PackedWeights(self.0.clone())
    }
}

impl<T> Default for PackedWeights<T> {
    fn default() -> Self {
        PackedWeights(Arc::default())
    }
}

impl<T> PackedWeights<T> {
    fn get_or_pack(&self, pack: impl FnOnce() -> Result<T>) -> Result<&T> {
        if let Some(packed) = self.0.get() {
            return Ok(packed);
        }
        let packed = pack()?;
        Ok(self.0.get_or_init(|| packed))
    }
}

/// The weights of a convolution or linear layer: f32 (with a bf16 copy packed on first use if bf16
/// products are on by then), or, for a layer built while bf16 products were on, the bf16 copy alone:
/// such a layer always multiplies in bf16 and the f32 weights are not kept (half the memory of the
/// bf16 copy beside them; see [`bf16_only`]).
#[derive(Debug)]
enum Weights<P> {
    F32 {
        weight: Tensor,
        bf16: PackedWeights<P>,
    },
    Bf16(Arc<P>),
}

impl<P> Weights<P> {
    /// f32 weights, with no bf16 copy packed yet.
    fn f32(weight: Tensor) -> Self {
        Weights::F32 {
            weight,
            bf16: PackedWeights::default(),
        }
    }
}

impl<P> Clone for Weights<P> {
    fn clone(&self) -> Self {
        match self {
            Weights::F32 { weight, bf16 } => Weights::F32 {
                weight: weight.clone(),
                bf16: bf16.clone(),
            },
            Weights::Bf16(packed) => Weights::Bf16(packed.clone()),
        }
    }
}

/// Whether a layer with these f32 `weight`s, built now, keeps only their bf16 copy: bf16 products are
/// on (`--precision bf16`, set per process before models load) and the weights are f32 on the CPU.
fn bf16_only(weight: &Tensor) -> bool {
    kernels::bf16_products() && kernels::accepts(weight)
}

/// How a convolution multiplies when bf16 products are on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bf16Conv {
    /// Every tap by every input channel, as in f32 (each product rounds its two inputs once).
    Direct,
    /// 3×3 stride-1 convolutions by Winograd's F(2×2, 3×3) ([`kernels::winograd_bf16`]) where it
    /// fits: 2.25× fewer products for about 1.7× the rounding error of `Direct`. The UNet's choice,
    /// where the time is; the VAE stays `Direct` (its encoder's error goes straight into an img2img's
    /// latents, which the tiny pipelines' bf16 test showed to be the sensitive place).
    Winograd,
}

/// A 2-D convolution with a bias. Convolutions of f32 CPU tensors run through
/// [`kernels::conv::conv2d`] (in bf16 when bf16 products are on); everything else through
/// candle's own convolution.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weights: Weights<kernels::conv::Bf16ConvWeights>,
    bias: Tensor,
    config: Conv2dConfig,
    bf16: Bf16Conv,
}

impl Conv2d {
    /// A convolution with f32 `weight` (c_out, c_in, kh, kw) and `bias` (c_out), as it is to run in
    /// this process (keeping only a bf16 copy of the weights when bf16 products are on).
    fn new(weight: Tensor, bias: Tensor, config: Conv2dConfig, bf16: Bf16Conv) -> Result<Self> {
        let weights = if bf16_only(&weight) && config.dilation == 1 && config.groups == 1 {
            Weights::Bf16(Arc::new(pack_bf16(&weight, config.stride, bf16)?))
        } else {
            Weights::f32(weight)
        };
        Ok(Conv2d {
            weights,
            bias,
            config,
            bf16,
        })
    }

    /// The type of the activations this layer takes (f32 for a layer keeping only bf16 weights: those
    /// run f32 activations through bf16 products).
    pub fn dtype(&self) -> candle_core::DType {
        match &self.weights {
            Weights::F32 { weight, .. } => weight.dtype(),
            Weights::Bf16(_) => candle_core::DType::F32,
        }
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let cfg = &self.config;
        match self.kernel_weights(xs)? {
            Ok(weights) => kernels::conv::conv2d(xs, weights, &self.bias, cfg.padding, cfg.stride),
            Err(weight) => {
                candle_nn::Conv2d::new(weight.clone(), Some(self.bias.clone()), *cfg).forward(xs)
            }
        }
    }
}

impl Conv2d {
    /// The weights [`kernels::conv::conv2d`] multiplies `xs` by (packing the bf16 copy on first use when
    /// bf16 products are on), or, as `Err`, the f32 weight candle's own convolution must take instead
    /// (dilation, groups, or tensors the kernels do not take).
    fn kernel_weights(
        &self,
        xs: &Tensor,
    ) -> Result<std::result::Result<kernels::conv::ConvWeights<'_>, &Tensor>> {
        let cfg = &self.config;
        Ok(match &self.weights {
            Weights::Bf16(packed) => Ok(kernels::conv::ConvWeights::Bf16(packed)),
            Weights::F32 { weight, bf16 }
                if cfg.dilation == 1
                    && cfg.groups == 1
                    && kernels::accepts(xs)
                    && kernels::accepts(weight) =>
            {
                Ok(if kernels::bf16_products() {
                    kernels::conv::ConvWeights::Bf16(
                        bf16.get_or_pack(|| pack_bf16(weight, cfg.stride, self.bf16))?,
                    )
                } else {
                    kernels::conv::ConvWeights::F32(weight)
                })
            }
            Weights::F32 { weight, .. } => Err(weight),
        })
    }

    /// This convolution over `xs` (b, c, h, w) upsampled to (2h, 2w) by nearest neighbour, as the UNet's
    /// and the VAE's upsamplers run it: f32 stride-1 convolutions read `xs` in place (see
    /// [`kernels::conv::conv2d_upsampled`]), the others convolve the upsampled map.
    pub fn forward_upsampled(&self, xs: &Tensor) -> Result<Tensor> {
        if self.config.stride == 1 {
            if let Ok(kernels::conv::ConvWeights::F32(weight)) = self.kernel_weights(xs)? {
                return kernels::conv::conv2d_upsampled(
                    xs,
                    weight,
                    &self.bias,
                    self.config.padding,
                );
            }
        }
        let (_, _, h, w) = xs.dims4()?;
        self.forward(&xs.upsample_nearest2d(2 * h, 2 * w)?)
    }
}

/// `weight`'s bf16 copy for a convolution at `stride` multiplying as `bf16` says.
fn pack_bf16(
    weight: &Tensor,
    stride: usize,
    bf16: Bf16Conv,
) -> Result<kernels::conv::Bf16ConvWeights> {
    if bf16 == Bf16Conv::Winograd && kernels::winograd_bf16::fits(weight.dims4()?, stride) {
        kernels::conv::Bf16ConvWeights::pack_winograd(weight)
    } else {
        kernels::conv::Bf16ConvWeights::pack(weight)
    }
}

/// A 2-D convolution with square kernel, the given stride and padding, and a bias, multiplying directly
/// in bf16 (see [`conv2d_with`]).
pub fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    conv2d_with(
        in_channels,
        out_channels,
        kernel,
        stride,
        padding,
        Bf16Conv::Direct,
        vb,
    )
}

/// [`conv2d`] multiplying as `bf16` says when bf16 products are on.
pub fn conv2d_with(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    bf16: Bf16Conv,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding,
        stride,
        ..Default::default()
    };
    let vb_prefix = vb.prefix();
    let plain = candle_nn::conv2d(in_channels, out_channels, kernel, cfg, vb)?;
    let Some(bias) = plain.bias().cloned() else {
        candle_core::bail!("{}: convolution without a bias", vb_prefix);
    };
    Conv2d::new(plain.weight().clone(), bias, cfg, bf16)
}

/// A group norm with affine weights. f32 CPU tensors go through the fused
/// [`kernels::group_norm::group_norm`]; others through candle's composition.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// Normalises `xs`, then applies SiLU when `silu` is set.
    fn apply(&self, xs: &Tensor, silu: bool) -> Result<Tensor> {
        if kernels::accepts(xs) && kernels::accepts(&self.weight) {
            return kernels::group_norm::group_norm(
                xs,
                &self.weight,
                &self.bias,
                self.groups,
                self.eps,
                silu,
            );
        }
        let channels = self.weight.dim(0)?;
        let plain = candle_nn::GroupNorm::new(
            self.weight.clone(),
            self.bias.clone(),
            channels,
            self.groups,
            self.eps,
        )?;
        let normed = plain.forward(xs)?;
        if silu {
            normed.silu()
        } else {
            Ok(normed)
        }
    }
}

impl Module for GroupNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.apply(xs, false)
    }
}

/// A group norm with affine weights.
pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    if groups == 0 || !channels.is_multiple_of(groups) {
        candle_core::bail!("group norm: {channels} channels cannot form {groups} groups");
    }
    Ok(GroupNorm {
        weight: vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.))?,
        bias: vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.))?,
        groups,
        eps,
    })
}

/// Group norm followed by SiLU, the pair that opens every ResNet half.
pub fn group_norm_silu(norm: &GroupNorm, xs: &Tensor) -> Result<Tensor> {
    norm.apply(xs, true)
}

/// A linear layer (`x · Wᵀ + b`). f32 CPU inputs multiply through [`kernels::linear`]: in bf16 when
/// bf16 products are on (unless built by [`linear_f32`]), otherwise in f32 with the bias added in
/// the product, from weights repacked per call or [`Linear::packed_once`]; other devices and dtypes use
/// candle's product.
#[derive(Debug, Clone)]
pub struct Linear {
    weights: Weights<Vec<bf16>>,
    bias: Option<Tensor>,
    out_features: usize,
    /// The f32 weights packed once, for [`Linear::packed_once`] layers.
    packed_f32: PackedWeights<kernels::sgemm::PackedB>,
    /// Set by [`linear_f32`].
    always_f32: bool,
    /// Set by [`Linear::packed_once`].
    packed_once: bool,
}

impl Linear {
    /// A layer from its (out, in) weight and optional bias, as it is to run in this process (keeping
    /// only a bf16 copy of the weights when bf16 products are on).
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let out_features = weight.dim(0)?;
        let weights = if bf16_only(&weight) {
            Weights::Bf16(Arc::new(kernels::linear::pack_weight(&weight)?))
        } else {
            Weights::f32(weight)
        };
        Ok(Linear {
            weights,
            bias,
            out_features,
            packed_f32: PackedWeights::default(),
            always_f32: false,
            packed_once: false,
        })
    }

    /// This layer with its f32 weights packed once, on first use, instead of per call: for layers whose
    /// products have few rows (the text encoder's 77 tokens per prompt), where repacking costs nearly as
    /// much as the product. The copy doubles the layer's weight memory (about 0.35 GB for CLIP-L's text
    /// encoder).
    pub fn packed_once(self) -> Self {
        Linear {
            packed_once: true,
            ..self
        }
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let weight = match &self.weights {
            Weights::Bf16(packed) => {
                return kernels::linear::linear(xs, packed, self.out_features, self.bias.as_ref())
            }
            Weights::F32 { weight, bf16 } => {
                if !self.always_f32
                    && kernels::bf16_products()
                    && kernels::accepts(xs)
                    && kernels::accepts(weight)
                {
                    let packed = bf16.get_or_pack(|| kernels::linear::pack_weight(weight))?;
                    return kernels::linear::linear(
                        xs,
                        packed,
                        self.out_features,
                        self.bias.as_ref(),
                    );
                }
                weight
            }
        };
        if kernels::accepts(xs) && kernels::accepts(weight) {
            if self.packed_once {
                let packed = self
                    .packed_f32
                    .get_or_pack(|| kernels::linear::pack_f32(weight))?;
                return kernels::linear::linear_f32(xs, weight, self.bias.as_ref(), Some(packed));
            }
            // Few rows: repacking the weights per call would cost more than the `gemm` crate's own
            // packing inside candle's product (measured on AVX-512), so those go there; below the
            // AVX-512 tier every f32 product is our tiered sgemm (the `gemm` crate picks its kernels by
            // the CPU alone, not by `PICTOR_CPU`).
            let rows = xs.elem_count() / weight.dim(1)?.max(1);
            if rows >= kernels::linear::REPACK_ROWS
                || kernels::tier::Tier::active() < kernels::tier::Tier::Avx512
            {
                return kernels::linear::linear_f32(xs, weight, self.bias.as_ref(), None);
            }
        }
        candle_nn::Linear::new(weight.clone(), self.bias.clone()).forward(xs)
    }
}

/// A linear layer from `in_dim` to `out_dim` features with a bias.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let plain = candle_nn::linear(in_dim, out_dim, vb)?;
    Linear::new(plain.weight().clone(), plain.bias().cloned())
}

/// A linear layer from `in_dim` to `out_dim` features without a bias.
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let plain = candle_nn::linear_no_bias(in_dim, out_dim, vb)?;
    Linear::new(plain.weight().clone(), None)
}

/// A linear layer from `in_dim` to `out_dim` features with a bias that always multiplies in f32, even
/// with bf16 products on (the CLIP encoders: the text encoder's output conditions every step, the
/// safety checker's decides what is shown).
pub fn linear_f32(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let plain = candle_nn::linear(in_dim, out_dim, vb)?;
    Ok(Linear {
        out_features: out_dim,
        weights: Weights::f32(plain.weight().clone()),
        bias: plain.bias().cloned(),
        packed_f32: PackedWeights::default(),
        always_f32: true,
        packed_once: false,
    })
}

/// [`linear_f32`] without a bias (CLIP's text projection).
pub fn linear_f32_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let plain = candle_nn::linear_no_bias(in_dim, out_dim, vb)?;
    Ok(Linear {
        out_features: out_dim,
        weights: Weights::f32(plain.weight().clone()),
        bias: None,
        packed_f32: PackedWeights::default(),
        always_f32: true,
        packed_once: false,
    })
}

/// A linear layer whose weight may be stored as a 1×1 convolution kernel (old VAE attention checkpoints).
pub fn linear_maybe_conv(
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    vb: VarBuilder,
) -> Result<Linear> {
    let weight = if vb.contains_tensor("weight") {
        let w = vb.get_unchecked("weight")?;
        match w.rank() {
            4 => w.squeeze(3)?.squeeze(2)?,
            _ => w,
        }
    } else {
        vb.get((out_dim, in_dim), "weight")?
    };
    if weight.dims() != [out_dim, in_dim] {
        candle_core::bail!(
            "{}: expected weight shape [{out_dim}, {in_dim}], found {:?}",
            vb.prefix(),
            weight.dims()
        );
    }
    let weight = weight.to_dtype(vb.dtype())?;
    let bias = if bias {
        Some(vb.get(out_dim, "bias")?)
    } else {
        None
    };
    Linear::new(weight, bias)
}
