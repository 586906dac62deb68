//! The CLIP encoders' MLP activations, quick GELU (x · σ(1.702 x)) and exact GELU, in one parallel,
//! vectorised pass: candle runs quick GELU as three tensor ops (scale, sigmoid, multiply), each a
//! single-threaded pass with its own output, and its exact GELU on one thread too.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{contiguous_f32, vector};

/// Which activation [`activation`] applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// x · σ(1.702 x) (OpenAI CLIP, SD 1.x's text encoder).
    QuickGelu,
    /// x · Φ(x) in its exact erf form (OpenCLIP, SD 2.x).
    Gelu,
}

/// Applies `kind` to every element of the f32 CPU tensor `xs`.
pub fn activation(xs: &Tensor, kind: Kind) -> Result<Tensor> {
    xs.contiguous()?.apply_op1_no_bwd(&Activation(kind))
}

/// The custom op behind [`activation`].
struct Activation(Kind);

impl CustomOp1 for Activation {
    fn name(&self) -> &'static str {
        "pictor-activation"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let xs = contiguous_f32(storage, layout, self.name())?;
        let mut out = vec![0f32; xs.len()];
        // Chunks of 64 KiB of output each.
        const CHUNK: usize = 16_384;
        out.par_chunks_mut(CHUNK)
            .zip(xs.par_chunks(CHUNK))
            .for_each(|(dst, src)| match self.0 {
                Kind::QuickGelu => vector::quick_gelu(src, dst),
                Kind::Gelu => vector::gelu(src, dst),
            });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn equals_the_candle_compositions_at_every_tier() -> Result<()> {
        super::super::at_every_tier(equals_the_candle_compositions)
    }

    fn equals_the_candle_compositions() -> Result<()> {
        let device = Device::Cpu;
        for dims in [vec![1], vec![3, 7, 10], vec![2, 77, 3072], vec![5, 16_385]] {
            let xs = Tensor::randn(0f32, 3.0, dims.as_slice(), &device)?;
            let quick = (&xs * candle_nn::ops::sigmoid(&(&xs * 1.702)?)?)?;
            let diff = super::super::max_abs_diff(&activation(&xs, Kind::QuickGelu)?, &quick)?;
            assert!(diff < 2e-5, "quick GELU {dims:?}: {diff}");
            let diff = super::super::max_abs_diff(&activation(&xs, Kind::Gelu)?, &xs.gelu_erf()?)?;
            assert!(diff < 2e-5, "GELU {dims:?}: {diff}");
        }
        let strided = Tensor::randn(0f32, 1.0, (4, 6), &device)?.t()?;
        let diff =
            super::super::max_abs_diff(&activation(&strided, Kind::Gelu)?, &strided.gelu_erf()?)?;
        assert!(diff < 2e-5, "strided: {diff}");
        Ok(())
    }
}
