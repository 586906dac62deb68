//! Small building blocks shared by the networks: convolutions, norms and activations as SD uses them.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, GroupNorm, VarBuilder};

/// A 2-D convolution with square kernel, the given stride and padding, and a bias.
pub fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding,
        stride,
        ..Default::default()
    };
    candle_nn::conv2d(in_channels, out_channels, kernel, cfg, vb)
}

/// A group norm with affine weights.
pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    candle_nn::group_norm(groups, channels, eps, vb)
}

/// Group norm followed by SiLU, the pair that opens every ResNet half.
pub fn group_norm_silu(norm: &GroupNorm, xs: &Tensor) -> Result<Tensor> {
    norm.forward(xs)?.silu()
}

/// A linear layer whose weight may be stored as a 1×1 convolution kernel (old VAE attention checkpoints).
pub fn linear_maybe_conv(
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    vb: VarBuilder,
) -> Result<candle_nn::Linear> {
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
    Ok(candle_nn::Linear::new(weight, bias))
}
