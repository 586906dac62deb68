//! 3×3 stride-1 convolution by Winograd's minimal filtering F(2×2, 3×3): each 2×2 block of outputs costs
//! 16 multiplications per input/output channel pair instead of 36, so the matrix work is 2.25× smaller.
//!
//! Per call the weights are transformed to U = G g Gᵀ, (16, c_out, c_in). The padded input is cut into
//! 4×4 windows at stride 2 (one per 2×2 output block); windows are transformed to V = Bᵀ d B,
//! (16, c_in, windows), written straight in the panel layout of [`super::sgemm`]; sixteen products give
//! M = U·V, (16, c_out, windows); and the output transform Aᵀ M A writes each 2×2 block with the bias.
//! F(2×2, 3×3) uses the points 0, ±1, for which the transforms are exact additions and halvings, so f32
//! results stay within a few ulps of the direct sum. The weight transform is per call, so [`worthwhile`]
//! keeps it for feature maps large enough to repay it.
//!
//! Two schedules: with few channels (U fits in cache) every task carries a cache-sized chunk of windows
//! through all three steps; with many, U (up to 200 MiB at SD's 1280 channels) is read once per large
//! group of windows, the transforms spread over the threads and each product over the threads too.
//! U, V and M live in per-thread buffers kept between calls (fresh allocations of that size fault in
//! every page), and the sixteen U[ξ] and M[ξ] start at staggered offsets so the transforms, which touch
//! all sixteen at once, do not thrash one cache set.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::sgemm::{self, PackedB, Start};
use super::{contiguous_f32, pad_planes, row_segments, threads, Segment, SharedMut};

/// Whether a 3×3 stride-1 convolution over `positions` output positions (batch · h · w) is worth the
/// weight transform: below this the direct product of [`super::conv`] is as fast.
pub fn worthwhile(positions: usize) -> bool {
    positions >= 256
}

/// Convolves `xs` (b, c_in, h, w) with a 3×3 `weight` (c_out, c_in, 3, 3) at stride 1 and zero padding
/// `padding`, and adds `bias` (c_out); returns (b, c_out, h + 2p − 2, w + 2p − 2).
pub fn conv3x3(xs: &Tensor, weight: &Tensor, bias: &Tensor, padding: usize) -> Result<Tensor> {
    let (_, c_in, h, w) = xs.dims4()?;
    let (c_out, w_in, kh, kw) = weight.dims4()?;
    if w_in != c_in
        || (kh, kw) != (3, 3)
        || bias.dims() != [c_out]
        || h + 2 * padding < 3
        || w + 2 * padding < 3
    {
        candle_core::bail!(
            "winograd conv: input {:?}, weight {:?}, bias {:?} with padding {padding} do not fit",
            xs.dims(),
            weight.dims(),
            bias.dims()
        );
    }
    xs.contiguous()?.apply_op3_no_bwd(
        &weight.contiguous()?,
        &bias.contiguous()?,
        &Winograd { padding },
    )
}

/// The custom op behind [`conv3x3`].
struct Winograd {
    padding: usize,
}

/// Floats between consecutive U[ξ] and M[ξ] beyond their size (one cache line).
const SKEW: usize = 16;

/// Up to this size of U (floats), the convolution runs chunk by chunk in cache (see `cpu_fwd`).
const PIPELINE_U_FLOATS: usize = 1 << 20;

/// Floats of V and M per chunk in that mode (1 MiB, half an L2).
const CHUNK_FLOATS: usize = 1 << 18;

/// Floats of V and M per group of windows (64 MiB for both together).
const GROUP_FLOATS: usize = 1 << 24;

impl CustomOp3 for Winograd {
    fn name(&self) -> &'static str {
        "pictor-winograd-conv3x3"
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
        let (batch, c_in, h, w) = x_layout.shape().dims4()?;
        let c_out = w_layout.shape().dims()[0];
        let p = self.padding;
        let (ho, wo) = (h + 2 * p - 2, w + 2 * p - 2);
        let (th, tw) = (ho.div_ceil(2), wo.div_ceil(2));
        // Padded so that every 4×4 window is inside: (2·th + 2) × (2·tw + 2) ≥ (h + 2p) × (w + 2p).
        let (hp, wp) = (2 * th + 2, 2 * tw + 2);
        let plane = hp * wp;

        SCRATCH.with_borrow_mut(|scratch| {
            let Scratch { u, v, m } = scratch;
            // U = G g Gᵀ for every (o, i), stored (16, c_out, c_in).
            // Each U[ξ] (and M[ξ] below) starts 16 floats further into a 4 KiB page than the one
            // before: the transforms touch all sixteen at the same (o, i) or (o, window), and at
            // page-multiple strides those sixteen streams would fall into one L1 set.
            // Rows of U[ξ] at a stride the product can read in place (see sgemm::row_stride).
            let ldu = sgemm::row_stride(c_in);
            let u_stride = c_out * ldu + SKEW;
            u.resize(16 * u_stride, 0.0);
            let u_ptr = SharedMut(u.as_mut_ptr());
            (0..c_out).into_par_iter().for_each(|o| {
                for i in 0..c_in {
                    let g = &weight[(o * c_in + i) * 9..][..9];
                    // Rows: G g (4 × 3).
                    let mut r = [[0f32; 3]; 4];
                    for c in 0..3 {
                        let (g0, g1, g2) = (g[c], g[3 + c], g[6 + c]);
                        r[0][c] = g0;
                        r[1][c] = 0.5 * (g0 + g1 + g2);
                        r[2][c] = 0.5 * (g0 - g1 + g2);
                        r[3][c] = g2;
                    }
                    for (a, row) in r.iter().enumerate() {
                        let (g0, g1, g2) = (row[0], row[1], row[2]);
                        let cols = [g0, 0.5 * (g0 + g1 + g2), 0.5 * (g0 - g1 + g2), g2];
                        for (b, &value) in cols.iter().enumerate() {
                            // SAFETY: (a·4 + b, o, i) is in range; each o is written by one task.
                            unsafe { *u_ptr.at((a * 4 + b) * u_stride + o * ldu + i) = value };
                        }
                    }
                }
            });

            let padded = pad_planes(xs, (h, w), (hp, wp), p);

            let windows = batch * th * tw;
            // Windows per group: V and M of a group take at most GROUP_FLOATS, and a group is a whole
            // number of sgemm panels wide (transform tasks then write disjoint panels of V).
            let group = (GROUP_FLOATS / (16 * (c_in + c_out)))
                .max(sgemm::NR)
                .next_multiple_of(sgemm::NR)
                .min(windows.next_multiple_of(sgemm::NR));
            let mut out = vec![0f32; batch * c_out * ho * wo];
            let dst = SharedMut(out.as_mut_ptr());
            if 16 * c_in * c_out <= PIPELINE_U_FLOATS {
                // Small channel counts: U stays in cache, so each task carries a cache-sized chunk of
                // windows through all three steps and V and M never leave L2.
                let chunk = (CHUNK_FLOATS / (16 * (c_in + c_out)))
                    .next_multiple_of(sgemm::NR)
                    .max(sgemm::NR)
                    .min(windows.div_ceil(threads()).next_multiple_of(sgemm::NR));
                let chunks = windows.div_ceil(chunk);
                let (padded, u) = (&padded, &*u);
                (0..chunks).into_par_iter().for_each_init(
                    || {
                        (
                            Vec::new(),
                            Vec::new(),
                            (0..16).map(|_| PackedB::default()).collect::<Vec<_>>(),
                        )
                    },
                    |(rows, m, v), index| {
                        let start = index * chunk;
                        let len = chunk.min(windows - start);
                        let segments = row_segments(start, len, (th, tw));
                        for vx in v.iter_mut() {
                            vx.reshape(c_in, len);
                        }
                        let v_ptrs: [SharedMut; 16] =
                            std::array::from_fn(|xi| SharedMut(v[xi].data_mut().as_mut_ptr()));
                        let m_stride = c_out * len + SKEW;
                        m.resize(16 * m_stride, 0.0);
                        // SAFETY: V[ξ] were reshaped to c_in × len; this task's own buffers.
                        unsafe {
                            input_transform(padded, rows, &segments, 0, (c_in, plane, wp), &v_ptrs)
                        };
                        for (xi, vx) in v.iter().enumerate() {
                            sgemm::gemm_serial(
                                c_out,
                                &u[xi * u_stride..][..c_out * ldu],
                                ldu,
                                vx,
                                &mut m[xi * m_stride..][..c_out * len],
                                len,
                                Start::Zero,
                            );
                        }
                        // SAFETY: this task writes the outputs of its own windows only.
                        unsafe {
                            output_transform(
                                m,
                                m_stride,
                                len,
                                rows,
                                &segments,
                                0,
                                (c_out, ho, wo),
                                bias,
                                dst,
                            )
                        };
                    },
                );
                return Ok((CpuStorage::F32(out), Shape::from((batch, c_out, ho, wo))));
            }
            v.resize_with(16, PackedB::default);
            m.resize(16 * (c_out * group + SKEW), 0.0);
            for g0 in (0..windows).step_by(group) {
                let glen = group.min(windows - g0);
                let m_stride = c_out * glen + SKEW;
                for vx in v.iter_mut() {
                    vx.reshape(c_in, glen);
                }
                // Transform tasks: runs of windows a whole number of panels long, about two per thread.
                let piece = glen
                    .div_ceil(2 * threads())
                    .next_multiple_of(sgemm::NR)
                    .max(sgemm::NR);
                let pieces = glen.div_ceil(piece);
                let v_ptrs: [SharedMut; 16] =
                    std::array::from_fn(|xi| SharedMut(v[xi].data_mut().as_mut_ptr()));
                let padded = &padded;
                (0..pieces)
                    .into_par_iter()
                    .for_each_init(Vec::new, |rows, index| {
                        let j_start = index * piece;
                        let len = piece.min(glen - j_start);
                        // SAFETY: this task writes columns j_start..j_start+len of every V[ξ] (reshaped to
                        // c_in × glen above) and nothing else.
                        unsafe {
                            input_transform(
                                padded,
                                rows,
                                &row_segments(g0 + j_start, len, (th, tw)),
                                j_start,
                                (c_in, plane, wp),
                                &v_ptrs,
                            )
                        };
                    });
                for (xi, vx) in v.iter().enumerate() {
                    // M[ξ] (c_out × glen) = U[ξ] (c_out × c_in) · V[ξ] (c_in × glen).
                    sgemm::gemm(
                        c_out,
                        &u[xi * u_stride..][..c_out * ldu],
                        ldu,
                        vx,
                        &mut m[xi * m_stride..][..c_out * glen],
                        glen,
                        Start::Zero,
                    );
                }
                let m = &*m;
                (0..pieces)
                    .into_par_iter()
                    .for_each_init(Vec::new, |rows, index| {
                        let j_start = index * piece;
                        let len = piece.min(glen - j_start);
                        // SAFETY: this task writes the outputs of windows g0+j_start.. (len of them) only.
                        unsafe {
                            output_transform(
                                &m[..16 * m_stride],
                                m_stride,
                                glen,
                                rows,
                                &row_segments(g0 + j_start, len, (th, tw)),
                                j_start,
                                (c_out, ho, wo),
                                bias,
                                dst,
                            )
                        };
                    });
            }
            release_large(u);
            Ok((CpuStorage::F32(out), Shape::from((batch, c_out, ho, wo))))
        })
    }
}

/// A thread's buffers for [`Winograd`], kept between calls: the transformed weights, V and M are tens
/// to hundreds of MiB on SD's layers, and fresh allocations of that size cost a page fault per 4 KiB.
#[derive(Default)]
struct Scratch {
    /// U = G g Gᵀ, (16, c_out, c_in).
    u: Vec<f32>,
    /// V[ξ] of the current group of windows.
    v: Vec<PackedB>,
    /// M[ξ] = U[ξ] · V[ξ] of the current group, (16, c_out, windows).
    m: Vec<f32>,
}

/// Above this many floats (64 MiB), U is not kept for the next call: SD's 1280-channel layers would
/// keep 100–200 MiB for the whole run, which would put peak memory above PyTorch's for a 2 % gain.
const KEEP_U_FLOATS: usize = 1 << 24;

/// Frees `u` when it is too large to keep (see [`KEEP_U_FLOATS`]).
fn release_large(u: &mut Vec<f32>) {
    if u.capacity() > KEEP_U_FLOATS {
        *u = Vec::new();
    }
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// V = Bᵀ d B for the windows of `segments` (columns `j_base + segment offset ..` of each V[ξ]).
///
/// # Safety
/// `v[ξ]` must point at V[ξ], packed by [`PackedB::reshape`] as c_in × (at least the columns written),
/// and no other thread may touch these columns.
unsafe fn input_transform(
    padded: &[f32],
    rows: &mut Vec<f32>,
    segments: &[Segment],
    j_base: usize,
    shape: (usize, usize, usize),
    v: &[SharedMut; 16],
) {
    #[cfg(target_arch = "x86_64")]
    if wide() {
        return input_transform_wide(padded, rows, segments, j_base, shape, v);
    }
    input_transform_body(padded, rows, segments, j_base, shape, v)
}

/// [`input_transform`] compiled for AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx2,fma")]
unsafe fn input_transform_wide(
    padded: &[f32],
    rows: &mut Vec<f32>,
    segments: &[Segment],
    j_base: usize,
    shape: (usize, usize, usize),
    v: &[SharedMut; 16],
) {
    input_transform_body(padded, rows, segments, j_base, shape, v)
}

/// The body of [`input_transform`]: per input channel and run of `count` windows, the four input rows
/// are split into even and odd columns (E, O), transformed down (Bᵀ) as whole rows, then across (B):
/// window k of a transformed row spans E[k], O[k], E[k+1], O[k+1], so every step is a contiguous
/// loop. Each of the sixteen rows of results is copied into V[ξ] in pieces that stay within a panel.
#[inline(always)]
unsafe fn input_transform_body(
    padded: &[f32],
    rows: &mut Vec<f32>,
    segments: &[Segment],
    j_base: usize,
    (c_in, plane, wp): (usize, usize, usize),
    v: &[SharedMut; 16],
) {
    const NR: usize = sgemm::NR;
    let n = segments.iter().map(|s| s.count + 1).max().unwrap_or(0);
    // Eight rows of n (E and O of the four input rows), then sixteen result rows of n.
    rows.resize(24 * n, 0.0);
    let (split, results) = rows.split_at_mut(8 * n);
    for i in 0..c_in {
        for &Segment {
            image: b,
            row: ty,
            col: tx,
            count,
            offset,
        } in segments
        {
            let base = (b * c_in + i) * plane + 2 * ty * wp + 2 * tx;
            for y in 0..4 {
                let src = &padded[base + y * wp..][..2 * count + 2];
                let (even, odd) = split[2 * y * n..(2 * y + 2) * n].split_at_mut(n);
                for (x, pair) in src.chunks_exact(2).enumerate() {
                    even[x] = pair[0];
                    odd[x] = pair[1];
                }
            }
            // Down (Bᵀ) per parity: t_a = (d0 − d2, d1 + d2, d2 − d1, d1 − d3), computed into E/O
            // place (each element is read only by its own position).
            for parity in 0..2 {
                let at = |y: usize| (2 * y + parity) * n;
                for x in 0..=count {
                    let (d0, d1, d2, d3) = (
                        split[at(0) + x],
                        split[at(1) + x],
                        split[at(2) + x],
                        split[at(3) + x],
                    );
                    split[at(0) + x] = d0 - d2;
                    split[at(1) + x] = d1 + d2;
                    split[at(2) + x] = d2 - d1;
                    split[at(3) + x] = d1 - d3;
                }
            }
            // Across (B) for each transformed row a: (E[k] − E[k+1], O[k] + E[k+1], E[k+1] − O[k],
            // O[k] − O[k+1]).
            for a in 0..4 {
                let e = &split[2 * a * n..][..count + 1];
                let o = &split[(2 * a + 1) * n..][..count + 1];
                let out = &mut results[4 * a * n..][..4 * n];
                let (r0, rest) = out.split_at_mut(n);
                let (r1, rest) = rest.split_at_mut(n);
                let (r2, r3) = rest.split_at_mut(n);
                for k in 0..count {
                    r0[k] = e[k] - e[k + 1];
                    r1[k] = o[k] + e[k + 1];
                    r2[k] = e[k + 1] - o[k];
                    r3[k] = o[k] - o[k + 1];
                }
            }
            // Copy out: columns j.. of row i of each V[ξ], a panel (NR columns) at a time.
            let mut k = 0;
            while k < count {
                let j = j_base + offset + k;
                let piece = (NR - j % NR).min(count - k);
                let at = (j / NR) * c_in * NR + i * NR + j % NR;
                for (xi, vx) in v.iter().enumerate() {
                    copy_short(&results[xi * n + k..][..piece], vx.at(at));
                }
                k += piece;
            }
        }
    }
}

/// Y = Aᵀ M A plus the bias for the windows of `segments` (columns `j_base + segment offset ..` of
/// each M[ξ], c_out × `len` at stride `m_stride` between the ξ).
///
/// # Safety
/// `dst` must point at the (b, c_out, ho, wo) output, and no other thread may write these windows'
/// outputs.
#[allow(clippy::too_many_arguments)]
unsafe fn output_transform(
    m: &[f32],
    m_stride: usize,
    len: usize,
    rows: &mut Vec<f32>,
    segments: &[Segment],
    j_base: usize,
    shape: (usize, usize, usize),
    bias: &[f32],
    dst: SharedMut,
) {
    #[cfg(target_arch = "x86_64")]
    if wide() {
        return output_transform_wide(m, m_stride, len, rows, segments, j_base, shape, bias, dst);
    }
    output_transform_body(m, m_stride, len, rows, segments, j_base, shape, bias, dst)
}

/// [`output_transform`] compiled for AVX-512.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512dq,avx2,fma")]
unsafe fn output_transform_wide(
    m: &[f32],
    m_stride: usize,
    len: usize,
    rows: &mut Vec<f32>,
    segments: &[Segment],
    j_base: usize,
    shape: (usize, usize, usize),
    bias: &[f32],
    dst: SharedMut,
) {
    output_transform_body(m, m_stride, len, rows, segments, j_base, shape, bias, dst)
}

/// The body of [`output_transform`]: per output channel and run of windows, down (Aᵀ) over whole
/// rows of M (dy 0: m0 + m1 + m2, dy 1: m1 − m2 − m3 per column c), then across into the even and
/// odd outputs of the row, interleaved as the row is written out.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn output_transform_body(
    m: &[f32],
    m_stride: usize,
    len: usize,
    rows: &mut Vec<f32>,
    segments: &[Segment],
    j_base: usize,
    (c_out, ho, wo): (usize, usize, usize),
    bias: &[f32],
    dst: SharedMut,
) {
    let n = segments.iter().map(|s| s.count).max().unwrap_or(0);
    rows.resize(6 * n, 0.0);
    for (o, &bias) in bias.iter().enumerate() {
        for &Segment {
            image: b,
            row: ty,
            col: tx,
            count,
            offset,
        } in segments
        {
            let j0 = j_base + offset;
            let mv = |xi: usize| &m[xi * m_stride + o * len + j0..][..count];
            for dy in 0..2 {
                let y = 2 * ty + dy;
                if y >= ho {
                    break;
                }
                let (down, line) = rows.split_at_mut(4 * n);
                for c in 0..4 {
                    let (top, mid, bottom) = if dy == 0 {
                        (mv(c), mv(4 + c), mv(8 + c))
                    } else {
                        (mv(4 + c), mv(8 + c), mv(12 + c))
                    };
                    let sign = if dy == 0 { 1.0 } else { -1.0 };
                    let out = &mut down[c * n..][..count];
                    for k in 0..count {
                        out[k] = top[k] + sign * (mid[k] + bottom[k]);
                    }
                }
                let (s0, rest) = down.split_at(n);
                let (s1, rest) = rest.split_at(n);
                let (s2, s3) = rest.split_at(n);
                let line = &mut line[..2 * count];
                for k in 0..count {
                    line[2 * k] = s0[k] + s1[k] + s2[k] + bias;
                    line[2 * k + 1] = s1[k] - s2[k] - s3[k] + bias;
                }
                let x0 = 2 * tx;
                let width = (2 * count).min(wo - x0);
                let offset = ((b * c_out + o) * ho + y) * wo + x0;
                std::ptr::copy_nonoverlapping(line.as_ptr(), dst.at(offset), width);
            }
        }
    }
}

/// Copies a short run (at most a panel) to `dst` with inline vector moves: `copy_nonoverlapping` of a
/// run whose length is not known at compile time is a call to `memcpy`, which costs more than the copy.
///
/// # Safety
/// `dst` must be valid for `src.len()` writes.
#[inline(always)]
unsafe fn copy_short(src: &[f32], dst: *mut f32) {
    let mut chunks = src.chunks_exact(16);
    let mut at = dst;
    for chunk in &mut chunks {
        let block: [f32; 16] = chunk.try_into().unwrap_or([0.0; 16]);
        at.cast::<[f32; 16]>().write_unaligned(block);
        at = at.add(16);
    }
    for (q, &value) in chunks.remainder().iter().enumerate() {
        *at.add(q) = value;
    }
}

/// Whether this CPU runs the AVX-512 builds of the transforms.
#[cfg(target_arch = "x86_64")]
fn wide() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512dq")
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn equals_candle_conv2d_on_awkward_shapes() -> Result<()> {
        let device = Device::Cpu;
        // (batch, c_in, c_out, h, w, padding): odd and even sizes (partial 2×2 blocks), non-square,
        // odd channel counts, no padding, batch 1 and 8, many chunks.
        for &(b, c_in, c_out, h, w, p) in &[
            (1, 3, 5, 7, 9, 1),
            (8, 4, 6, 5, 3, 1),
            (1, 7, 3, 1, 1, 1),
            (1, 6, 4, 8, 5, 0),
            (2, 13, 17, 70, 45, 1),
            (8, 3, 3, 4, 4, 1),
            (1, 33, 129, 31, 64, 1),
            // Channels past the chunked mode: two groups of windows, the second partial.
            (1, 260, 300, 90, 88, 1),
        ] {
            let xs = Tensor::randn(0f32, 1.0, (b, c_in, h, w), &device)?;
            let weight = Tensor::randn(0f32, 0.3, (c_out, c_in, 3, 3), &device)?;
            let bias = Tensor::randn(0f32, 1.0, c_out, &device)?;
            let fast = conv3x3(&xs, &weight, &bias, p)?;
            let plain = xs
                .conv2d(&weight, p, 1, 1, 1)?
                .broadcast_add(&bias.reshape((1, c_out, 1, 1))?)?;
            assert_eq!(fast.dims(), plain.dims());
            let diff = super::super::max_abs_diff(&fast, &plain)?;
            assert!(diff < 1e-4, "{b}x{c_in}x{h}x{w} → {c_out}, pad {p}: {diff}");
        }
        let xs = Tensor::zeros((1, 2, 3, 3), candle_core::DType::F32, &device)?;
        let weight = Tensor::zeros((4, 2, 1, 1), candle_core::DType::F32, &device)?;
        let bias = Tensor::zeros(4, candle_core::DType::F32, &device)?;
        assert!(conv3x3(&xs, &weight, &bias, 1).is_err());
        Ok(())
    }
}
