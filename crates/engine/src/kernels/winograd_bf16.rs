//! 3×3 stride-1 convolution in bf16 by Winograd's F(2×2, 3×3): 16 products per 2×2 block of outputs and
//! pair of channels instead of 36, so 2.25× less work for the bf16 products than the direct convolution
//! of [`super::amx_conv`] (which, at 80–90 % of the bf16 units' peak, has nothing else left to gain).
//!
//! The weights are transformed once, when the model is loaded ([`transform_weights`]): U = G g Gᵀ for the
//! 16 points ξ of a 4 × 4 window, each U[ξ] a (c_out × c_in) matrix packed as the A operand of the bf16
//! products (see [`super::bf16_matmul`]); 16/9 of the direct weights, which are then not kept. Per call
//! the input is cut into 4 × 4 windows at stride 2, numbered image by image, row by row; each window is
//! transformed to V = Bᵀ d B in f32 and rounded once to bf16, straight into the VNNI order of the B
//! operand (V[ξ] is c_in × windows). Then M[ξ] = U[ξ] · V[ξ] per block of 32 output channels and 64
//! windows, kept in L2, and the output transform Aᵀ M A writes each 2 × 2 block with its bias.
//!
//! The points are 0 and ±1, so the transforms are additions and halvings: U and V are as exact as bf16
//! rounding makes them, and the products sum in f32 as the direct convolution does. The larger
//! F(4×4, 3×3) of [`super::winograd`] is not used in bf16: its factors (up to 8, and 1/6, 1/24 in G)
//! would multiply bf16's rounding error. The transforms are AVX-512 intrinsics (every CPU with bf16
//! products has AVX-512 BF16, Sapphire Rapids' AMX included, so [`fits`] asks for it); no crate does
//! this for candle tensors.

use candle_core::{Result, Tensor};
use half::bf16;
use rayon::prelude::*;

use super::amx::{self, BLOCK};
use super::conv::Bf16ConvWeights;
use super::{dot_bf16, pad_planes, row_segments, vector, SharedMut};

/// Points of a 4 × 4 window (ξ = 4 · i + j).
const POINTS: usize = 16;

/// Windows of one product task: two blocks of 32 (M for 32 channels and 16 points is then 128 KiB).
const TASK_WINDOWS: usize = 2 * BLOCK;

/// Most bytes of V (all 16 points, every input channel) held at once: larger inputs go through in chunks
/// of windows of this size.
const V_BYTES: usize = 16 << 20;

/// Whether a convolution with weights of `dims` (c_out, c_in, kh, kw) at `stride` runs here: 3 × 3, stride
/// 1, input channels in multiples of 32 (every 3 × 3 convolution of SD's UNet and VAE but the first),
/// on a CPU with AVX-512 BF16.
pub fn fits((_, c_in, kh, kw): (usize, usize, usize, usize), stride: usize) -> bool {
    (kh, kw) == (3, 3) && super::amx_conv::fits(c_in, stride) && dot_bf16::available()
}

/// U = G g Gᵀ of f32 `weight` (c_out, c_in, 3, 3): for each point ξ in turn, pad(c_out, 32) rows of c_in
/// bf16 values packed as the A operand of the bf16 products.
pub fn transform_weights(weight: &Tensor) -> Result<Vec<bf16>> {
    let (c_out, c_in, kh, kw) = weight.dims4()?;
    if (kh, kw) != (3, 3) || !c_in.is_multiple_of(amx::DEPTH) {
        candle_core::bail!(
            "bf16 Winograd: weights {:?} are not 3×3 over a multiple of 32 channels",
            weight.dims()
        );
    }
    let g = weight.flatten_all()?.to_vec1::<f32>()?;
    let rows = amx::pad(c_out, BLOCK);
    // Rows past c_out stay zero.
    let mut u = vec![bf16::ZERO; POINTS * rows * c_in];
    let dst = SharedMut(u.as_mut_ptr());
    // G's rows: g0, (g0 + g1 + g2) / 2, (g0 − g1 + g2) / 2, g2.
    let along = |[a, b, c]: [f32; 3]| [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c];
    g.par_chunks_exact(9 * c_in)
        .enumerate()
        .for_each(|(o, row)| {
            for (c, k) in row.chunks_exact(9).enumerate() {
                let (c0, c1, c2) = (
                    along([k[0], k[3], k[6]]),
                    along([k[1], k[4], k[7]]),
                    along([k[2], k[5], k[8]]),
                );
                for (i, ((&x, &y), &z)) in c0.iter().zip(&c1).zip(&c2).enumerate() {
                    let values = along([x, y, z]);
                    for (j, value) in values.into_iter().enumerate() {
                        let at = ((4 * i + j) * rows + o) * c_in + c;
                        // SAFETY: row o of every U[ξ] is written by this task only, inside `u`.
                        unsafe { *dst.at(at) = vector::to_bf16(value) };
                    }
                }
            }
        });
    Ok(u)
}

/// The convolution of `xs` (`dims` = batch, c_in, h, w) with zero padding `padding` by weights in
/// Winograd form ([`transform_weights`]), plus `bias` (c_out): the output (batch, c_out, ho, wo) and
/// (ho, wo). Errors for weights not in that form or where [`fits`] does not hold; the caller
/// (`conv::conv2d`, the only one) checked that the sizes agree.
pub(super) fn conv2d_winograd(
    xs: &[f32],
    (batch, c_in, h, w): (usize, usize, usize, usize),
    weights: &Bf16ConvWeights,
    padding: usize,
    bias: &[f32],
) -> Result<(Vec<f32>, (usize, usize))> {
    let dims = weights.dims();
    let Some(u) = weights.winograd() else {
        candle_core::bail!("bf16 Winograd convolution: the weights are not in Winograd form");
    };
    if !fits(dims, 1) {
        candle_core::bail!("bf16 Winograd convolution: weights {dims:?} do not fit this kernel");
    }
    let geometry = Geometry::new(batch, c_in, (h, w), dims.0, padding);
    Ok((convolve(xs, &geometry, u, bias, V_BYTES), geometry.output))
}

/// The sizes of one call.
struct Geometry {
    batch: usize,
    c_in: usize,
    c_out: usize,
    /// The input's height and width, and its zero padding.
    input: (usize, usize),
    padding: usize,
    /// The output's height and width.
    output: (usize, usize),
    /// Windows down and across one image.
    grid: (usize, usize),
    /// The padded input planes: height and width (2 × grid + 2, so every window lies inside).
    planes: (usize, usize),
}

impl Geometry {
    fn new(batch: usize, c_in: usize, (h, w): (usize, usize), c_out: usize, p: usize) -> Self {
        let output = (h + 2 * p - 2, w + 2 * p - 2);
        let grid = (output.0.div_ceil(2), output.1.div_ceil(2));
        Geometry {
            batch,
            c_in,
            c_out,
            input: (h, w),
            padding: p,
            output,
            grid,
            planes: (2 * grid.0 + 2, 2 * grid.1 + 2),
        }
    }

    fn windows(&self) -> usize {
        self.batch * self.grid.0 * self.grid.1
    }
}

/// Zero floats after the last padded plane: a window's row is read as 34 floats from its first column
/// (in vectors of 16 at offsets 0, 16, 2 and 18), which may run past the plane's end.
const TAIL: usize = 64;

/// The convolution: (batch, c_out, ho, wo) from `xs` (batch, c_in, h, w), with V held in chunks of at
/// most `v_bytes`.
fn convolve(xs: &[f32], g: &Geometry, u: &[bf16], bias: &[f32], v_bytes: usize) -> Vec<f32> {
    let padded = pad_planes(xs, g.input, g.planes, g.padding, TAIL);
    let windows = g.windows();
    let chunk = (v_bytes / (POINTS * g.c_in * 2))
        .max(TASK_WINDOWS)
        .min(windows.next_multiple_of(TASK_WINDOWS))
        / TASK_WINDOWS
        * TASK_WINDOWS;
    let (ho, wo) = g.output;
    let mut out = vec![0f32; g.batch * g.c_out * ho * wo];
    let dst = SharedMut(out.as_mut_ptr());
    let mut v: Vec<bf16> = Vec::with_capacity(POINTS * g.c_in * chunk);
    for start in (0..windows).step_by(chunk) {
        let len = chunk.min(windows - start);
        let columns = len.next_multiple_of(BLOCK);
        v.clear();
        let spare = &mut v.spare_capacity_mut()[..POINTS * g.c_in * columns];
        // SAFETY: MaybeUninit<bf16> has bf16's layout; `input_transforms` writes every element (whole
        // blocks of 32 windows, zeros past `len`) before anything reads it.
        let v_all = unsafe {
            std::slice::from_raw_parts_mut(spare.as_mut_ptr().cast::<bf16>(), spare.len())
        };
        input_transforms(&padded, g, start, len, columns, v_all);
        products(g, u, v_all, (start, len), columns, bias, dst);
    }
    out
}

/// Transforms windows `start..start + len` of `padded` into `v`: for each point, the B operand of
/// c_in rows × `columns` windows (zeros past `len`).
fn input_transforms(
    padded: &[f32],
    g: &Geometry,
    start: usize,
    len: usize,
    columns: usize,
    v: &mut [bf16],
) {
    const PAIRS_PER_TASK: usize = 16;
    let pairs = g.c_in / 2;
    let groups = pairs.div_ceil(PAIRS_PER_TASK);
    let blocks = columns / BLOCK;
    let v = SharedMut(v.as_mut_ptr());
    let (hq, wq) = g.planes;
    (0..blocks * groups).into_par_iter().for_each(|task| {
        let (block, group) = (task / groups, task % groups);
        let first = start + block * BLOCK;
        let count = BLOCK.min(start + len - first);
        let pieces = row_segments(first, count, g.grid);
        // Zero once: every pair writes the same windows' lanes, so those past `count` stay zero.
        let mut stage = Stage([[[0f32; BLOCK]; 2]; POINTS]);
        for pair in group * PAIRS_PER_TASK..((group + 1) * PAIRS_PER_TASK).min(pairs) {
            for (half, lane) in stage_lanes(&mut stage) {
                for piece in &pieces {
                    let channel = piece.image * g.c_in + 2 * pair + half;
                    let at = (channel * hq + 2 * piece.row) * wq + 2 * piece.col;
                    // SAFETY: AVX-512 BF16 is available (`fits`). The piece's windows lie inside this
                    // plane; their rows are read as runs of 34 floats from `at`, which end inside
                    // `padded` thanks to the tail; `lane` has room for 32 windows.
                    unsafe {
                        transform_piece(padded[at..].as_ptr(), wq, piece.count, lane, piece.offset)
                    };
                }
            }
            for xi in 0..POINTS {
                // Column blocks of 16 windows: [columns / 16][c_in / 2 pairs][16][2].
                for sixteen in 0..2 {
                    let column_block = block * 2 + sixteen;
                    let at = xi * g.c_in * columns + (column_block * pairs + pair) * 32;
                    // SAFETY: as above; these 32 values belong to this task's (block, pair) only.
                    unsafe {
                        interleave(
                            stage.0[xi][0][16 * sixteen..].as_ptr(),
                            stage.0[xi][1][16 * sixteen..].as_ptr(),
                            v.at(at),
                        )
                    };
                }
            }
        }
    });
}

/// V of two channels for one block of 32 windows, in f32: [point][channel of the pair][window].
#[repr(C, align(64))]
struct Stage([[[f32; BLOCK]; 2]; POINTS]);

/// For each channel of the pair, where its transform writes: the stage seen as the point-major array of
/// that channel (point ξ at ξ · 64 floats).
fn stage_lanes(stage: &mut Stage) -> [(usize, *mut f32); 2] {
    let base = stage.0.as_mut_ptr().cast::<f32>();
    // SAFETY: channel 1's first row lies 32 floats into the stage.
    [(0, base), (1, unsafe { base.add(BLOCK) })]
}

/// The products and output transforms for windows `start..start + len` (V for them in `v`, `columns`
/// wide), written with the bias into `dst` (batch, c_out, ho, wo).
fn products(
    g: &Geometry,
    u: &[bf16],
    v: &[bf16],
    (start, len): (usize, usize),
    columns: usize,
    bias: &[f32],
    dst: SharedMut,
) {
    let rows = amx::pad(g.c_out, BLOCK);
    let channel_blocks = rows / BLOCK;
    let runs = columns.div_ceil(TASK_WINDOWS);
    (0..runs * channel_blocks).into_par_iter().for_each_init(
        || vec![0f32; POINTS * BLOCK * TASK_WINDOWS],
        |m, task| {
            let (run, cb) = (task / channel_blocks, task % channel_blocks);
            let first = run * TASK_WINDOWS;
            let width = TASK_WINDOWS.min(columns - first);
            for xi in 0..POINTS {
                let a = &u[(xi * rows + cb * BLOCK) * g.c_in..][..BLOCK * g.c_in];
                let b = &v[xi * g.c_in * columns + first * g.c_in..][..width * g.c_in];
                let c = m[xi * BLOCK * TASK_WINDOWS..].as_mut_ptr();
                // SAFETY: bf16 products are available (`fits`); A is 32 × c_in, B c_in × width (a
                // multiple of 32 columns), and C this point's 32 rows of `TASK_WINDOWS`.
                unsafe { super::bf16_matmul(BLOCK, width, g.c_in, a, b, c, TASK_WINDOWS, false) };
            }
            let count = width.min(len.saturating_sub(first));
            let channels = BLOCK.min(g.c_out - cb * BLOCK);
            for piece in row_segments(start + first, count, g.grid) {
                for o in 0..channels {
                    let channel = cb * BLOCK + o;
                    let (ho, wo) = g.output;
                    let (y, x) = (2 * piece.row, 2 * piece.col);
                    let at = ((piece.image * g.c_out + channel) * ho + y) * wo + x;
                    let from = o * TASK_WINDOWS + piece.offset;
                    // SAFETY: AVX-512 is available; M's rows hold `piece.offset + piece.count` ≤
                    // TASK_WINDOWS values; the output positions of these windows and this channel
                    // belong to this task only, and the writes are clipped to the output.
                    unsafe {
                        output_piece(
                            m[from..].as_ptr(),
                            BLOCK * TASK_WINDOWS,
                            piece.count,
                            bias[channel],
                            dst.at(at),
                            (wo - x, ho - y),
                            wo,
                        )
                    };
                }
            }
        },
    );
}

/// Transforms `count` windows along one row (the first at `src`, rows `wq` apart) of one channel, 16 at
/// a time, into `lane` + ξ · 64 + `offset`.. for each point ξ.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transform_piece(src: *const f32, wq: usize, count: usize, lane: *mut f32, offset: usize) {
    use std::arch::x86_64::*;
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    let mut done = 0;
    while done < count {
        let n = (count - done).min(16);
        let mask: __mmask16 = ((1u32 << n) - 1) as u16;
        let base = src.add(2 * done);
        // Bᵀ along each row: d0 − d2, d1 + d2, d2 − d1, d1 − d3 of its four columns.
        let mut rows = [[_mm512_setzero_ps(); 4]; 4];
        for (r, row) in rows.iter_mut().enumerate() {
            let p = base.add(r * wq);
            let (a, b) = (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)));
            let (c, d) = (_mm512_loadu_ps(p.add(2)), _mm512_loadu_ps(p.add(18)));
            let d0 = _mm512_permutex2var_ps(a, even, b);
            let d1 = _mm512_permutex2var_ps(a, odd, b);
            let d2 = _mm512_permutex2var_ps(c, even, d);
            let d3 = _mm512_permutex2var_ps(c, odd, d);
            *row = [
                _mm512_sub_ps(d0, d2),
                _mm512_add_ps(d1, d2),
                _mm512_sub_ps(d2, d1),
                _mm512_sub_ps(d1, d3),
            ];
        }
        // Bᵀ down each column.
        let [r0, r1, r2, r3] = rows;
        for (j, (((d0, d1), d2), d3)) in r0.into_iter().zip(r1).zip(r2).zip(r3).enumerate() {
            let column = [
                _mm512_sub_ps(d0, d2),
                _mm512_add_ps(d1, d2),
                _mm512_sub_ps(d2, d1),
                _mm512_sub_ps(d1, d3),
            ];
            for (i, value) in column.into_iter().enumerate() {
                let xi = 4 * i + j;
                _mm512_mask_storeu_ps(lane.add(xi * 2 * BLOCK + offset + done), mask, value);
            }
        }
        done += n;
    }
}

/// Writes 16 windows of two channels (`first`, `second`: 16 f32 each) as bf16 pairs, [window][channel],
/// to `dst` (32 values).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn interleave(first: *const f32, second: *const f32, dst: *mut bf16) {
    use std::arch::x86_64::*;
    let low = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    let high = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    let (a, b) = (_mm512_loadu_ps(first), _mm512_loadu_ps(second));
    let lo = _mm512_permutex2var_ps(a, low, b);
    let hi = _mm512_permutex2var_ps(a, high, b);
    let packed = _mm512_cvtne2ps_pbh(hi, lo);
    _mm512_storeu_si512(dst.cast(), std::mem::transmute::<__m512bh, __m512i>(packed));
}

/// The output transform of `count` windows along one row for one channel: M's 16 points at `m` + ξ ·
/// `point_stride`, each window's 2 × 2 outputs plus `bias` written from `dst` (output rows `wo` apart),
/// clipped to `room` = (columns, rows) left in the output from there.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn output_piece(
    m: *const f32,
    point_stride: usize,
    count: usize,
    bias: f32,
    dst: *mut f32,
    (columns, rows): (usize, usize),
    wo: usize,
) {
    use std::arch::x86_64::*;
    let low = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    let high = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    let bias = _mm512_set1_ps(bias);
    let mut done = 0;
    while done < count {
        let n = (count - done).min(16);
        let mask: __mmask16 = ((1u32 << n) - 1) as u16;
        let load = |xi: usize| _mm512_maskz_loadu_ps(mask, m.add(xi * point_stride + done));
        // Aᵀ down each column: m0 + m1 + m2, m1 − m2 − m3.
        let top: [__m512; 4] = std::array::from_fn(|j| {
            _mm512_add_ps(_mm512_add_ps(load(j), load(4 + j)), load(8 + j))
        });
        let bottom: [__m512; 4] = std::array::from_fn(|j| {
            _mm512_sub_ps(_mm512_sub_ps(load(4 + j), load(8 + j)), load(12 + j))
        });
        let sums = [top, bottom];
        // Aᵀ along each row, then the bias; rows interleaved (x = 2w, 2w + 1) and written clipped.
        let left = columns - 2 * done;
        let width = left.min(2 * n);
        for (y, [s0, s1, s2, s3]) in sums.into_iter().enumerate() {
            if y >= rows {
                break;
            }
            let even = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), s2), bias);
            let odd = _mm512_add_ps(_mm512_sub_ps(_mm512_sub_ps(s1, s2), s3), bias);
            let out = dst.add(y * wo + 2 * done);
            let first: __mmask16 = ((1u32 << width.min(16)) - 1) as u16;
            let second: __mmask16 = ((1u32 << width.saturating_sub(16)) - 1) as u16;
            _mm512_mask_storeu_ps(out, first, _mm512_permutex2var_ps(even, low, odd));
            _mm512_mask_storeu_ps(out.add(16), second, _mm512_permutex2var_ps(even, high, odd));
        }
        done += n;
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn transform_piece(_: *const f32, _: usize, _: usize, _: *mut f32, _: usize) {
    unreachable!("AVX-512 BF16 is x86-64 only; `fits` is false elsewhere")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn interleave(_: *const f32, _: *const f32, _: *mut bf16) {
    unreachable!("AVX-512 BF16 is x86-64 only; `fits` is false elsewhere")
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn output_piece(
    _: *const f32,
    _: usize,
    _: usize,
    _: f32,
    _: *mut f32,
    _: (usize, usize),
    _: usize,
) {
    unreachable!("AVX-512 BF16 is x86-64 only; `fits` is false elsewhere")
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::kernels::conv::{conv2d, ConvWeights};

    /// Root mean square of a − b.
    fn rms_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.sqr()?.mean_all()?.sqrt()?.to_scalar::<f32>()
    }

    #[test]
    fn winograd_bf16_is_as_close_to_candle_as_the_direct_bf16_conv() -> Result<()> {
        if !dot_bf16::available() {
            eprintln!("no AVX-512 BF16 on this machine: skipped");
            return Ok(());
        }
        let device = Device::Cpu;
        // (batch, c_in, c_out, h, w, padding, V bytes): odd and even output sizes (half windows at
        // the right and bottom edges), rows of windows shorter and longer than a vector of 16 and than
        // a block of 32, one-pixel maps, output channels not a multiple of 32, no padding, batches
        // whose windows run across images within a block, and V cut into several chunks.
        for &(b, c_in, c_out, h, w, p, v_bytes) in &[
            (1usize, 32usize, 5usize, 7usize, 9usize, 1usize, V_BYTES),
            (8, 64, 33, 5, 3, 1, V_BYTES),
            (2, 32, 70, 33, 17, 1, V_BYTES),
            (1, 96, 16, 1, 1, 1, V_BYTES),
            (2, 32, 40, 3, 3, 0, V_BYTES),
            (2, 64, 47, 1, 40, 1, V_BYTES),
            (1, 64, 31, 6, 7, 0, V_BYTES),
            (2, 320, 64, 8, 8, 1, V_BYTES),
            (1, 32, 32, 64, 64, 1, V_BYTES),
            (2, 64, 40, 21, 37, 1, 16 * 64 * 2 * 64),
            (1, 32, 64, 28, 36, 1, V_BYTES),
        ] {
            // Zero-mean input (Winograd's worst case: its sums and differences then round about 1.7×
            // the error of the direct products), and input with a mean, as after SiLU.
            for offset in [0.0, 3.0] {
                let xs = (Tensor::randn(0f32, 1.0, (b, c_in, h, w), &device)? + offset)?;
                let weight = Tensor::randn(0f32, 0.3, (c_out, c_in, 3, 3), &device)?;
                let bias = Tensor::randn(0f32, 1.0, c_out, &device)?;
                let transformed = Bf16ConvWeights::pack_winograd(&weight)?;
                assert!(transformed.winograd().is_some());
                let geometry = Geometry::new(b, c_in, (h, w), c_out, p);
                let (ho, wo) = geometry.output;
                let values = convolve(
                    &xs.flatten_all()?.to_vec1::<f32>()?,
                    &geometry,
                    transformed.winograd().unwrap(),
                    &bias.to_vec1::<f32>()?,
                    v_bytes,
                );
                let winograd = Tensor::from_vec(values, (b, c_out, ho, wo), &device)?;
                let through_conv2d = conv2d(&xs, ConvWeights::Bf16(&transformed), &bias, p, 1)?;
                let direct = conv2d(
                    &xs,
                    ConvWeights::Bf16(&Bf16ConvWeights::pack(&weight)?),
                    &bias,
                    p,
                    1,
                )?;
                let plain = xs
                    .conv2d(&weight, p, 1, 1, 1)?
                    .broadcast_add(&bias.reshape((1, c_out, 1, 1))?)?;
                assert_eq!(winograd.dims(), plain.dims());
                let case = format!("{b}x{c_in}x{h}x{w} → {c_out}, pad {p}, input mean {offset}");
                assert_eq!(
                    super::super::max_abs_diff(&winograd, &through_conv2d)?,
                    0.0,
                    "{case}: conv2d takes the Winograd path"
                );
                let (ours, theirs) = (rms_diff(&winograd, &plain)?, rms_diff(&direct, &plain)?);
                let scale = plain.sqr()?.mean_all()?.sqrt()?.to_scalar::<f32>()?;
                println!("{case}: rms error {ours:.2e} (direct bf16 {theirs:.2e}) of {scale:.2e}");
                assert!(
                    ours < 3.0 * theirs && ours < 0.01 * scale,
                    "{case}: rms error {ours} against the direct bf16 conv's {theirs}, of {scale}"
                );
            }
        }
        Ok(())
    }
}
