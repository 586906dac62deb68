//! The bf16 product of a linear layer on AMX: `xs · Wᵀ` with the weights packed once (by the layer) and
//! the activations packed per call, accumulated in f32.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use half::bf16;

use super::{amx, contiguous_f32};

/// Packs f32 weights (out_features, in_features) as the B operand of `xs · Wᵀ`.
pub fn pack_weight(weight: &Tensor) -> Result<Vec<bf16>> {
    let (n, k) = weight.dims2()?;
    let data = weight.flatten_all()?.to_vec1::<f32>()?;
    Ok(amx::pack_b(k, n, |row, col| data[col * k + row]))
}

/// `xs (…, k) · Wᵀ` for weights packed by [`pack_weight`] from an (`out_features`, k) matrix; AMX must be
/// available.
pub fn linear(xs: &Tensor, packed: &[bf16], out_features: usize) -> Result<Tensor> {
    if !amx::available() {
        candle_core::bail!("bf16 linear: this CPU has no AMX");
    }
    let k = xs.dims().last().copied().unwrap_or(0);
    if packed.len() != amx::pad(k, amx::DEPTH) * amx::pad(out_features, amx::BLOCK) {
        candle_core::bail!(
            "bf16 linear: input {:?} does not fit weights of {out_features} outputs",
            xs.dims()
        );
    }
    xs.contiguous()?.apply_op1_no_bwd(&AmxLinear {
        packed,
        out_features,
    })
}

/// The custom op behind [`linear`].
struct AmxLinear<'a> {
    packed: &'a [bf16],
    out_features: usize,
}

impl CustomOp1 for AmxLinear<'_> {
    fn name(&self) -> &'static str {
        "pictor-amx-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let xs = contiguous_f32(storage, layout, self.name())?;
        let mut dims = layout.shape().dims().to_vec();
        let k = dims.pop().unwrap_or(0);
        let m = xs.len() / k.max(1);
        let n = self.out_features;
        let mut a = Vec::new();
        amx::pack_a_rows(&mut a, xs, m, k, k);
        let (mp, np, kp) = (
            amx::pad(m, amx::BLOCK),
            amx::pad(n, amx::BLOCK),
            amx::pad(k, amx::DEPTH),
        );
        let mut c = vec![0f32; mp * np];
        // SAFETY: AMX is available (checked by `linear`); a is mp × kp, packed is kp × np, c mp × np.
        unsafe { amx::matmul(mp, np, kp, &a, self.packed, c.as_mut_ptr(), np, true) };
        let out = if np == n {
            c.truncate(m * n);
            c
        } else {
            c.chunks_exact(np)
                .take(m)
                .flat_map(|row| &row[..n])
                .copied()
                .collect()
        };
        dims.push(n);
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module};

    #[test]
    fn bf16_linear_is_close_to_the_f32_linear() -> Result<()> {
        if !amx::available() {
            eprintln!("no AMX on this machine: skipped");
            return Ok(());
        }
        let device = Device::Cpu;
        for &(dims, k, n) in &[
            (&[1usize, 1][..], 1usize, 1usize),
            (&[2, 77][..], 768, 320),
            (&[8, 5][..], 33, 70),
            (&[3][..], 320, 1280),
        ] {
            let mut shape = dims.to_vec();
            shape.push(k);
            let xs = Tensor::randn(0f32, 1.0, shape.as_slice(), &device)?;
            let weight = Tensor::randn(0f32, 1.0 / (k as f32).sqrt(), (n, k), &device)?;
            let packed = pack_weight(&weight)?;
            let fast = linear(&xs, &packed, n)?;
            let plain = candle_nn::Linear::new(weight, None).forward(&xs)?;
            assert_eq!(fast.dims(), plain.dims());
            // bf16 keeps 8 bits of mantissa: relative error per product ~2^-9, averaging out in the sum.
            let diff = super::super::max_abs_diff(&fast, &plain)?;
            assert!(diff < 0.05, "{dims:?} x {k} -> {n}: {diff}");
        }
        Ok(())
    }
}
