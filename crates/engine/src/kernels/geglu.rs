//! The GEGLU gate of the transformer feed-forward, `value · GELU(gate)` where the projection's output is
//! [value | gate] along the last axis, in one pass (candle needs two strided narrows, an erf-based GELU
//! with a scalar erf, and a multiply).

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{contiguous_f32, vector};

/// For `xs` (…, 2n) = [value | gate], returns value · GELU(gate) (…, n), GELU in its exact erf form.
pub fn geglu(xs: &Tensor) -> Result<Tensor> {
    let last = xs.dims().last().copied().unwrap_or(0);
    if last == 0 || !last.is_multiple_of(2) {
        candle_core::bail!("geglu: last dimension of {:?} must be even", xs.dims());
    }
    xs.contiguous()?.apply_op1_no_bwd(&FusedGeglu)
}

/// The custom op behind [`geglu`].
struct FusedGeglu;

impl CustomOp1 for FusedGeglu {
    fn name(&self) -> &'static str {
        "pictor-geglu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let xs = contiguous_f32(storage, layout, self.name())?;
        let mut dims = layout.shape().dims().to_vec();
        let width = dims.pop().unwrap_or(0);
        let half = width / 2;
        dims.push(half);
        let mut out = vec![0f32; xs.len() / 2];
        // Rows in chunks of about 64 KiB of output each.
        let rows_per_task = (16_384 / half.max(1)).max(1);
        out.par_chunks_mut(rows_per_task * half)
            .zip(xs.par_chunks(rows_per_task * width))
            .for_each(|(dst, src)| {
                for (d, s) in dst.chunks_exact_mut(half).zip(src.chunks_exact(width)) {
                    let (value, gate) = s.split_at(half);
                    vector::geglu(value, gate, d);
                }
            });
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    #[test]
    fn equals_candle_narrow_gelu_erf_multiply_at_every_tier() -> Result<()> {
        super::super::at_every_tier(equals_candle_narrow_gelu_erf_multiply)
    }

    fn equals_candle_narrow_gelu_erf_multiply() -> Result<()> {
        let device = Device::Cpu;
        for dims in [
            vec![1, 2],
            vec![3, 7, 10],
            vec![8, 5, 2560],
            vec![2, 1, 1, 6],
        ] {
            let xs = Tensor::randn(0f32, 3.0, dims.as_slice(), &device)?;
            let half = dims[dims.len() - 1] / 2;
            let plain =
                (xs.narrow(D::Minus1, 0, half)? * xs.narrow(D::Minus1, half, half)?.gelu_erf()?)?;
            let fast = geglu(&xs)?;
            assert_eq!(fast.dims(), plain.dims());
            let diff = super::super::max_abs_diff(&fast, &plain)?;
            assert!(diff < 2e-5, "{dims:?}: {diff}");
        }
        assert!(geglu(&Tensor::zeros((2, 3), candle_core::DType::F32, &device)?).is_err());
        Ok(())
    }
}
