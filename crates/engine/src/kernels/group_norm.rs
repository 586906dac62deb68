//! Group norm over (b, c, …) f32 tensors with the affine scale and shift, optionally followed by SiLU, in
//! two passes over each group (statistics, then normalise-and-write) instead of candle's chain of about
//! ten whole-tensor operations.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{contiguous_f32, vector, SharedMut};

/// Normalises each of `groups` channel groups of `xs` (b, c, …) to zero mean and unit variance (biased
/// variance, `eps` added), scales and shifts each channel by `weight` and `bias` (c), and applies SiLU
/// when `silu` is set.
pub fn group_norm(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let dims = xs.dims();
    let channels = if dims.len() >= 2 { dims[1] } else { 0 };
    if channels == 0 || groups == 0 || !channels.is_multiple_of(groups) {
        candle_core::bail!("group norm: {dims:?} cannot be split into {groups} groups");
    }
    if weight.dims() != [channels] || bias.dims() != [channels] {
        candle_core::bail!(
            "group norm: weight {:?} / bias {:?} do not match {channels} channels",
            weight.dims(),
            bias.dims()
        );
    }
    xs.contiguous()?.apply_op3_no_bwd(
        &weight.contiguous()?,
        &bias.contiguous()?,
        &FusedGroupNorm {
            groups,
            eps: eps as f32,
            silu,
        },
    )
}

/// The custom op behind [`group_norm`].
struct FusedGroupNorm {
    groups: usize,
    eps: f32,
    silu: bool,
}

impl CustomOp3 for FusedGroupNorm {
    fn name(&self) -> &'static str {
        "pictor-group-norm"
    }

    fn cpu_fwd(
        &self,
        x_storage: &CpuStorage,
        x_layout: &Layout,
        w_storage: &CpuStorage,
        w_layout: &Layout,
        b_storage: &CpuStorage,
        b_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let xs = contiguous_f32(x_storage, x_layout, self.name())?;
        let weight = contiguous_f32(w_storage, w_layout, self.name())?;
        let bias = contiguous_f32(b_storage, b_layout, self.name())?;
        let dims = x_layout.shape().dims();
        let (batch, channels) = (dims[0], dims[1]);
        let plane: usize = dims[2..].iter().product();
        let per_group = channels / self.groups;
        let group_len = per_group * plane;

        let mut out = vec![0f32; xs.len()];
        let dst = SharedMut(out.as_mut_ptr());
        (0..batch * self.groups).into_par_iter().for_each(|task| {
            let group = task % self.groups;
            let start = task * group_len;
            let src = &xs[start..start + group_len];
            // SAFETY: each task writes only its own group's range of `out`.
            let out = unsafe { std::slice::from_raw_parts_mut(dst.at(start), group_len) };
            let len = group_len as f32;
            let (sum, _) = vector::sum_and_squares(src, 0.0);
            let guess = sum / len;
            let (shifted, squares) = vector::sum_and_squares(src, guess);
            let mean = guess + shifted / len;
            let var = ((squares - shifted * shifted / len) / len).max(0.0);
            let inv_std = 1.0 / (var + self.eps).sqrt();
            for c in 0..per_group {
                let channel = group * per_group + c;
                let mul = inv_std * weight[channel];
                let add = bias[channel] - mean * mul;
                let range = c * plane..(c + 1) * plane;
                vector::normalize(&src[range.clone()], &mut out[range], mul, add, self.silu);
            }
        });
        Ok((CpuStorage::F32(out), x_layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module};

    #[test]
    fn equals_candle_group_norm_and_silu_on_awkward_shapes_at_every_tier() -> Result<()> {
        super::super::at_every_tier(equals_candle_group_norm_and_silu_on_awkward_shapes)
    }

    fn equals_candle_group_norm_and_silu_on_awkward_shapes() -> Result<()> {
        let device = Device::Cpu;
        // (batch, channels, groups, height, width): odd channel counts, non-square, batch 1 and 8,
        // a single group, one channel per group, an offset mean that tests the two-pass variance.
        for &(b, c, groups, h, w, offset) in &[
            (1, 3, 1, 5, 7, 0.0),
            (8, 6, 3, 3, 2, 0.0),
            (2, 64, 32, 9, 13, 0.0),
            (1, 96, 32, 1, 1, 0.0),
            (1, 15, 5, 17, 4, 100.0),
            (8, 32, 32, 6, 5, 0.0),
        ] {
            let xs = (Tensor::randn(0f32, 2.0, (b, c, h, w), &device)? + offset)?;
            let weight = Tensor::randn(1f32, 0.5, c, &device)?;
            let bias = Tensor::randn(0f32, 0.5, c, &device)?;
            let plain = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), c, groups, 1e-6)?
                .forward(&xs)?;
            for silu in [false, true] {
                let fast = group_norm(&xs, &weight, &bias, groups, 1e-6, silu)?;
                let want = if silu { plain.silu()? } else { plain.clone() };
                let diff = super::super::max_abs_diff(&fast, &want)?;
                // f32 rounding of inputs near 100 is ~1e-5 (in either implementation).
                let tolerance = if offset > 0.0 { 1e-4 } else { 2e-5 };
                assert!(
                    diff < tolerance,
                    "{b}x{c}x{h}x{w} / {groups}, silu {silu}: {diff}"
                );
            }
        }
        let xs = Tensor::zeros((1, 5, 2, 2), candle_core::DType::F32, &device)?;
        let ones = Tensor::ones(5, candle_core::DType::F32, &device)?;
        assert!(group_norm(&xs, &ones, &ones, 2, 1e-6, false).is_err());
        Ok(())
    }
}
