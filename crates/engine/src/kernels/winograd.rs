//! 3×3 stride-1 convolution by Winograd's minimal filtering F(2×2, 3×3): each 2×2 block of outputs costs
//! 16 multiplications per input/output channel pair instead of 36, so the matrix work is 2.25× smaller.
//!
//! Per call the weights are transformed to U = G g Gᵀ, (16, c_out, c_in). The padded input is cut into
//! 4×4 windows at stride 2 (one per 2×2 output block); a chunk of windows is transformed to
//! V = Bᵀ d B, (16, c_in, chunk); sixteen `gemm`s give M = U·V, (16, c_out, chunk); and the output
//! transform Aᵀ M A writes each 2×2 block with the bias. F(2×2, 3×3) uses the points 0, ±1, for which the
//! transforms are exact additions and halvings, so f32 results stay within a few ulps of the direct sum.
//! The weight transform is per call, so [`worthwhile`] keeps it for feature maps large enough to repay it.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::{contiguous_f32, for_each_tile, pad_planes, row_segments, threads, Segment, SharedMut};

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

/// Windows per chunk: one of the sixteen slices of V or M then holds about this many floats.
const CHUNK_FLOATS: usize = 1 << 17;

/// A task's reusable buffers: transformed inputs, products, and rows of the two transforms.
#[derive(Default)]
struct Buffers {
    v: Vec<f32>,
    m: Vec<f32>,
    rows: Vec<f32>,
}

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

        // U = G g Gᵀ for every (o, i), stored (16, c_out, c_in).
        let mut u = vec![0f32; 16 * c_out * c_in];
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
                        unsafe { *u_ptr.at(((a * 4 + b) * c_out + o) * c_in + i) = value };
                    }
                }
            }
        });

        let padded = pad_planes(xs, (h, w), (hp, wp), p);

        let windows = batch * th * tw;
        // Enough chunks for every thread to take two, where the chunks stay wide enough to pay.
        let chunk = (CHUNK_FLOATS / c_in.max(c_out))
            .min(windows.div_ceil(2 * threads()))
            .clamp(32, 1024)
            .min(windows);
        let chunks = windows.div_ceil(chunk);
        let mut out = vec![0f32; batch * c_out * ho * wo];
        let dst = SharedMut(out.as_mut_ptr());
        let (u, padded) = (&u, &padded);
        let run = |buffers: &mut Buffers, index: usize, parallelism: Parallelism| {
            let Buffers { v, m, rows } = buffers;
            let start = index * chunk;
            let len = chunk.min(windows - start);
            v.resize(16 * c_in * len, 0.0);
            m.resize(16 * c_out * len, 0.0);
            // The chunk's runs of windows along one row of 2×2 blocks.
            let segments = row_segments(start, len, (th, tw));
            // V = Bᵀ d B: first down the four input rows of a run (Bᵀ, contiguous), then across
            // (B, columns 2k..2k+3 of each transformed row).
            let widest = segments.iter().map(|s| 2 * s.count + 2).max().unwrap_or(0);
            rows.resize(4 * widest, 0.0);
            for i in 0..c_in {
                for &Segment {
                    image: b,
                    row: ty,
                    col: tx,
                    count,
                    offset: j0,
                } in &segments
                {
                    let width = 2 * count + 2;
                    let base = (b * c_in + i) * plane + 2 * ty * wp + 2 * tx;
                    let r = |k: usize| &padded[base + k * wp..][..width];
                    let (r0, r1, r2, r3) = (r(0), r(1), r(2), r(3));
                    let (t0, rest) = rows.split_at_mut(widest);
                    let (t1, rest) = rest.split_at_mut(widest);
                    let (t2, t3) = rest.split_at_mut(widest);
                    for x in 0..width {
                        t0[x] = r0[x] - r2[x];
                        t1[x] = r1[x] + r2[x];
                        t2[x] = r2[x] - r1[x];
                        t3[x] = r1[x] - r3[x];
                    }
                    for (a, t) in [&*t0, &*t1, &*t2, &*t3].into_iter().enumerate() {
                        let at = |bb: usize| ((a * 4 + bb) * c_in + i) * len + j0;
                        let (o0, o1, o2, o3) = (at(0), at(1), at(2), at(3));
                        for k in 0..count {
                            let (d0, d1, d2, d3) =
                                (t[2 * k], t[2 * k + 1], t[2 * k + 2], t[2 * k + 3]);
                            v[o0 + k] = d0 - d2;
                            v[o1 + k] = d1 + d2;
                            v[o2 + k] = d2 - d1;
                            v[o3 + k] = d1 - d3;
                        }
                    }
                }
            }
            for xi in 0..16 {
                // SAFETY: M[ξ] (c_out × len), U[ξ] (c_out × c_in), V[ξ] (c_in × len), row-major, in bounds.
                unsafe {
                    gemm::gemm(
                        c_out,
                        len,
                        c_in,
                        m[xi * c_out * len..].as_mut_ptr(),
                        1,
                        len as isize,
                        false,
                        u[xi * c_out * c_in..].as_ptr(),
                        1,
                        c_in as isize,
                        v[xi * c_in * len..].as_ptr(),
                        1,
                        len as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        parallelism,
                    );
                }
            }
            // Y = Aᵀ M A plus the bias: first down (Aᵀ, contiguous over the run), then across into a
            // row of 2·count outputs, copied out as far as the image goes.
            rows.resize(4 * widest.max(2 * len), 0.0);
            for (o, &bias) in bias.iter().enumerate() {
                for &Segment {
                    image: b,
                    row: ty,
                    col: tx,
                    count,
                    offset: j0,
                } in &segments
                {
                    let mv = |xi: usize| &m[(xi * c_out + o) * len + j0..][..count];
                    let (line, _) = rows.split_at_mut(2 * count);
                    for dy in 0..2 {
                        let y = 2 * ty + dy;
                        if y >= ho {
                            break;
                        }
                        let column = |c: usize| -> (&[f32], &[f32], &[f32]) {
                            if dy == 0 {
                                (mv(c), mv(4 + c), mv(8 + c))
                            } else {
                                (mv(4 + c), mv(8 + c), mv(12 + c))
                            }
                        };
                        let (c0, c1, c2, c3) = (column(0), column(1), column(2), column(3));
                        // Row dy of Aᵀ M: dy 0 is m0 + m1 + m2, dy 1 is m1 − m2 − m3 (per column c).
                        let down = |c: (&[f32], &[f32], &[f32]), k: usize| {
                            if dy == 0 {
                                c.0[k] + c.1[k] + c.2[k]
                            } else {
                                c.0[k] - c.1[k] - c.2[k]
                            }
                        };
                        for k in 0..count {
                            let (s0, s1, s2, s3) =
                                (down(c0, k), down(c1, k), down(c2, k), down(c3, k));
                            line[2 * k] = s0 + s1 + s2 + bias;
                            line[2 * k + 1] = s1 - s2 - s3 + bias;
                        }
                        let x0 = 2 * tx;
                        let n = (2 * count).min(wo - x0);
                        let offset = ((b * c_out + o) * ho + y) * wo + x0;
                        // SAFETY: outputs (b, o, y, x0..x0+n) belong to this chunk's windows only.
                        let out = unsafe { std::slice::from_raw_parts_mut(dst.at(offset), n) };
                        out.copy_from_slice(&line[..n]);
                    }
                }
            }
        };
        for_each_tile(chunks, run);
        Ok((CpuStorage::F32(out), Shape::from((batch, c_out, ho, wo))))
    }
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
