//! Linear layers on the CPU: `xs · Wᵀ (+ b)` in f32 through [`sgemm`], the weights either repacked per
//! call (a transposition costing about 1/(2·rows) of the product, so no second copy is kept) or packed
//! once by the layer ([`pack_f32`]); and the bf16 product on AMX with the weights packed once (by the
//! layer) and the activations per call.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use half::bf16;
use rayon::prelude::*;

use super::sgemm::{self, PackedB, Start};
use super::{amx, contiguous_f32};

/// From this many input rows on, repacking the weights per call for [`sgemm`] pays (below it, layers
/// without a packed copy use candle's product).
pub const REPACK_ROWS: usize = 1024;

/// The weight (n, k) of a linear layer packed as the right operand of `xs · Wᵀ`, for [`linear_f32`].
pub fn pack_f32(weight: &Tensor) -> Result<PackedB> {
    let (n, k) = weight.dims2()?;
    let data = weight
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mut packed = PackedB::default();
    packed.repack_transposed_par(&data, n, k, k);
    Ok(packed)
}

/// `xs (…, k) · Wᵀ + b` in f32 for a weight (n, k) and an optional bias (n), all f32 CPU tensors; with
/// `packed` (the same weight through [`pack_f32`]) the weight is not repacked.
pub fn linear_f32(
    xs: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    packed: Option<&PackedB>,
) -> Result<Tensor> {
    let (n, k) = weight.dims2()?;
    if xs.dims().last() != Some(&k) || bias.is_some_and(|b| b.dims() != [n]) {
        candle_core::bail!(
            "linear: input {:?} does not fit weight {:?} and bias {:?}",
            xs.dims(),
            weight.dims(),
            bias.map(|b| b.dims().to_vec())
        );
    }
    let bias = bias_values(bias)?;
    if packed.is_some_and(|p| (p.n(), p.k()) != (n, k)) {
        candle_core::bail!("linear: packed weights do not match {:?}", weight.dims());
    }
    xs.contiguous()?
        .apply_op2_no_bwd(&weight.contiguous()?, &F32Linear { bias, packed })
}

/// The custom op behind [`linear_f32`].
struct F32Linear<'a> {
    bias: Option<Vec<f32>>,
    packed: Option<&'a PackedB>,
}

impl CustomOp2 for F32Linear<'_> {
    fn name(&self) -> &'static str {
        "pictor-f32-linear"
    }

    fn cpu_fwd(
        &self,
        x_storage: &CpuStorage,
        x_layout: &Layout,
        w_storage: &CpuStorage,
        w_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let xs = contiguous_f32(x_storage, x_layout, self.name())?;
        let weight = contiguous_f32(w_storage, w_layout, self.name())?;
        let (n, k) = w_layout.shape().dims2()?;
        let m = xs.len() / k.max(1);
        let start = match &self.bias {
            Some(bias) => Start::Bias(bias),
            None => Start::Zero,
        };
        let mut out = Vec::with_capacity(m * n);
        // The product writes every element of `out` (no `Start::Add`), so it needs no zeroing.
        let spare = &mut out.spare_capacity_mut()[..m * n];
        // SAFETY: MaybeUninit<f32> has f32's layout; the slice is only written before `set_len`.
        let c = unsafe { std::slice::from_raw_parts_mut(spare.as_mut_ptr().cast::<f32>(), m * n) };
        match self.packed {
            Some(packed) => sgemm::gemm(m, xs, k, packed, c, n, start),
            // Few rows (below the AVX-512 tier, where candle's product does not take these): packing
            // the m rows of xs costs less than packing the n rows of W, so the product runs transposed,
            // Cᵀ = W · xsᵀ, and is transposed back with the bias.
            None if m < n && m < REPACK_ROWS => PACKED.with_borrow_mut(|packed| {
                packed.repack_transposed_par(xs, m, k, k);
                TRANSPOSED.with_borrow_mut(|scratch| {
                    scratch.resize(n * m, 0.0);
                    sgemm::gemm(n, weight, k, packed, scratch, m, Start::Zero);
                    transpose_with_bias(scratch, c, (n, m), self.bias.as_deref());
                });
            }),
            None => PACKED.with_borrow_mut(|packed| {
                packed.repack_transposed_par(weight, n, k, k);
                sgemm::gemm(m, xs, k, packed, c, n, start);
            }),
        }
        // SAFETY: all m·n elements were written above.
        unsafe { out.set_len(m * n) };
        let mut dims = x_layout.shape().dims().to_vec();
        dims.pop();
        dims.push(n);
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

/// A layer's optional bias as plain f32 values, for the products to add.
fn bias_values(bias: Option<&Tensor>) -> Result<Option<Vec<f32>>> {
    bias.map(|b| b.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>())
        .transpose()
}

/// dst (m × n) = srcᵀ (src: n × m) plus `bias` (n) on every row.
fn transpose_with_bias(src: &[f32], dst: &mut [f32], (n, m): (usize, usize), bias: Option<&[f32]>) {
    dst.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
        for (j, out) in row.iter_mut().enumerate() {
            *out = src[j * m + i] + bias.map_or(0.0, |b| b[j]);
        }
    });
}

thread_local! {
    /// The calling thread's packed copy of the last weight it multiplied by: repacked per call, the
    /// allocation kept so large weights do not fault in fresh pages every time. (Also the packed
    /// activations of a transposed product.)
    static PACKED: std::cell::RefCell<PackedB> = std::cell::RefCell::new(PackedB::default());
    /// The calling thread's Cᵀ of a transposed product.
    static TRANSPOSED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Frees the calling thread's [`PACKED`] and [`TRANSPOSED`] buffers.
pub(super) fn release_buffers() {
    PACKED.with_borrow_mut(|packed| *packed = PackedB::default());
    TRANSPOSED.with_borrow_mut(|scratch| *scratch = Vec::new());
}

/// Packs f32 weights (out_features, in_features) as the B operand of `xs · Wᵀ`.
pub fn pack_weight(weight: &Tensor) -> Result<Vec<bf16>> {
    let (n, k) = weight.dims2()?;
    let data = weight.flatten_all()?.to_vec1::<f32>()?;
    Ok(amx::pack_b(k, n, |row, col| data[col * k + row]))
}

/// `xs (…, k) · Wᵀ (+ bias)` for weights packed by [`pack_weight`] from an (`out_features`, k) matrix
/// and an optional f32 bias (`out_features`), on AMX or AVX-512 BF16 (see [`super::bf16_matmul`]).
pub fn linear(
    xs: &Tensor,
    packed: &[bf16],
    out_features: usize,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    if !super::bf16_available() {
        candle_core::bail!("bf16 linear: this CPU has neither AMX nor AVX-512 BF16");
    }
    if bias.is_some_and(|b| b.dims() != [out_features]) {
        candle_core::bail!("bf16 linear: bias does not fit {out_features} outputs");
    }
    let bias = bias_values(bias)?;
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
        bias,
    })
}

/// The custom op behind [`linear`].
struct AmxLinear<'a> {
    packed: &'a [bf16],
    out_features: usize,
    bias: Option<Vec<f32>>,
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
        let mut c: Vec<f32> = Vec::with_capacity(mp * np);
        // SAFETY: bf16 products are available (checked by `linear`); a is mp × kp, packed is kp × np,
        // c has room for mp × np, every element of which the product stores (so `c` needs no zeroing
        // first).
        unsafe {
            super::bf16_matmul(mp, np, kp, &a, self.packed, c.as_mut_ptr(), np, true);
            c.set_len(mp * np);
        }
        if let Some(bias) = &self.bias {
            c.par_chunks_mut(np).take(m).for_each(|row| {
                for (v, &b) in row.iter_mut().zip(bias) {
                    *v += b;
                }
            });
        }
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
    fn f32_linear_equals_candles_linear_at_every_tier() -> Result<()> {
        super::super::at_every_tier(f32_linear_equals_candles_linear)
    }

    fn f32_linear_equals_candles_linear() -> Result<()> {
        let device = Device::Cpu;
        for &(dims, k, n, bias) in &[
            (&[1usize, 1][..], 1usize, 1usize, true),
            (&[2, 77][..], 768, 320, false),
            (&[8, 5][..], 33, 70, true),
            (&[3][..], 320, 1280, true),
            (&[1, 331][..], 401, 45, false),
        ] {
            let mut shape = dims.to_vec();
            shape.push(k);
            let xs = Tensor::randn(0f32, 1.0, shape.as_slice(), &device)?;
            let weight = Tensor::randn(0f32, 1.0 / (k as f32).sqrt(), (n, k), &device)?;
            let bias = bias
                .then(|| Tensor::randn(0f32, 1.0, n, &device))
                .transpose()?;
            let fast = linear_f32(&xs, &weight, bias.as_ref(), None)?;
            let packed = pack_f32(&weight)?;
            let prepacked = linear_f32(&xs, &weight, bias.as_ref(), Some(&packed))?;
            // Equal up to where the bias is added (few rows multiply transposed and add it last).
            let repacked = super::super::max_abs_diff(&fast, &prepacked)?;
            assert!(
                repacked < 1e-6,
                "{dims:?} x {k} -> {n}: packed once vs per call {repacked}"
            );
            let plain = candle_nn::Linear::new(weight, bias).forward(&xs)?;
            assert_eq!(fast.dims(), plain.dims());
            let diff = super::super::max_abs_diff(&fast, &plain)?;
            assert!(diff < 1e-4, "{dims:?} x {k} -> {n}: {diff}");
        }
        Ok(())
    }

    #[test]
    fn bf16_linear_is_close_to_the_f32_linear() -> Result<()> {
        if !super::super::bf16_available() {
            eprintln!("no bf16 products on this machine: skipped");
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
            let bias = Tensor::randn(0f32, 1.0, n, &device)?;
            let fast = linear(&xs, &packed, n, Some(&bias))?;
            let plain = candle_nn::Linear::new(weight, Some(bias)).forward(&xs)?;
            assert_eq!(fast.dims(), plain.dims());
            // bf16 keeps 8 bits of mantissa: relative error per product ~2^-9, averaging out in the sum.
            let diff = super::super::max_abs_diff(&fast, &plain)?;
            assert!(diff < 0.05, "{dims:?} x {k} -> {n}: {diff}");
        }
        Ok(())
    }
}
