//! softmax(q kᵀ · scale) v, computed a block of query rows at a time against a chunk of keys at a time
//! (an online softmax: f32 tasks hold the scores of 72 rows against [`F32_KEY_CHUNK`] keys, bf16 tasks
//! those of [`QUERY_BLOCK`] rows against [`KEY_CHUNK`] keys), never the full (tokens × tokens) matrix;
//! both read q and write the output in their
//! (b, tokens, heads·d) layout, so the heads are never split out or transposed. Keys and values are
//! packed once per (image, head) for the products (f32: [`super::sgemm`]; bf16: AMX's operand order,
//! run on AMX or AVX-512 BF16); the softmax is
//! left undivided and each output row is divided by its sum after the second product (d values per
//! row instead of one per key).

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use half::bf16;

use super::sgemm::{self, PackedB, Start};
use super::{amx, contiguous_f32, vector, SharedMut};

/// Query rows per task of the bf16 path (one AMX block of rows).
pub const QUERY_BLOCK: usize = amx::BLOCK;

/// Keys per step of the bf16 path's online softmax (a whole number of AMX blocks): a block's scores for
/// one chunk (128 KiB) and its probabilities stay in L2.
pub const KEY_CHUNK: usize = 1024;

/// Multi-head attention over f32 CPU tensors q (b, n, heads·d), k and v (b, m, heads·d); returns
/// (b, n, heads·d). Inputs that are not contiguous are made so first.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    attention_masked(q, k, v, heads, false)
}

/// [`attention`], optionally causal (query i sees keys 0..=i only, as in CLIP's text encoder; q and k
/// must then have the same length).
pub fn attention_masked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    causal: bool,
) -> Result<Tensor> {
    if causal && q.dims().get(1) != k.dims().get(1) {
        candle_core::bail!(
            "causal attention: q {:?} and k {:?} differ in length",
            q.dims(),
            k.dims()
        );
    }
    let (b, _, inner) = q.dims3()?;
    let (bk, _, inner_k) = k.dims3()?;
    if bk != b
        || inner_k != inner
        || v.dims() != k.dims()
        || heads == 0
        || !inner.is_multiple_of(heads)
    {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?} do not fit {heads} heads",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    q.contiguous()?.apply_op3_no_bwd(
        &k.contiguous()?,
        &v.contiguous()?,
        &BlockedAttention { heads, causal },
    )
}

/// The custom op behind [`attention`].
struct BlockedAttention {
    heads: usize,
    causal: bool,
}

impl CustomOp3 for BlockedAttention {
    fn name(&self) -> &'static str {
        "pictor-blocked-attention"
    }

    fn cpu_fwd(
        &self,
        q_storage: &CpuStorage,
        q_layout: &Layout,
        k_storage: &CpuStorage,
        k_layout: &Layout,
        v_storage: &CpuStorage,
        v_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let q = contiguous_f32(q_storage, q_layout, self.name())?;
        let k = contiguous_f32(k_storage, k_layout, self.name())?;
        let v = contiguous_f32(v_storage, v_layout, self.name())?;
        let (b, n, inner) = q_layout.shape().dims3()?;
        let m = k_layout.shape().dims()[1];
        let heads = self.heads;

        let mut out = vec![0f32; b * n * inner];
        if super::bf16_products() && super::bf16_available() {
            bf16_attention(q, k, v, &mut out, (b, n, m, inner, heads), self.causal);
            return Ok((CpuStorage::F32(out), Shape::from((b, n, inner))));
        }
        f32_attention(q, k, v, &mut out, (b, n, m, inner, heads), self.causal);
        Ok((CpuStorage::F32(out), Shape::from((b, n, inner))))
    }
}

/// Query rows per task of the f32 path: a whole number of [`sgemm`]'s register tiles.
const F32_QUERY_BLOCK: usize = 72;

/// Keys per step of the f32 path's online softmax: up to SD 1.5's 1024-token level one step (as fast as
/// before chunking), and at its 4096-token level a block's scores take 288 KiB instead of 1.1 MiB
/// (measured on an AMD EPYC Zen 4 at AVX2: 512, 1024 or all 4096 keys at once, within 2 %).
pub const F32_KEY_CHUNK: usize = 1024;

/// The f32 path of [`BlockedAttention`]: Kᵀ and V of every (image, head) packed once for [`sgemm`], a
/// chunk of keys at a time; then per block of query rows, per chunk of keys: scores = q · Kᵀ, their
/// exponentials against the running row maximum, and out += probabilities · V (written straight into the
/// head's columns of the output), the output rows rescaled whenever their maximum grows (the online
/// softmax). The keys are packed scaled by log₂e/√d, so the exponentials are powers of two
/// ([`vector::exp2_below`]: at AVX2 half the multiplications of e^x, the 4096-token attention 11 % faster).
fn f32_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    (b, n, m, inner, heads): (usize, usize, usize, usize, usize),
    causal: bool,
) {
    let d = inner / heads;
    // Keys scaled by 1/√d · log₂e: the scores come out in log₂ units, ready for 2^x.
    let key_scale = std::f32::consts::LOG2_E / (d as f32).sqrt();
    let packed: Vec<Vec<(PackedB, PackedB)>> = (0..b * heads)
        .into_par_iter()
        .map(|bh| {
            let (batch, head) = (bh / heads, bh % heads);
            (0..m)
                .step_by(F32_KEY_CHUNK)
                .map(|c0| {
                    let width = F32_KEY_CHUNK.min(m - c0);
                    let base = (batch * m + c0) * inner + head * d;
                    let mut keys = PackedB::transposed(&k[base..], width, d, inner);
                    keys.data_mut().iter_mut().for_each(|x| *x *= key_scale);
                    let mut values = PackedB::default();
                    values.repack_rows(&v[base..], width, d, inner);
                    (keys, values)
                })
                .collect()
        })
        .collect();
    let dst = SharedMut(out.as_mut_ptr());
    let blocks_per_head = n.div_ceil(F32_QUERY_BLOCK);
    // Score rows at a stride the second product reads in place.
    let ld = sgemm::row_stride(F32_KEY_CHUNK.min(m));
    (0..b * heads * blocks_per_head)
        .into_par_iter()
        .for_each_init(
            || {
                (
                    vec![0f32; F32_QUERY_BLOCK * ld],
                    vec![(f32::NEG_INFINITY, 0f32); F32_QUERY_BLOCK],
                )
            },
            |(scores, stats), task| {
                let block = task % blocks_per_head;
                let bh = task / blocks_per_head;
                let (batch, head) = (bh / heads, bh % heads);
                let row0 = block * F32_QUERY_BLOCK;
                let rows = F32_QUERY_BLOCK.min(n - row0);
                // Where this block's rows of this head start, in q and in the output alike.
                let first = (batch * n + row0) * inner + head * d;
                let q_block = &q[first..];
                stats.fill((f32::NEG_INFINITY, 0.0));
                // Causal: no row of this block sees keys past its last row.
                let keys_seen = if causal { (row0 + rows).min(m) } else { m };
                for (c, (keys, values)) in packed[bh].iter().enumerate() {
                    let c0 = c * F32_KEY_CHUNK;
                    if c0 >= keys_seen {
                        break;
                    }
                    let width = keys.n();
                    let scores = &mut scores[..(rows - 1) * ld + width];
                    sgemm::gemm_serial(rows, q_block, inner, keys, scores, ld, Start::Zero);
                    for (r, (max, sum)) in stats.iter_mut().enumerate().take(rows) {
                        let row = &mut scores[r * ld..][..width];
                        let seen = if causal { (row0 + r + 1).min(m) } else { m };
                        let valid = seen.saturating_sub(c0).min(width);
                        row[valid..].fill(0.0);
                        if valid == 0 {
                            continue;
                        }
                        let row = &mut row[..valid];
                        let chunk_max = vector::row_max(row);
                        if chunk_max > *max {
                            // What was summed and multiplied so far was relative to the old maximum.
                            if *sum > 0.0 {
                                let shrink = (*max - chunk_max).exp2();
                                *sum *= shrink;
                                // SAFETY: this task alone reads and writes row r of its block,
                                // columns head·d..head·d+d of `out`, written by the earlier chunks.
                                let out = unsafe {
                                    std::slice::from_raw_parts_mut(dst.at(first + r * inner), d)
                                };
                                out.iter_mut().for_each(|o| *o *= shrink);
                            }
                            *max = chunk_max;
                        }
                        *sum += vector::exp2_below(row, *max);
                    }
                    let start = if c == 0 { Start::Zero } else { Start::Add };
                    // SAFETY: this task alone reads and writes rows row0..row0+rows, columns
                    // head·d..head·d+d of `out`, all inside it.
                    unsafe {
                        sgemm::gemm_serial_unchecked(
                            rows,
                            scores,
                            ld,
                            values,
                            dst.at(first),
                            inner,
                            start,
                        );
                    }
                }
                // Unnormalised so far: each output row divided by its sum.
                for (r, &(_, sum)) in stats.iter().enumerate().take(rows) {
                    // SAFETY: as above.
                    let row =
                        unsafe { std::slice::from_raw_parts_mut(dst.at(first + r * inner), d) };
                    let inv = 1.0 / sum;
                    for x in row {
                        *x *= inv;
                    }
                }
            },
        );
}

/// The bf16 path of [`BlockedAttention`] (on AMX or AVX-512 BF16, see [`super::bf16_matmul`]): Kᵀ and
/// V of every (image, head) packed once, then per block of [`QUERY_BLOCK`] query rows, per chunk of
/// [`KEY_CHUNK`] keys: scores = q · Kᵀ, their exponentials against the running row maximum (rounded to
/// bf16 for the second product), and out += probabilities · V, the earlier sums and outputs rescaled
/// whenever a row's maximum grows (the online softmax). Scores and probabilities of one chunk stay in
/// L1/L2 instead of a whole block of rows against all keys passing through memory.
fn bf16_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    (b, n, m, inner, heads): (usize, usize, usize, usize, usize),
    causal: bool,
) {
    let d = inner / heads;
    let scale = 1.0 / (d as f32).sqrt();
    // V's columns padded as the unit needs (AMX: 40 → 64; AVX-512 BF16: 40 → 48).
    let (dp, mp) = (super::bf16_columns(d), amx::pad(m, amx::BLOCK));
    // The depth of q · Kᵀ: d padded as the unit needs (AMX: 40 → 64; AVX-512 BF16: 40).
    let kd = super::bf16_depth(d);
    // Kᵀ (d × m) of each (image, head) in AMX's B order (a chunk of keys is a contiguous run of it), and
    // V (m × d) as one B operand per chunk of keys, the chunks one after another.
    let packed: Vec<(Vec<bf16>, Vec<bf16>)> = (0..b * heads)
        .into_par_iter()
        .map(|bh| {
            let (batch, head) = (bh / heads, bh % heads);
            let base = batch * m * inner + head * d;
            let keys = amx::pack_b_to(d, kd, m, |r, c| k[base + c * inner + r]);
            let mut values = Vec::with_capacity(mp * dp);
            let mut chunk = Vec::new();
            for c0 in (0..m).step_by(KEY_CHUNK) {
                let rows = KEY_CHUNK.min(m - c0);
                amx::pack_b_rows_to(&mut chunk, &v[base + c0 * inner..], rows, d, inner, dp);
                values.extend_from_slice(&chunk);
            }
            (keys, values)
        })
        .collect();
    let dst = SharedMut(out.as_mut_ptr());
    let blocks_per_head = n.div_ceil(QUERY_BLOCK);
    let rows_p = QUERY_BLOCK;
    (0..b * heads * blocks_per_head)
        .into_par_iter()
        .for_each_init(
            || {
                (
                    Vec::new(),
                    vec![0f32; rows_p * KEY_CHUNK],
                    vec![bf16::ZERO; rows_p * KEY_CHUNK],
                    vec![0f32; rows_p * dp],
                    vec![0f32; rows_p * dp],
                    vec![(f32::NEG_INFINITY, 0f32); rows_p],
                )
            },
            |(q_block, scores, probs, product, acc, stats), task| {
                let block = task % blocks_per_head;
                let bh = task / blocks_per_head;
                let (batch, head) = (bh / heads, bh % heads);
                let row0 = block * QUERY_BLOCK;
                let rows = QUERY_BLOCK.min(n - row0);
                let (keys, values) = &packed[bh];
                let q_start = (batch * n + row0) * inner + head * d;
                amx::pack_a_rows_to(q_block, &q[q_start..], rows, d, inner, kd);
                q_block.resize(rows_p * kd, bf16::ZERO);
                acc.fill(0.0);
                stats.fill((f32::NEG_INFINITY, 0.0));
                // Causal: no row of this block sees keys past its last row.
                let keys_seen = if causal { (row0 + rows).min(m) } else { m };
                for c0 in (0..keys_seen).step_by(KEY_CHUNK) {
                    let width = KEY_CHUNK.min(mp - c0);
                    // SAFETY: bf16 products are available (the caller checked); q_block is
                    // rows_p × kd, the keys' chunk kd × width (columns c0.. of the packed Kᵀ), scores
                    // rows_p × width.
                    unsafe {
                        super::bf16_matmul(
                            rows_p,
                            width,
                            kd,
                            q_block,
                            &keys[c0 * kd..][..width * kd],
                            scores.as_mut_ptr(),
                            width,
                            false,
                        )
                    };
                    let probs = &mut probs[..rows_p * width];
                    for (r, dst) in probs.chunks_exact_mut(width).enumerate() {
                        let seen = if causal { (row0 + r + 1).min(m) } else { m };
                        let valid = if r < rows {
                            seen.saturating_sub(c0).min(width)
                        } else {
                            0
                        };
                        if valid == 0 {
                            dst.fill(bf16::ZERO);
                            continue;
                        }
                        let row = &scores[r * width..][..valid];
                        let (max, sum) = &mut stats[r];
                        let chunk_max = vector::row_max(row);
                        if chunk_max > *max {
                            // What was summed and multiplied so far was relative to the old maximum.
                            if *sum > 0.0 {
                                let shrink = vector::exp(scale * (*max - chunk_max));
                                *sum *= shrink;
                                acc[r * dp..][..d].iter_mut().for_each(|o| *o *= shrink);
                            }
                            *max = chunk_max;
                        }
                        *sum += vector::exp_below_bf16(row, scale, *max, &mut dst[..valid]);
                        dst[valid..].fill(bf16::ZERO);
                    }
                    // SAFETY: probs is rows_p × width, the values' chunk width × dp, product rows_p × dp.
                    unsafe {
                        super::bf16_matmul(
                            rows_p,
                            dp,
                            width,
                            probs,
                            &values[c0 * dp..][..width * dp],
                            product.as_mut_ptr(),
                            dp,
                            false,
                        )
                    };
                    for (a, p) in acc.iter_mut().zip(product.iter()).take(rows * dp) {
                        *a += p;
                    }
                }
                for (r, row) in acc.chunks_exact(dp).take(rows).enumerate() {
                    let offset = (batch * n + row0 + r) * inner + head * d;
                    // SAFETY: this task alone writes its rows' columns of this head.
                    let out = unsafe { std::slice::from_raw_parts_mut(dst.at(offset), d) };
                    let inv = 1.0 / stats[r].1;
                    for (o, &v) in out.iter_mut().zip(&row[..d]) {
                        *o = v * inv;
                    }
                }
            },
        );
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, D};

    /// The plain candle composition: split heads, materialise the scores, softmax, multiply.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
        reference_masked(q, k, v, heads, false)
    }

    /// The same with an additive causal mask (−∞ above the diagonal), as CLIP's text encoder builds it.
    fn reference_masked(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
        causal: bool,
    ) -> Result<Tensor> {
        let (b, n, inner) = q.dims3()?;
        let m = k.dim(1)?;
        let d = inner / heads;
        let split = |t: &Tensor, len: usize| {
            t.reshape((b, len, heads, d))?
                .transpose(1, 2)?
                .reshape((b * heads, len, d))?
                .contiguous()
        };
        let (q, k, v) = (split(q, n)?, split(k, m)?, split(v, m)?);
        let mut scores = (q.matmul(&k.t()?.contiguous()?)? / (d as f64).sqrt())?;
        if causal {
            let mask: Vec<f32> = (0..n * m)
                .map(|i| {
                    if i % m > i / m {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
                .collect();
            scores = scores.broadcast_add(&Tensor::from_vec(mask, (n, m), q.device())?)?;
        }
        candle_nn::ops::softmax(&scores, D::Minus1)?
            .matmul(&v)?
            .reshape((b, heads, n, d))?
            .transpose(1, 2)?
            .reshape((b, n, inner))
    }

    #[test]
    fn equals_the_plain_candle_attention_on_awkward_shapes_at_every_tier() -> Result<()> {
        super::super::at_every_tier(equals_the_plain_candle_attention_on_awkward_shapes)
    }

    fn equals_the_plain_candle_attention_on_awkward_shapes() -> Result<()> {
        let device = Device::Cpu;
        // (batch, query tokens, key tokens, heads, head dim): odd sizes, blocks that do not divide,
        // cross-attention with 77 keys, one head of 512 (the VAE), batch 1 and 8.
        for &(b, n, m, heads, d) in &[
            (1, 1, 1, 1, 1),
            (1, 65, 65, 3, 5),
            (2, 130, 77, 8, 40),
            (8, 33, 19, 2, 7),
            (1, 200, 200, 1, 64),
            (3, 64, 64, 5, 16),
            // Keys past one AVX2 depth block of the second product (256).
            (1, 100, 600, 2, 40),
            // Keys in three chunks of the online softmax, the last one short.
            (1, 80, 2 * F32_KEY_CHUNK + 77, 2, 40),
        ] {
            let q = Tensor::randn(0f32, 1.0, (b, n, heads * d), &device)?;
            let k = Tensor::randn(0f32, 1.0, (b, m, heads * d), &device)?;
            let v = Tensor::randn(0f32, 1.0, (b, m, heads * d), &device)?;
            let fast = attention(&q, &k, &v, heads)?;
            let plain = reference(&q, &k, &v, heads)?;
            let diff = super::super::max_abs_diff(&fast, &plain)?;
            assert!(
                diff < 1e-5,
                "{b}x{n}x{m}, {heads} heads of {d}: max |Δ| {diff}"
            );
        }
        // Strided inputs (a transposed view) are made contiguous first.
        let q = Tensor::randn(0f32, 1.0, (2, 12, 9), &device)?.transpose(1, 2)?;
        let k = Tensor::randn(0f32, 1.0, (2, 6, 12), &device)?;
        let fast = attention(&q, &k, &k, 3)?;
        let plain = reference(&q.contiguous()?, &k, &k, 3)?;
        let diff = super::super::max_abs_diff(&fast, &plain)?;
        assert!(diff < 1e-5, "strided: {diff}");
        assert!(attention(&q.to_dtype(DType::F64)?, &k, &k, 3).is_err());
        Ok(())
    }

    #[test]
    fn bf16_attention_is_close_to_the_plain_candle_attention() -> Result<()> {
        if !super::super::bf16_available() {
            eprintln!("no bf16 products on this machine: skipped");
            return Ok(());
        }
        let device = Device::Cpu;
        for &(b, n, m, heads, d) in &[
            (1, 1, 1, 1, 1),
            (1, 65, 65, 3, 5),
            (2, 130, 77, 8, 40),
            (8, 33, 19, 2, 7),
            (1, 200, 200, 1, 64),
            // More keys than one chunk: the online softmax rescales what earlier chunks summed.
            (1, 1100, 1100, 1, 8),
            (2, 37, 2500, 2, 40),
        ] {
            let q = Tensor::randn(0f32, 1.0, (b, n, heads * d), &device)?;
            let k = Tensor::randn(0f32, 1.0, (b, m, heads * d), &device)?;
            let v = Tensor::randn(0f32, 1.0, (b, m, heads * d), &device)?;
            // Causal where queries and keys have the same length.
            for causal in [false, n == m] {
                let plain = reference_masked(&q, &k, &v, heads, causal)?;
                let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
                let mut out = vec![0f32; b * n * heads * d];
                bf16_attention(
                    &flat(&q)?,
                    &flat(&k)?,
                    &flat(&v)?,
                    &mut out,
                    (b, n, m, heads * d, heads),
                    causal,
                );
                let fast = Tensor::from_vec(out, (b, n, heads * d), &device)?;
                let diff = super::super::max_abs_diff(&fast, &plain)?;
                // bf16 inputs (8-bit mantissa) for scores and probabilities, f32 sums.
                assert!(
                    diff < 0.05,
                    "{b}x{n}x{m}, {heads} heads of {d}, causal {causal}: max |Δ| {diff}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn causal_attention_equals_the_masked_candle_attention_at_every_tier() -> Result<()> {
        super::super::at_every_tier(causal_attention_equals_the_masked_candle_attention)
    }

    fn causal_attention_equals_the_masked_candle_attention() -> Result<()> {
        let device = Device::Cpu;
        for &(b, n, heads, d) in &[
            (1, 1, 1, 3),
            (2, 77, 12, 64),
            (8, 70, 3, 5),
            (1, 130, 2, 8),
            (1, 300, 2, 8),
            // Past one chunk of keys: the first rows see none of the second chunk.
            (1, F32_KEY_CHUNK + 100, 1, 8),
        ] {
            let q = Tensor::randn(0f32, 1.0, (b, n, heads * d), &device)?;
            let k = Tensor::randn(0f32, 1.0, (b, n, heads * d), &device)?;
            let v = Tensor::randn(0f32, 1.0, (b, n, heads * d), &device)?;
            let fast = attention_masked(&q, &k, &v, heads, true)?;
            let plain = reference_masked(&q, &k, &v, heads, true)?;
            let diff = super::super::max_abs_diff(&fast, &plain)?;
            assert!(diff < 1e-5, "{b}x{n}, {heads} heads of {d}: max |Δ| {diff}");
        }
        let q = Tensor::zeros((1, 3, 4), candle_core::DType::F32, &device)?;
        let k = Tensor::zeros((1, 5, 4), candle_core::DType::F32, &device)?;
        assert!(attention_masked(&q, &k, &k, 2, true).is_err());
        Ok(())
    }
}
