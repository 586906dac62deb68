//! `ResnetBlock2D`: two group-norm/SiLU/conv halves with an optional time-embedding shift in between.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::layers::{
    self, conv2d, conv2d_with, group_norm, group_norm_silu, Bf16Conv, Conv2d, GroupNorm, Linear,
};

/// One residual block as diffusers builds it (output scale factor 1, "default" time shift).
#[derive(Debug)]
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    /// Loads a block going from `in_ch` to `out_ch` channels; `temb_ch` is the time embedding width (UNet) or
    /// `None` (VAE); its 3×3 convolutions multiply as `bf16` says when bf16 products are on.
    pub fn new(
        in_ch: usize,
        out_ch: usize,
        temb_ch: Option<usize>,
        groups: usize,
        eps: f64,
        bf16: Bf16Conv,
        vb: VarBuilder,
    ) -> Result<Self> {
        let conv_shortcut = if in_ch != out_ch {
            Some(conv2d(in_ch, out_ch, 1, 1, 0, vb.pp("conv_shortcut"))?)
        } else {
            None
        };
        Ok(ResnetBlock {
            norm1: group_norm(groups, in_ch, eps, vb.pp("norm1"))?,
            conv1: conv2d_with(in_ch, out_ch, 3, 1, 1, bf16, vb.pp("conv1"))?,
            time_emb_proj: match temb_ch {
                Some(t) => Some(layers::linear(t, out_ch, vb.pp("time_emb_proj"))?),
                None => None,
            },
            norm2: group_norm(groups, out_ch, eps, vb.pp("norm2"))?,
            conv2: conv2d_with(out_ch, out_ch, 3, 1, 1, bf16, vb.pp("conv2"))?,
            conv_shortcut,
        })
    }

    /// Applies the block; `temb` is the (already SiLU-free) time embedding of the UNet, if any.
    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        // The first half's output is dropped as soon as the second convolution has read it: at the
        // VAE decoder's 512² layers each of these maps is 128–256 MiB.
        let h = {
            let mut h = self.conv1.forward(&group_norm_silu(&self.norm1, xs)?)?;
            if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
                let t = proj.forward(&temb.silu()?)?.unsqueeze(2)?.unsqueeze(3)?;
                h = h.broadcast_add(&t)?;
            }
            self.conv2.forward(&group_norm_silu(&self.norm2, &h)?)?
        };
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(xs)?,
            None => xs.clone(),
        };
        shortcut + h
    }
}
